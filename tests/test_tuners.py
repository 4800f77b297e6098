"""SparsePEFT and QA-SparsePEFT adapters: masked merges, INT4 codes and their gradients."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    ARCHS,
    METHODS,
    fresh,
    make_config,
    peft_kwargs,
    pruned,
    qa_config,
    quantized,
    subnets,
    train_steps,
)
from peft import LoraConfig, PeftModel, get_peft_model

from hf_elastic import ElasticLoraConfig, NLSConfig, get_supernet, load_super_network, merge_subnet_adapter
from hf_elastic.compression.quantization import QuantLinear, expand_groups
from hf_elastic.models.arch import base_layer, weight_out_in
from hf_elastic.tuners.nls.layer import ElasticLoraLinear, _moved_codes

# ---------------------------------------------------------------------------------------------------- sparse_peft


def zero_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: weight_out_in(m) == 0
        for name, m in model.named_modules()
        if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and "lora_" not in name
    }


@pytest.mark.parametrize("method", METHODS)
def test_merge_keeps_every_zero_and_the_output(arch, base, method):
    sparse = pruned(base)
    before = {k.removesuffix(".base_layer"): v for k, v in zero_masks(sparse).items()}
    model = get_peft_model(fresh(sparse), make_config(method, arch, sparse_adapter=True, init_lora_weights=False))
    sn = get_supernet(model)
    for config in subnets(sn)[:3]:
        sn.activate(config)
        train_steps(model, arch, steps=2)
    batch = arch.batch(7)
    for config in subnets(sn):
        sn.activate(config)
        with torch.no_grad():
            expected = model(**batch).logits
        full = copy.deepcopy(model)
        get_supernet(full).remove_hooks()
        after = zero_masks(full.merge_and_unload())
        assert after.keys() == before.keys()
        assert all(torch.equal(after[name], before[name]) for name in before)
        with torch.no_grad():
            assert (sn.extract_model(config)(**batch).logits - expected).abs().max() <= 1e-5


def test_in_place_merge_and_unmerge_are_exact(arch, base):
    model = get_peft_model(pruned(base), make_config("nls", arch, sparse_adapter=True, init_lora_weights=False))
    train_steps(model, arch, steps=2)
    sn = get_supernet(model)
    sn.activate("min")
    batch = arch.batch(3)
    weights = {k: base_layer(m).weight.detach().clone() for k, m in sn.lora_modules.items()}
    with torch.no_grad():
        expected = model(**batch).logits
        model.merge_adapter()
        assert (model(**batch).logits - expected).abs().max() <= 1e-5
        for key, module in sn.lora_modules.items():
            w = base_layer(module).weight
            assert torch.equal(w == 0, weights[key] == 0), key
            assert not torch.equal(w, weights[key]), key
        model.unmerge_adapter()
    assert all((base_layer(m).weight - weights[k]).abs().max() <= 1e-6 for k, m in sn.lora_modules.items())


def test_fused_gradients_match_autograd(arch, base):
    model = get_peft_model(pruned(base), make_config("nls", arch, sparse_adapter=True, init_lora_weights=False))
    sn = get_supernet(model)
    sn.activate("median")
    model.train()
    model(**arch.batch()).loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # reference: the same masked delta through plain autograd, as a dense weight
    for module in sn.lora_modules.values():
        module.forward = _reference_forward(module)
    model(**arch.batch()).loss.backward()
    assert fused.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in fused.items():
        assert (grad - dict(model.named_parameters())[name].grad).abs().max() <= 1e-5, name


def _reference_forward(module: ElasticLoraLinear):
    def forward(x, *args, **kwargs):
        a, b = module.lora_weights("default")
        delta = (b @ a) * module.scaling["default"] * module.base_mask()
        return module.base_layer(x) + torch.nn.functional.linear(x, delta)

    return forward


def test_dropout_path_keeps_the_mask(arch, base):
    model = get_peft_model(
        pruned(base), make_config("nls", arch, sparse_adapter=True, init_lora_weights=False, lora_dropout=0.1)
    )
    model.train()
    model(**arch.batch()).loss.backward()
    for module in get_supernet(model).lora_modules.values():
        a = module.lora_A["default"].weight
        assert a.grad is not None and torch.isfinite(a.grad).all()


def test_dense_base_warns(base, arch):
    with pytest.warns(UserWarning, match="sparse_adapter=True, but a targeted base weight has no zeros"):
        get_peft_model(fresh(base), make_config("nls", arch, sparse_adapter=True))


def test_saved_adapter_checks_the_base_and_subadapters_merge_masked(tmp_path):
    arch = ARCHS["llama"]
    sparse = pruned(arch.build())
    model = get_peft_model(fresh(sparse), make_config("nls", arch, sparse_adapter=True, init_lora_weights=False))
    train_steps(model, arch, steps=2)
    sn = get_supernet(model)
    record = model.peft_config["default"].base_sparsity
    assert sum(record["zeros"].values()) == sum(int(m.sum()) for m in zero_masks(sparse).values() if m.any())
    model.save_pretrained(tmp_path / "super")
    assert json.loads((tmp_path / "super" / "elastic_config.json").read_text())["base_sparsity"] == record
    load_super_network(fresh(sparse), tmp_path / "super")  # same base: accepted

    other = pruned(arch.build())
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight[0, :2] = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match=r"trained on a base with another zero pattern: .*(zeros here|positions)"):
        load_super_network(other, tmp_path / "super")
    with pytest.raises(ValueError, match=r"module 'model.layers.0.mlp.down_proj' has 0 zeros here but 768 in"):
        load_super_network(arch.build(), tmp_path / "super")

    sn.activate("min")
    batch = arch.batch(5)
    with torch.no_grad():
        expected = model(**batch).logits
    sn.extract_adapter("min", tmp_path / "sub")
    info = json.loads((tmp_path / "sub" / "elastic_subnet.json").read_text())
    assert info["sparse_adapter"] is True and info["quantization_aware"] is False
    merged = merge_subnet_adapter(fresh(sparse), tmp_path / "sub")
    assert all(torch.equal(zero_masks(merged)[k], m) for k, m in zero_masks(sparse).items())
    with torch.no_grad():
        assert (merged(**batch).logits - expected).abs().max() <= 1e-5
    # stock peft refuses both folders with an error naming the hf_elastic loader
    with pytest.raises(ValueError, match=r"hf_elastic sparse adapter: load it with hf_elastic.merge_subnet_adapter"):
        PeftModel.from_pretrained(fresh(sparse), str(tmp_path / "sub"))
    with pytest.raises(ValueError, match=r"sparse super-adapter: load it with hf_elastic.load_super_network"):
        PeftModel.from_pretrained(fresh(sparse), str(tmp_path / "super"))
    targets = json.loads((tmp_path / "super" / "elastic_config.json").read_text())["target_modules"]
    assert targets == sorted(make_config("nls", arch).target_modules) == info["target_modules"]
    # the documented approximation: stock peft with the real target modules does not mask, unmerged or merged
    approx_config = LoraConfig.from_pretrained(str(tmp_path / "sub"))
    approx_config.target_modules = set(info["target_modules"])
    approx = PeftModel.from_pretrained(fresh(sparse), str(tmp_path / "sub"), config=approx_config)
    with torch.no_grad():
        assert (approx(**batch).logits - expected).abs().max() > 1e-3
    q = approx.merge_and_unload().model.layers[0].self_attn.q_proj.weight
    assert (q == 0).sum() < (sparse.model.layers[0].self_attn.q_proj.weight == 0).sum()


# ---------------------------------------------------------------------------------------------------- qa_sparse_peft


def codes(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {n.removesuffix(".base_layer"): m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


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
        train_steps(model, arch, steps=2)
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
    grids = (".scales", ".zeros", ".residual")  # a quantized weight counts once, by its code
    stored = sum(p.numel() for n, p in merged.named_parameters() if not n.endswith(grids))
    assert sn.count("median")["base_params"] == stored
    with torch.no_grad():
        assert torch.equal(merged(**arch.batch(2)).logits, model.eval()(**arch.batch(2)).logits)


def test_in_place_merge_unmerge_restores_codes():
    arch = ARCHS["llama"]
    model = get_peft_model(quantized(arch.build()), qa_config(arch, grouped=False))
    train_steps(model, arch, steps=2)
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
    train_steps(model, arch, steps=2)  # move some codes, so clamping and rounding matter
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
