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
from hf_elastic.nls.layer import _moved_codes
from hf_elastic.quantization import QuantLinear, expand_groups, quantize


def quantized(base: torch.nn.Module, bits: int = 4, keep_residual: bool = True) -> torch.nn.Module:
    model = pruned(base)
    quantize(model, bits=bits, group_size=16, keep_residual=keep_residual, show_progress=False)
    return model


def codes(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {n.removesuffix(".base_layer"): m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def qa_config(arch, grouped: bool, **extra) -> NLSConfig:
    kwargs = peft_kwargs(
        arch, **({"sparse_adapter": True, "quantization_aware": True, "init_lora_weights": False} | extra)
    )
    kwargs.pop("fan_in_fan_out", None)  # a quantized Conv1D is stored as (out, in)
    if arch.name == "bert":
        kwargs["exclude_modules"] = ["pooler.dense"]  # quantize() leaves modules outside the encoder layers alone
    if grouped:
        return NLSConfig(rank_choices=[8, 4, 2], rank_groups=arch.rank_groups, **kwargs)
    return NLSConfig(rank_choices=[8, 6, 4], **kwargs)


@pytest.mark.filterwarnings("ignore:quantization_aware=True on a base quantized without its rounding residual")
@pytest.mark.parametrize("keep_residual", [True, False], ids=["residual", "codes-only"])
@pytest.mark.parametrize("grouped", [False, True])
def test_merged_int4_codes_reproduce_the_fake_quant_forward(arch, base, grouped, keep_residual):
    q_base = quantized(base, keep_residual=keep_residual)
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
            assert module.residual is None  # it described the unmerged codes
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
    originals = {k: (m.qweight.clone(), m.residual.clone()) for k, m in codes(model).items()}
    batch = arch.batch(4)
    with torch.no_grad():
        expected = model(**batch).logits
        model.merge_adapter()
        assert torch.equal(model(**batch).logits, expected)
        assert any(not torch.equal(m.qweight, originals[k][0]) for k, m in codes(model).items())
        assert all(m.residual is None for m in codes(model).values())
        model.unmerge_adapter()
        assert torch.equal(model(**batch).logits, expected)
    for key, module in codes(model).items():
        assert torch.equal(module.qweight, originals[key][0]) and torch.equal(module.residual, originals[key][1])


def test_residual_makes_the_grid_forward_that_of_the_float_weights():
    """With the residual, the codes move as `round(W / s + z + delta / s)` of the float weights (SQFT's forward): they
    differ only where that value lies within the residual's resolution (1/508 of a step) of a rounding boundary."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16, bias=False)
    q = QuantLinear.from_linear(linear, 4, 16, residual=True)
    scales = expand_groups(q.scales, 16)
    zeros = expand_groups(q.zeros.float(), 16)
    assert q.residual.dtype == torch.int8 and int(q.residual.abs().max()) <= 127
    assert torch.equal(torch.round(q.qweight.float() + q.residual.float() / 254), q.qweight.float())
    grid = (q.qweight, q.scales[..., None], q.zeros.float()[..., None], 15, q.residual)
    exact = linear.weight.detach() / scales + zeros
    checked = 0
    for size in (0.05, 0.45, 2.0):
        delta = (2 * torch.rand(16, 64) - 1) * size * scales
        got = _moved_codes(grid, delta).reshape(16, 64)
        target = exact + delta / scales
        near = ((target - target.floor()) - 0.5).abs() < 1 / 254
        assert torch.equal(got[~near], torch.round(target)[~near])
        checked += int((~near).sum())
        codes_only = _moved_codes(grid[:4] + (None,), delta).reshape(16, 64)
        if size < 0.5:
            assert torch.equal(codes_only, q.qweight.float())  # below half a step nothing moves without it
            assert (got != q.qweight.float()).any()
    assert checked > 0.95 * 3 * 16 * 64


def test_untrained_qa_adapter_is_the_quantized_base_exactly():
    arch = ARCHS["llama"]
    q_base = quantized(arch.build())
    batch = arch.batch(4)
    with torch.no_grad():
        expected = q_base.eval()(**batch).logits
        model = get_peft_model(copy.deepcopy(q_base), qa_config(arch, grouped=False, init_lora_weights=True)).eval()
        assert torch.equal(model(**batch).logits, expected)  # |residual| < 1/2 step: B = 0 moves no code


def test_qa_without_residual_warns():
    arch = ARCHS["llama"]
    with pytest.warns(UserWarning, match=r"without its rounding residual.*keep_residual=True"):
        get_peft_model(quantized(arch.build(), keep_residual=False), qa_config(arch, grouped=False))


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
        steps = (b @ a) * module.scaling["default"] * module.base_mask() / scales + base.residual.float() / 254
        moved = (base.qweight.float() + torch.round(steps)).detach() + (steps - steps.detach())
        return torch.nn.functional.linear(x, (moved.clamp(0, 2**base.bits - 1) - zeros) * scales)

    return forward
