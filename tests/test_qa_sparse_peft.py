"""QA-SparsePEFT on every architecture: adapters trained through the INT4 grid merge into exact integer codes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, fresh, peft_kwargs
from peft import get_peft_model
from test_sparse_peft import pruned
from test_supernet import _train, subnets

from hf_elastic import ElasticLoraConfig, NLSConfig, get_supernet
from hf_elastic.quantization import QuantLinear, expand_groups, quantize


def quantized(base: torch.nn.Module, bits: int = 4) -> torch.nn.Module:
    model = pruned(base)
    quantize(model, bits=bits, group_size=16, show_progress=False)
    return model


def codes(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {n.removesuffix(".base_layer"): m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def qa_config(arch, grouped: bool, **extra) -> NLSConfig:
    kwargs = peft_kwargs(arch, sparse_adapter=True, quantization_aware=True, init_lora_weights=False, **extra)
    kwargs.pop("fan_in_fan_out", None)  # a quantized Conv1D is stored as (out, in)
    if arch.name == "bert":
        kwargs["exclude_modules"] = ["pooler.dense"]  # quantize() leaves modules outside the encoder layers alone
    if grouped:
        return NLSConfig(rank_choices=[8, 4, 2], rank_groups=arch.rank_groups, **kwargs)
    return NLSConfig(rank_choices=[8, 6, 4], **kwargs)


@pytest.mark.parametrize("grouped", [False, True])
def test_merged_int4_codes_reproduce_the_fake_quant_forward(arch, base, grouped):
    q_base = quantized(base)
    before = {k: (m.qweight.clone(), m.scales.clone(), m.zeros.clone()) for k, m in codes(q_base).items()}
    model = get_peft_model(copy.deepcopy(q_base), qa_config(arch, grouped))
    sn = get_supernet(model)
    for config in subnets(sn)[:3]:
        sn.activate(config)
        _train(model, arch, steps=2)
    batch = arch.batch(9)
    moved = 0
    for config in subnets(sn):
        sn.activate(config)
        with torch.no_grad():
            expected = model(**batch).logits
        merged = sn.extract_model(config)
        with torch.no_grad():
            got = merged(**batch).logits
        assert torch.equal(got, expected)
        for key, module in codes(merged).items():
            q0, s0, z0 = before[key]
            assert torch.equal(module.scales, s0) and torch.equal(module.zeros, z0)
            zero_code = q0 == expand_groups(z0, module.group_size)
            assert torch.equal(module.qweight[zero_code], q0[zero_code])  # base zeros stay exactly zero
            assert (module.dequantize()[zero_code] == 0).all()
            moved += int((module.qweight != q0).sum())
    assert moved > 0, "training never moved a code"


def test_int8_and_straight_through_gradients(base, arch):
    model = get_peft_model(quantized(base, bits=8), qa_config(arch, grouped=False))
    sn = get_supernet(model)
    sn.activate("median")
    model.train()
    model(**arch.batch()).loss.backward()
    ranks = sn.module_ranks()
    for key, module in sn.lora_modules.items():
        a, b = module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad
        assert a[: ranks[key]].abs().sum() > 0 and b[:, : ranks[key]].abs().sum() > 0, key
    merged = sn.extract_model("median")
    stored = sum(p.numel() for p in merged.parameters()) + sum(m.qweight.numel() for m in codes(merged).values())
    assert sn.count("median")["base_params"] == stored
    with torch.no_grad():
        assert torch.equal(merged(**arch.batch(2)).logits, model.eval()(**arch.batch(2)).logits)


def test_in_place_merge_unmerge_restores_codes():
    arch = ARCHS["llama"]
    model = get_peft_model(quantized(arch.build()), qa_config(arch, grouped=False))
    _train(model, arch, steps=2)
    originals = {k: m.qweight.clone() for k, m in codes(model).items()}
    batch = arch.batch(4)
    with torch.no_grad():
        expected = model(**batch).logits
        model.merge_adapter()
        assert torch.equal(model(**batch).logits, expected)
        assert any(not torch.equal(m.qweight, originals[k]) for k, m in codes(model).items())
        model.unmerge_adapter()
    assert all(torch.equal(m.qweight, originals[k]) for k, m in codes(model).items())


def test_qa_errors():
    arch = ARCHS["llama"]
    with pytest.raises(ValueError, match=r"lora_dropout=0.1 cannot be used with quantization_aware=True"):
        NLSConfig(quantization_aware=True, lora_dropout=0.1, target_modules=["q_proj"])
    with pytest.raises(
        ValueError,
        match=r"quantize, but target module 'model.layers.0.self_attn.q_proj' is Linear",
    ):
        get_peft_model(fresh(arch.build()), qa_config(arch, grouped=False))
    model = get_peft_model(
        quantized(arch.build()),
        ElasticLoraConfig(
            **peft_kwargs(arch, quantization_aware=True, rank_choices=[8, 4], ffn_width_choices=[1.0, 0.5])
        ),
    )
    with pytest.raises(ValueError, match=r"QuantLinear has no float weight to slice or score"):
        get_supernet(model).extract_model("min")


def test_fused_qa_gradients_match_a_straight_through_reference():
    arch = ARCHS["llama"]
    model = get_peft_model(quantized(arch.build()), qa_config(arch, grouped=False))
    _train(model, arch, steps=2)  # move some codes, so clamping and rounding matter
    sn = get_supernet(model)
    sn.activate("median")
    model.train()
    model.zero_grad()
    model(**arch.batch(1)).loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for module in sn.lora_modules.values():
        module.forward = _ste_reference(module)
    model(**arch.batch(1)).loss.backward()
    params = dict(model.named_parameters())
    assert fused.keys() == {n for n, p in params.items() if p.grad is not None}
    for name, grad in fused.items():
        assert (grad - params[name].grad).abs().max() <= 1e-6, name


def _ste_reference(module):
    def forward(x, *args, **kwargs):
        a, b = module.lora_weights("default")
        base = module.get_base_layer()
        scales = expand_groups(base.scales, base.group_size)
        zeros = expand_groups(base.zeros.float(), base.group_size)
        steps = (b @ a) * module.scaling["default"] * module.base_mask() / scales
        moved = (base.qweight.float() + torch.round(steps)).detach() + (steps - steps.detach())
        return torch.nn.functional.linear(x, (moved.clamp(0, 2**base.bits - 1) - zeros) * scales)

    return forward
