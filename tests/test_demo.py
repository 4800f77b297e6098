"""`run_demo` end to end on a tiny random Llama with a tokenizer trained offline, in both modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import llama_for

from hf_elastic.demo import DemoConfig, run_demo

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    llama_for(tiny_tokenizer, hidden_size=64, intermediate_size=128).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("quantization_aware", [False, True], ids=["sparsepeft", "qa-sparsepeft"])
def test_demo_runs_the_whole_pipeline(tiny_model_dir: Path, tmp_path: Path, quantization_aware: bool) -> None:
    cfg = DemoConfig(
        output_dir=str(tmp_path), model_dir=str(tiny_model_dir), quick=True, quantization_aware=quantization_aware
    )
    summary = run_demo(cfg)
    rows = summary["rows"]
    assert list(rows) == ["dense (zero-shot)", "sparse base (zero-shot)", "sub-network (PyTorch)",
                          "sub-network (OpenVINO INT4)"]  # fmt: skip
    sub, ov = rows["sub-network (PyTorch)"], rows["sub-network (OpenVINO INT4)"]
    assert sub["zeros_kept"] == 1.0
    assert sub["sparsity"] >= 0.5 and ov["sparsity"] >= 0.5
    assert ov["size_mb"] < rows["dense (zero-shot)"]["size_mb"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows.values())
    assert summary["search"]["evaluated"] >= cfg.search_budget
    elastic = json.loads((tmp_path / "super-adapter" / "elastic_config.json").read_text())
    assert elastic["quantization_aware"] is quantization_aware
    hub = Path(summary["hub_folder"])
    assert (hub / "README.md").is_file() and "tiny-llama" in (hub / "README.md").read_text()
    assert json.loads((tmp_path / "demo_results.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_demo_model_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="DemoConfig.model_dir=.* holds no config.json"):
        run_demo(DemoConfig(output_dir=str(tmp_path / "out"), model_dir=str(tmp_path), quick=True))
