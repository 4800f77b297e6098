"""Architectures outside ARCH_SPECS (Gemma3, GPT-NeoX, OPT): rank-only NLS, Wanda, RTN/GPTQ and export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import RANK_ONLY_ARCHS, train_steps
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hf_elastic import (
    ElasticLoraConfig,
    NLSConfig,
    QuantLinear,
    export_subnetwork,
    get_supernet,
    load_exported,
    quantize,
    sparsify,
    sparsity_of,
)
from hf_elastic.models import decoder_layers, weight_out_in


@pytest.fixture(params=list(RANK_ONLY_ARCHS), scope="module")
def other(request):
    return RANK_ONLY_ARCHS[request.param]


def calibration() -> torch.Tensor:
    return torch.randint(1, 96, (8, 16), generator=torch.Generator().manual_seed(0))


def test_decoder_layers_are_found_from_no_split_modules(other):
    model = other.build()
    layers = decoder_layers(model)
    assert [path for path, _ in layers] == [f"{other.layers_path}.0", f"{other.layers_path}.1"]
    assert all(type(layer).__name__ in model._no_split_modules for _, layer in layers)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(5))


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(3))
        self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])  # mixed classes: not a stack


def test_decoder_layers_fallback_takes_the_outermost_stack():
    net = _Net()
    assert [path for path, _ in decoder_layers(net)] == ["blocks.0", "blocks.1", "blocks.2"]
    net._no_split_modules = ["Linear"]  # a named block class wins over the outermost stack
    assert [path for path, _ in decoder_layers(net)] == [f"blocks.0.experts.{i}" for i in range(5)]
    with pytest.raises(ValueError, match=r"Found no transformer layers in Sequential"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_wanda_and_gptq_work_on_the_decoder_layers(other):
    model = other.build()
    report = sparsify(model, "wanda", 0.5, calibration=calibration(), seq_len=16, num_samples=8, show_progress=False)
    linear_in_layers = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(other.layers_path)
    ]
    assert sorted(m.name for m in report.modules) == sorted(linear_in_layers)
    for m in report.modules:
        assert m.min_row_zeros == m.max_row_zeros == m.shape[1] // 2
    assert report.total_sparsity == 0.5 and sparsity_of(model).total_sparsity == 0.5
    zeros = {n: weight_out_in(model.get_submodule(n)) == 0 for n in linear_in_layers}
    quantized = quantize(
        model,
        bits=4,
        method="gptq",
        calibration=calibration(),
        seq_len=16,
        num_samples=8,
        keep_residual=True,
        show_progress=False,
    )
    assert quantized.config.group_size == 32  # the default: the largest of 128/64/32 dividing 32 and 64
    assert sorted(m.name for m in quantized.modules) == sorted(linear_in_layers)
    for name, mask in zeros.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear) and torch.equal(module.dequantize() == 0, mask)
    assert all(m.output_error is not None and m.output_error < 0.5 for m in quantized.modules)


def test_rank_only_training_and_export(other, tmp_path):
    base = other.build()
    sparsify(base, "wanda", 0.5, calibration=calibration(), seq_len=16, num_samples=8, show_progress=False)
    config = NLSConfig(rank_choices=[8, 4], target_modules=other.targets, sparse_adapter=True, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    train_steps(model, other, steps=2)
    sn = get_supernet(model)
    assert len(sn.space) == 2 * len(other.targets) and all(d.kind == "rank" for d in sn.space)
    sn.activate("min")
    batch = other.batch(4)
    with torch.no_grad():
        expected = model(**batch).logits
    out = export_subnetwork(sn, "min", tmp_path / "sparse")
    assert json.loads((out / "sparsity_report.json").read_text())["sparsity"] == 0.5
    stock = AutoModelForCausalLM.from_pretrained(out)  # rank-only: a stock checkpoint
    with torch.no_grad():
        assert (stock(**batch).logits - expected).abs().max() <= 1e-5
    assert sparsity_of(stock).total_sparsity == 0.5

    dense = get_peft_model(
        other.build(), NLSConfig(rank_choices=[8, 4], target_modules=other.targets, init_lora_weights=False)
    )
    dn = get_supernet(dense)
    dn.activate("min")
    with torch.no_grad():
        expected = dense(**batch).logits
    adapter = dn.extract_adapter("min", tmp_path / "adapter")
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(other.build(), adapter)
        assert (loaded(**batch).logits - expected).abs().max() <= 1e-5
    assert (
        export_subnetwork(dn, "min", tmp_path / "dense") and not (tmp_path / "dense" / "sparsity_report.json").exists()
    )


def test_quantization_aware_export_is_exact_and_refused_by_stock_loaders(other, tmp_path):
    base = other.build()
    sparsify(base, "magnitude", 0.5, show_progress=False)
    quantize(base, bits=4, keep_residual=True, show_progress=False)
    config = NLSConfig(
        rank_choices=[8, 4],
        target_modules=other.targets,
        sparse_adapter=True,
        quantization_aware=True,
        init_lora_weights=False,
    )
    model = get_peft_model(base, config)
    train_steps(model, other, steps=2)
    sn = get_supernet(model)
    sn.activate("min")
    batch = other.batch(5)
    with torch.no_grad():
        expected = model(**batch).logits
    out = export_subnetwork(sn, "min", tmp_path / "int4")
    with torch.no_grad():
        assert torch.equal(load_exported(out)(**batch).logits, expected)
    with pytest.raises(ValueError, match=r"hf_elastic INT4 format: load it with hf_elastic.load_exported"):
        AutoModelForCausalLM.from_pretrained(out)


def test_elastic_width_names_the_architectures_it_knows():
    model = RANK_ONLY_ARCHS["opt"].build()
    config = ElasticLoraConfig(rank_choices=[4], ffn_width_choices=[1.0, 0.5], target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"Elastic width is not supported for model_type='opt'; supported: .*llama"):
        get_supernet(get_peft_model(model, config))
