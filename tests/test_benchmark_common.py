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


def test_machine_slug_names_the_cpu_and_its_widest_isa():
    epyc = {"cpu_model": "AMD EPYC 7763 64-Core Processor", "cpu_flags": {"avx2": True, "avx512f": True, "amx": False}}
    assert common.machine_slug({"machine": epyc}) == "amd-epyc-7763-64-core-avx512"
    xeon = {"cpu": "Intel(R) Xeon(R) Processor", "isa": ["avx2", "avx512f", "amx_bf16", "amx_tile"]}
    assert common.machine_slug({"environment": xeon}) == "intel-xeon-amx"
    avx2 = {"cpu_model": "AMD Ryzen 7 5800X", "cpu_flags": {"avx2": True, "avx512f": False, "amx": False}}
    assert common.machine_slug({"machine": avx2}) == "amd-ryzen-7-5800x-avx2"
    assert common.machine_slug({"machine": {"cpu_count": 2}}) == common.UNRECORDED_MACHINE == "unrecorded-cpu"


def test_result_path_puts_default_outputs_in_the_machine_folder(tmp_path):
    result = {"machine": {"cpu_model": "AMD EPYC", "cpu_flags": {"avx2": True, "avx512f": True}}}
    default = common.RESULTS_DIR / "x.json"
    assert common.result_path(default, result) == common.RESULTS_DIR / "amd-epyc-avx512" / "x.json"
    assert common.result_path(str(tmp_path / "x.json"), result) == tmp_path / "x.json"  # an explicit path is kept
    here = common.machine_slug({"machine": common.cpu_info()})
    assert common.this_machine_path(default) == common.RESULTS_DIR / here / "x.json"


def test_every_result_json_sits_in_the_folder_of_its_machine():
    files = sorted(common.RESULTS_DIR.rglob("*.json"))
    assert files and not list(common.RESULTS_DIR.glob("*.json")), "results/ holds only machine folders"
    for path in files:
        slug = common.machine_slug(json.loads(path.read_text()))
        assert path.parent.parent == common.RESULTS_DIR, path
        if slug != common.UNRECORDED_MACHINE:  # files without a machine record sit with the run they belong to
            assert path.parent.name == slug, f"{path} records {slug}"


def test_accuracy_over_seeds_summarises_the_widths_every_run_has():
    runs = {
        "0": {"accuracy": {"ffn_100": 0.70, "ffn_50": 0.60, "ffn_58_mix": 0.64}},
        "1": {"accuracy": {"ffn_100": 0.74, "ffn_50": 0.62}},  # not yet extended: no mix
    }
    summary = common.accuracy_over_seeds(runs)
    assert list(summary) == ["ffn_100", "ffn_50"]
    assert summary["ffn_100"]["mean"] == pytest.approx(0.72)
    assert summary["ffn_100"]["std"] == pytest.approx(0.04 / 2**0.5)
    assert summary["ffn_100"]["sem"] == pytest.approx(0.02)
