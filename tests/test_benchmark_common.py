"""benchmarks/common.py: every benchmark JSON records the CPU model and ISA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
common = pytest.importorskip("common")


def test_write_result_records_cpu_model_and_isa(tmp_path):
    out = tmp_path / "results" / "x.json"
    common.write_result(str(out), {"benchmark": "x", "machine": {"threads": 3}})
    machine = json.loads(out.read_text())["machine"]
    flags = set()
    model = None
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        if key.strip() == "model name" and model is None:
            model = value.strip()
    assert machine["cpu_model"] == model and machine["threads"] == 3
    assert machine["cpu_flags"] == {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "amx": any(f.startswith("amx") for f in flags),
    }


def test_bench_openvino_ov_config_option():
    bench = pytest.importorskip("bench_openvino")
    assert bench.parse_ov_config(["INFERENCE_NUM_THREADS=4", "KV_CACHE_PRECISION=u8"]) == {
        "INFERENCE_NUM_THREADS": "4",
        "KV_CACHE_PRECISION": "u8",
    }
    with pytest.raises(SystemExit, match=r"--ov-config takes KEY=VALUE .* got 'INFERENCE_NUM_THREADS'"):
        bench.parse_ov_config(["INFERENCE_NUM_THREADS"])
