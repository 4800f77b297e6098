"""Every artefact hf_elastic writes loads in stock tools exactly or fails loudly, and its model card says which."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, make_config, pruned, qa_config, quantized, train_steps
from huggingface_hub import metadata_load
from peft import get_peft_model

from hf_elastic import CardInfo, NLSConfig, export_subnetwork, get_supernet, load_exported, prepare_upload_folder
from hf_elastic.export import build_model_card, infer_method

HAS_OPENVINO = all(importlib.util.find_spec(m) is not None for m in ("openvino", "optimum.intel", "nncf"))
BASE_ID = "HuggingFaceTB/SmolLM2-135M"
ARCH = ARCHS["llama"]
IDS = ARCH.batch(7)["input_ids"]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> dict:
    """Every kind of folder hf_elastic writes, each with the super-network's logits it must reproduce."""
    root = tmp_path_factory.mktemp("kinds")
    base, sparse_base = ARCH.build(), pruned(ARCH.build())
    base.save_pretrained(root / "base")
    sparse_base.save_pretrained(root / "sparse_base")
    items, expected = {}, {}

    def add(name: str, path: Path, logits: torch.Tensor | None, loaders: list[str], base_dir: str = "base") -> None:
        items[name] = {"path": str(path), "loaders": loaders, "base": str(root / base_dir)}
        if logits is not None:
            expected[name] = logits

    nls = get_peft_model(ARCH.build(), make_config("nls", ARCH, init_lora_weights=False))
    sn = get_supernet(nls)
    sn.activate("min")
    add("adapter", sn.extract_adapter("min", root / "adapter"), _logits(nls), ["peft"])

    sparse = get_peft_model(
        pruned(ARCH.build()), make_config("nls", ARCH, sparse_adapter=True, init_lora_weights=False)
    )
    train_steps(sparse, ARCH, steps=2)
    sn = get_supernet(sparse)
    sn.activate("min")
    add("sparse adapter", sn.extract_adapter("min", root / "sparse_adapter"), _logits(sparse), ["peft"], "sparse_base")
    sparse.save_pretrained(root / "sparse_super")
    add("sparse super-adapter", root / "sparse_super", None, ["peft"], "sparse_base")

    lonas = get_peft_model(
        pruned(ARCH.build()), make_config("elastic", ARCH, sparse_adapter=True, init_lora_weights=False)
    )
    train_steps(lonas, ARCH, steps=2)
    sn = get_supernet(lonas)
    uniform = sn.space.max_config() | {"0.ffn": 24, "1.ffn": 24, "0.heads": 2, "1.heads": 2}
    sn.activate(uniform)
    add("merged, uniform widths", export_subnetwork(sn, uniform, root / "uniform"), _logits(lonas), ["auto", "class"])
    per_layer = sn.space.max_config() | {"0.ffn": 24, "1.heads": 2}
    sn.activate(per_layer)
    merged = export_subnetwork(sn, per_layer, root / "per_layer")
    add("merged, per-layer widths", merged, _logits(lonas), ["auto", "class"])

    qa = get_peft_model(quantized(ARCH.build()), qa_config(ARCH, grouped=False))
    train_steps(qa, ARCH, steps=2)
    sn = get_supernet(qa)
    sn.activate("min")
    int4 = export_subnetwork(sn, "min", root / "int4")
    add("INT4", int4, _logits(qa), ["auto", "class"])
    add("QA adapter", sn.extract_adapter("min", root / "qa_adapter"), None, ["peft"])

    if HAS_OPENVINO:
        from hf_elastic.export import export_openvino

        ov = export_openvino(merged, root / "ov")
        add("OpenVINO IR, per-layer widths", ov, expected["merged, per-layer widths"], ["ov"])
        int4_ov = export_openvino(int4, root / "ov_int4", compress_float_weights=False)  # fp32 embedding: exact
        add("OpenVINO IR, INT4 codes", int4_ov, expected["INT4"], ["ov"])
    torch.save(expected, root / "expected.pt")
    return {"root": root, "items": items}


