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
