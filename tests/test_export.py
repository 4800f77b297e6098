"""export_subnetwork / load_exported: merged, sliced folders that reload exactly (per-layer widths, INT4, sparse)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, fresh
from peft import get_peft_model
from test_qa_sparse_peft import qa_config, quantized
from test_sparse_peft import pruned
from test_supernet import _train, make_config
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hf_elastic import get_supernet
from hf_elastic.export import accelerate, export_subnetwork, load_exported
from hf_elastic.quantization import QuantLinear


def test_per_layer_widths_reload_without_remote_code(arch, base, tmp_path):
    model = get_peft_model(fresh(base), make_config("elastic", arch, init_lora_weights=False))
    sn = get_supernet(model)
    config = sn.space.max_config() | {"0.ffn": 24, "1.heads": sn.space["1.heads"].choices[-1]}
    sn.activate(config)
    batch = arch.batch(3)
    with torch.no_grad():
        expected = model(**batch).logits
    out = export_subnetwork(sn, config, tmp_path / "sub")
    saved = json.loads((out / "config.json").read_text())
    assert "auto_map" not in saved and saved["elastic_layer_widths"]["0"]["ffn"] == 24
    info = json.loads((out / "elastic_subnet.json").read_text())
    assert info["config"] == config and info["params"] < info["max"]["params"]
    reloaded = load_exported(out)
    assert sum(p.numel() for p in reloaded.parameters()) == info["base_params"]
    with torch.no_grad():
        assert (reloaded(**batch).logits - expected).abs().max() <= 1e-5
    assert not (out / "sparsity_report.json").exists()


def test_uniform_widths_give_a_stock_checkpoint_with_tokenizer(tmp_path):
    arch = ARCHS["llama"]
    model = get_peft_model(arch.build(), make_config("elastic", arch, init_lora_weights=False))
    sn = get_supernet(model)
    vocab = {f"t{i}": i for i in range(96)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    out = export_subnetwork(sn, "min", tmp_path / "min", tokenizer=tok)
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert stock.config.intermediate_size == 24 and (out / "tokenizer.json").is_file()
    sn.activate("min")
    batch = arch.batch()
    with torch.no_grad():
        assert (stock(**batch).logits - model(**batch).logits).abs().max() <= 1e-5
    with pytest.raises(FileExistsError, match=r"exists. Pass overwrite=True"):
        export_subnetwork(sn, "min", out)
    export_subnetwork(sn, "max", out, overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 48
    assert [p.name for p in tmp_path.iterdir()] == ["min"]  # no temporary folders left behind


def test_sparse_and_int4_exports_reload_exactly(tmp_path):
    arch = ARCHS["llama"]
    sparse = get_peft_model(
        pruned(arch.build()), make_config("nls", arch, sparse_adapter=True, init_lora_weights=False)
    )
    _train(sparse, arch, steps=2)
    out = export_subnetwork(get_supernet(sparse), "median", tmp_path / "sparse")
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5)
    assert json.loads((out / "elastic_subnet.json").read_text())["sparse_adapter"] is True

    qa = get_peft_model(quantized(arch.build()), qa_config(arch, grouped=False))
    _train(qa, arch, steps=2)
    sn = get_supernet(qa)
    sn.activate("min")
    batch = arch.batch(6)
    with torch.no_grad():
        expected = qa(**batch).logits
    out = export_subnetwork(sn, "min", tmp_path / "int4")
    reloaded = load_exported(out)
    assert any(isinstance(m, QuantLinear) for m in reloaded.modules())
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
    with pytest.raises(FileNotFoundError, match=r"No config.json in .*: not a model folder"):
        load_exported(tmp_path)


def test_accelerate_backends(monkeypatch):
    model = ARCHS["llama"].build()
    batch = ARCHS["llama"].batch()
    with torch.no_grad():
        expected = model(**batch).logits
        assert accelerate(model, "none") is model
        compiled = accelerate(model, "compile", dynamic=False)
        assert (compiled(**batch).logits - expected).abs().max() <= 1e-5
    monkeypatch.setitem(__import__("sys").modules, "intel_extension_for_pytorch", None)
    with pytest.raises(ImportError, match=r"backend='ipex' needs intel_extension_for_pytorch.*use backend='compile'"):
        accelerate(model, "ipex")
    with pytest.raises(ValueError, match=r"backend='tensorrt' is unknown"):
        accelerate(model, "tensorrt")