STOCK_LOADER = textwrap.dedent(
    """
    import json, logging, sys
    import torch
    import transformers

    spec = json.loads(open(sys.argv[1]).read())
    expected = torch.load(spec["expected"])
    ids = torch.tensor(spec["ids"])
    fp32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
    warnings = []

    class Keep(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    transformers.logging.add_handler(Keep())
    results = {}
    for name, item in spec["items"].items():
        for loader in item["loaders"]:
            warnings.clear()
            try:
                if loader == "peft":
                    from peft import PeftModel

                    base = transformers.AutoModelForCausalLM.from_pretrained(item["base"])
                    model = PeftModel.from_pretrained(base, item["path"])
                elif loader == "auto":
                    auto = transformers.AutoModelForCausalLM
                    model = auto.from_pretrained(item["path"], ignore_mismatched_sizes=True)
                elif loader == "class":
                    config = json.loads(open(item["path"] + "/config.json").read())
                    model_class = getattr(transformers, config["architectures"][0])
                    model = model_class.from_pretrained(item["path"], ignore_mismatched_sizes=True)
                else:
                    from optimum.intel import OVModelForCausalLM

                    model = OVModelForCausalLM.from_pretrained(item["path"], ov_config=fp32)
                with torch.no_grad():
                    logits = torch.as_tensor(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
                diff = (logits - expected[name]).abs().max().item() if name in expected else None
                results[f"{name} / {loader}"] = {"loaded": True, "diff": diff}
            except Exception as err:
                message = f"{type(err).__name__}: {err}"
                results[f"{name} / {loader}"] = {"loaded": False, "error": message, "warnings": list(warnings)}
    results["hf_elastic modules imported"] = sorted(m for m in sys.modules if m.startswith("hf_elastic"))
    open(spec["out"], "w").write(json.dumps(results))
    """
)


