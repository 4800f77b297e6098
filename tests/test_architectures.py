"""Architectures beside the main matrix (Gemma3, GPT-NeoX, OPT): NLS, elastic width, Wanda, RTN/GPTQ and export.

Also where `find_width_layers` finds the FFN channels and heads of every architecture of both matrices.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ARCHS, RANK_ONLY_ARCHS, train_steps
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, FalconConfig, FalconForCausalLM

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
from hf_elastic.models import ARCH_OVERRIDES, decoder_layers, find_width_layers, slice_layer_width, weight_out_in
from hf_elastic.models.arch import unit_scores


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


# ---------------------------------------------------------------------------------------------------- elastic width
_LLAMA_LAYOUT = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ffn_in": ("mlp.gate_proj", "mlp.up_proj"),
    "ffn_out": "mlp.down_proj",
}
# what find_width_layers reads off the modules: paths, (heads, key/value heads, head size, FFN channels), the config
# field of the FFN width, whether the config can carry a head size
LAYOUTS = {
    "llama": (_LLAMA_LAYOUT, (4, 2, 8, 48), "intermediate_size", True),
    "mistral": (_LLAMA_LAYOUT, (4, 2, 8, 48), "intermediate_size", True),
    "qwen2": (_LLAMA_LAYOUT, (4, 2, 8, 48), "intermediate_size", True),
    "phi3": (
        {
            "qkv": "self_attn.qkv_proj",
            "attn_out": "self_attn.o_proj",
            "ffn_in": ("mlp.gate_up_proj",),
            "ffn_out": "mlp.down_proj",
            "ffn_in_fused": True,
        },
        (4, 2, 8, 48),
        "intermediate_size",
        True,
    ),
    "gpt2": (
        {
            "qkv": "attn.c_attn",
            "attn_out": "attn.c_proj",
            "ffn_in": ("mlp.c_fc",),
            "ffn_out": "mlp.c_proj",
            "attn_module": "attn",
        },
        (4, 4, 8, 48),
        "n_inner",
        False,
    ),
    "bert": (
        {
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "attn_out": "attention.output.dense",
            "ffn_in": ("intermediate.dense",),
            "ffn_out": "output.dense",
            "attn_module": "attention.self",
        },
        (4, 4, 8, 48),
        "intermediate_size",
        False,
    ),
    "gemma3": (_LLAMA_LAYOUT, (4, 2, 8, 64), "intermediate_size", True),
    "gpt_neox": (
        {
            "qkv": "attention.query_key_value",
            "qkv_layout": "heads",
            "attn_out": "attention.dense",
            "ffn_in": ("mlp.dense_h_to_4h",),
            "ffn_out": "mlp.dense_4h_to_h",
            "attn_module": "attention",
        },
        (4, 4, 8, 64),
        "intermediate_size",
        False,
    ),
    "opt": (  # the FFN sits in the layer itself; q, k, v are registered as k, v, q
        {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "attn_out": "self_attn.out_proj",
            "ffn_in": ("fc1",),
            "ffn_out": "fc2",
        },
        (4, 4, 8, 64),
        "ffn_dim",
        False,
    ),
}
_SPEC_DEFAULTS = {"q": None, "k": None, "v": None, "qkv": None, "ffn_in_fused": False, "attn_module": "self_attn"}
_SPEC_DEFAULTS |= {"qkv_layout": "blocks"}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_width_layout_is_read_off_the_layer_modules(name):
    model = (ARCHS | RANK_ONLY_ARCHS)[name].build()
    paths, sizes, ffn_attr, heads_in_config = LAYOUTS[name]
    spec, layers = find_width_layers(model)
    assert {field: getattr(spec, field) for field in (*_SPEC_DEFAULTS, *paths)} == _SPEC_DEFAULTS | paths
    assert (spec.ffn_config_attr, spec.heads_in_config) == (ffn_attr, heads_in_config)
    assert [layer.prefix for layer in layers] == [path for path, _ in decoder_layers(model)]
    assert all((layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.ffn_dim) == sizes for layer in layers)


def test_overrides_are_only_for_fused_projections_of_matrix_architectures():
    assert sorted(ARCH_OVERRIDES) == ["gpt2", "gpt_neox", "phi3"]
    assert {name: o.fused_qkv for name, o in ARCH_OVERRIDES.items()} == {
        "gpt2": "blocks",
        "gpt_neox": "heads",
        "phi3": "blocks",
    }
    with pytest.warns(FutureWarning, match=r"`ARCH_SPECS` is now `ARCH_OVERRIDES`"):
        from hf_elastic.models import ARCH_SPECS
    assert ARCH_SPECS is ARCH_OVERRIDES


def width_config(other, **extra) -> ElasticLoraConfig:
    return ElasticLoraConfig(
        rank_choices=[8, 4],
        ffn_width_choices=[1.0, 0.75, 0.5],
        head_choices=[1.0, 0.5],
        target_modules=other.targets,
        lora_dropout=0.0,
        init_lora_weights=False,
        **extra,
    )


def test_width_subnetworks_train_and_extract_exactly(other):
    model = get_peft_model(other.build(), width_config(other))
    sn = get_supernet(model)
    widths = {n: d.choices for n, d in sn.space.dimensions.items() if d.kind != "rank"}
    assert widths == {"0.ffn": (64, 48, 32), "0.heads": (4, 2), "1.ffn": (64, 48, 32), "1.heads": (4, 2)}
    adapter = [p for n, p in model.named_parameters() if "lora_B" in n]
    before = [p.detach().clone() for p in adapter]
    sn.activate("min")  # half the FFN channels and heads of every layer
    train_steps(model, other, steps=2)
    assert all(not torch.equal(p, b) for p, b in zip(adapter, before, strict=True))
    batch = other.batch(3)
    sn.activate("max")
    with torch.no_grad():
        full = model(**batch).logits
    order = sn.reorder_channels("magnitude")  # kept heads and channels need not be the first ones
    assert order["0.heads"] != [0, 1, 2, 3] or order["1.heads"] != [0, 1, 2, 3]
    with torch.no_grad():
        assert (model(**batch).logits - full).abs().max() <= 1e-5
    per_layer = sn.space.max_config() | {"0.ffn": 48, "0.heads": 2, "1.ffn": 32}
    for config in (sn.space.min_config(), sn.space.sample(4), per_layer):
        sn.activate(config)
        with torch.no_grad():
            expected = model(**batch).logits
        sub = sn.extract_model(config)
        with torch.no_grad():
            assert (sub(**batch).logits - expected).abs().max() <= 1e-5
        assert sum(p.numel() for p in sub.parameters()) == sn.count(config)["base_params"]
    assert sn.count("min")["macs"] < sn.count(per_layer)["macs"] < sn.count("max")["macs"]


def test_width_exports_load_in_stock_transformers_or_are_refused(other, tmp_path):
    model = get_peft_model(other.build(), width_config(other))
    sn = get_supernet(model)
    sn.reorder_channels("magnitude")
    spec, _ = find_width_layers(sn.base)
    ffn = sn.space.max_config() | {"0.ffn": 32, "1.ffn": 32}
    heads = ffn | {"0.heads": 2, "1.heads": 2}
    per_layer = sn.space.max_config() | {"0.ffn": 48, "1.heads": 2}
    batch = other.batch(5)
    # Gemma3's config carries head_dim, so a uniform head cut is a stock checkpoint; GPT-NeoX's and OPT's derive the
    # head size from hidden_size / num_attention_heads and cannot say "2 heads of 8 channels" in a 32-wide model
    cases = [
        (ffn, None),
        (heads, None if spec.heads_in_config else "attention heads cut"),
        (per_layer, "per-layer widths"),
    ]
    for i, (config, refused) in enumerate(cases):
        sn.activate(config)
        with torch.no_grad():
            expected = model(**batch).logits
        out = export_subnetwork(sn, config, tmp_path / str(i))
        with torch.no_grad():
            assert (load_exported(out)(**batch).logits - expected).abs().max() <= 1e-5
        if refused:
            with pytest.raises(ValueError, match=rf"hf_elastic {refused}: load it with hf_elastic.load_exported"):
                AutoModelForCausalLM.from_pretrained(out)
            continue
        stock = AutoModelForCausalLM.from_pretrained(out)
        assert getattr(stock.config, spec.ffn_config_attr) == 32
        assert stock.config.num_attention_heads == (2 if config is heads else 4)
        with torch.no_grad():
            assert (stock(**batch).logits - expected).abs().max() <= 1e-5


def test_fused_query_key_value_of_gpt_neox_is_scored_and_cut_head_by_head():
    model = RANK_ONLY_ARCHS["gpt_neox"].build()
    _, layers = find_width_layers(model)
    attn = layers[0].module.attention
    qkv = attn.query_key_value.weight.detach().reshape(4, 3 * 8, 32)  # [head, (q, k, v) x head_dim, hidden]
    per_head = qkv.pow(2).sum((1, 2)) + attn.dense.weight.detach().reshape(32, 4, 8).pow(2).sum((0, 2))
    scores = unit_scores(layers[0], lambda m: weight_out_in(m).detach() ** 2)
    assert torch.allclose(scores["heads"], per_head)
    bias = attn.query_key_value.bias.detach().reshape(4, 24)
    slice_layer_width(layers[0], None, torch.tensor([1, 3]))
    assert torch.equal(attn.query_key_value.weight, qkv[[1, 3]].reshape(48, 32))
    assert torch.equal(attn.query_key_value.bias, bias[[1, 3]].reshape(48))
    assert attn.dense.weight.shape == (32, 16)


def test_elastic_width_refuses_a_fused_projection_of_unknown_layout():
    torch.manual_seed(0)
    falcon = FalconForCausalLM(FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    config = ElasticLoraConfig(rank_choices=[4], ffn_width_choices=[1.0, 0.5], target_modules=["query_key_value"])
    with pytest.raises(
        ValueError,
        match=r"Elastic width cannot find the FFN channels and attention heads of 'transformer.h.0' "
        r"\(FalconDecoderLayer, model_type='falcon'\): 'self_attention.query_key_value' fuses the query, key and "
        r"value rows, in a layout its shape does not tell: name it with ArchOverride\(fused_qkv='blocks' or 'heads'\) "
        r"in ARCH_OVERRIDES. Use NLSConfig",
    ):
        get_supernet(get_peft_model(falcon, config))