def test_every_artefact_loads_exactly_in_stock_tools_or_fails_naming_hf_elastic(artefacts, tmp_path):
    root = artefacts["root"]
    spec = {"items": artefacts["items"], "expected": str(root / "expected.pt"), "ids": IDS.tolist()}
    spec["out"] = str(tmp_path / "results.json")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "stock_loader.py").write_text(STOCK_LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, str(tmp_path / "stock_loader.py"), str(tmp_path / "spec.json")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(Path(spec["out"]).read_text())
    assert results.pop("hf_elastic modules imported") == []
    exact = {"adapter / peft", "merged, uniform widths / auto", "merged, uniform widths / class"}
    if HAS_OPENVINO:
        exact |= {"OpenVINO IR, per-layer widths / ov", "OpenVINO IR, INT4 codes / ov"}
    refused = {
        "sparse adapter / peft": "hf_elastic sparse adapter: load it with hf_elastic.merge_subnet_adapter",
        "sparse super-adapter / peft": "hf_elastic sparse super-adapter: load it with hf_elastic.load_super_network",
        "QA adapter / peft": "hf_elastic quantization-aware adapter: load it with hf_elastic.export_subnetwork",
        "merged, per-layer widths / auto": "hf_elastic per-layer widths: load it with hf_elastic.load_exported",
        "INT4 / auto": "hf_elastic INT4 format: load it with hf_elastic.load_exported",
    }
    # a model class's own from_pretrained fails on the quantization_config; transformers' warning names the loader
    refused_by_class = {
        "merged, per-layer widths / class": "hf_elastic per-layer widths: load it with hf_elastic.load_exported",
        "INT4 / class": "hf_elastic INT4 format: load it with hf_elastic.load_exported",
    }
    print(json.dumps(results, indent=1))
    assert set(results) == exact | set(refused) | set(refused_by_class)
    for key in exact:
        assert results[key]["loaded"] and results[key]["diff"] <= 1e-5, (key, results[key])
    for key, message in refused.items():
        assert not results[key]["loaded"] and message in results[key]["error"], (key, results[key])
    for key, message in refused_by_class.items():
        result = results[key]
        assert not result["loaded"] and "has no `quant_method`" in result["error"], (key, result)
        assert any(message in w for w in result["warnings"]), (key, result)
    # and hf_elastic loads the refused merged folders exactly
    expected = torch.load(root / "expected.pt")
    for name, folder in (("merged, per-layer widths", "per_layer"), ("INT4", "int4")):
        assert (_logits(load_exported(root / folder)) - expected[name]).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------- cards


def card_text(folder: Path, **info) -> tuple[str, dict]:
    """The card's text with its whitespace collapsed (lines wrap anywhere), and its metadata."""
    out = prepare_upload_folder(folder, folder.parent / f"{folder.name}-card", CardInfo(base_model=BASE_ID, **info))
    return " ".join((out / "README.md").read_text().split()), metadata_load(out / "README.md")


@pytest.mark.parametrize(
    ("folder", "method", "title"),
    [
        ("adapter", "nls", "NLS"),
        ("sparse_adapter", "sqft-sparsepeft", "SQFT + SparsePEFT"),
        ("sparse_super", "sqft-sparsepeft", "SQFT + SparsePEFT"),
        ("uniform", "lonas", "LoNAS"),
        ("int4", "sqft-qa-sparsepeft", "SQFT + QA-SparsePEFT"),
        ("qa_adapter", "sqft-qa-sparsepeft", "SQFT + QA-SparsePEFT"),
    ],
)
def test_card_infers_the_method_from_the_elastic_config(artefacts, folder, method, title):
    path = artefacts["root"] / folder
    assert infer_method(path) == method
    assert f"| Method | {title} |" in str(build_model_card(path, CardInfo(base_model=BASE_ID)))
    assert "| Method | Shears |" in str(build_model_card(path, CardInfo(base_model=BASE_ID, method="shears")))


def test_card_asks_for_the_method_when_nothing_records_it(artefacts, tmp_path):
    folder = tmp_path / "plain"
    ARCH.build().save_pretrained(folder)
    with pytest.raises(
        ValueError, match=r"Cannot infer the method of .*Pass CardInfo\(method=...\) \(CLI: --method\)"
    ):
        build_model_card(folder, CardInfo(base_model=BASE_ID))
    assert "| Method | NLS |" in str(build_model_card(folder, CardInfo(base_model=BASE_ID, method="nls")))


def test_card_of_a_sparse_adapter_gives_the_exact_merge_and_calls_stock_loading_an_approximation(artefacts):
    text, meta = card_text(artefacts["root"] / "sparse_adapter")
    assert 'model = merge_subnet_adapter(base, snapshot_download("REPO_ID"))' in text
    assert "A stock load with the real target modules is only an approximation" in text
    assert "`merge_and_unload()` fills in the base's zeros" in text
    targets = json.loads((artefacts["root"] / "sparse_adapter" / "elastic_subnet.json").read_text())["target_modules"]
    assert f"config.target_modules = {json.dumps(targets)}" in text and "PeftModel.from_pretrained(base, " in text
    assert "library_name" not in meta and meta["base_model_relation"] == "adapter"
    plain, meta = card_text(artefacts["root"] / "adapter")
    assert 'model = PeftModel.from_pretrained(base, "REPO_ID")' in plain and "merge_subnet_adapter" not in plain
    assert meta["library_name"] == "peft"


def test_card_of_an_unguarded_sparse_adapter_still_calls_the_stock_load_an_approximation(artefacts, tmp_path):
    old = tmp_path / "old_sparse_adapter"  # as extract_adapter wrote sparse adapters before they were guarded
    shutil.copytree(artefacts["root"] / "sparse_adapter", old)
    info = json.loads((old / "elastic_subnet.json").read_text())
    adapter_config = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(
        json.dumps(adapter_config | {"target_modules": info.pop("target_modules")})
    )
    (old / "elastic_subnet.json").write_text(json.dumps(info))
    text, meta = card_text(old)
    assert "Stock `peft` loads this folder, but only as an approximation" in text and "refuses" not in text
    assert 'merge_subnet_adapter(base, snapshot_download("REPO_ID"))' in text and meta["library_name"] == "peft"


def test_card_of_a_qa_adapter_points_to_the_merged_export(artefacts):
    text, _ = card_text(artefacts["root"] / "qa_adapter")
    assert "Stock `peft` refuses this folder on purpose" in text and "`hf_elastic.export_subnetwork`" in text
    assert "PeftModel.from_pretrained(base" not in text


@pytest.mark.parametrize(
    ("folder", "loader"),
    [("uniform", "stock"), ("per_layer", "per-layer widths"), ("int4", "INT4")],
)
def test_card_of_a_merged_model_names_the_loader_it_needs(artefacts, folder, loader):
    text, meta = card_text(artefacts["root"] / folder)
    if loader == "stock":
        assert 'AutoModelForCausalLM.from_pretrained("REPO_ID")' in text and "load_exported" not in text
        assert meta["library_name"] == "transformers"
        return
    assert 'model = load_exported(snapshot_download("REPO_ID"))' in text and "library_name" not in meta
    assert 'AutoModelForCausalLM.from_pretrained("REPO_ID")' not in text
    assert "raises an error naming `hf_elastic.load_exported` instead of loading" in text
    if loader == "per-layer widths":
        assert "A merged checkpoint with per-layer widths (recorded in `config.elastic_layer_widths`)" in text


@pytest.mark.skipif(not HAS_OPENVINO, reason="needs pip install 'hf-elastic[openvino]'")
def test_card_of_an_openvino_export_reads_the_method_it_came_from(artefacts):
    folder = artefacts["root"] / "ov"
    assert (folder / "elastic_subnet.json").read_bytes() == (
        artefacts["root"] / "per_layer" / "elastic_subnet.json"
    ).read_bytes()
    text, _ = card_text(folder)
    assert "| Method | LoNAS |" in text and 'OVModelForCausalLM.from_pretrained("REPO_ID")' in text


def test_the_nls_super_adapter_round_trip_keeps_the_real_target_modules(artefacts):
    folder = artefacts["root"] / "sparse_super"
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    elastic = json.loads((folder / "elastic_config.json").read_text())
    assert adapter_config["target_modules"].startswith("hf_elastic sparse super-adapter")
    config = NLSConfig.from_pretrained(str(folder))
    assert sorted(config.target_modules) == elastic["target_modules"] == sorted(ARCH.targets)
