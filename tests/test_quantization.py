"""INT4/INT8 group-wise quantization: the QuantLinear format, RTN, GPTQ, sparse zeros, save/load, peft, errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import ARCHS, VOCAB, fresh, peft_kwargs
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file, save_file

from hf_elastic import ElasticLoraLinear, NLSConfig
from hf_elastic.calibration import Hessian, find_target_modules
from hf_elastic.quantization import (
    QuantizationConfig,
    QuantLinear,
    _inverse_cholesky,
    compute_qparams,
    dequantize_codes,
    expand_groups,
    gptq_quantize,
    load_quantized,
    quantize,
    quantize_codes,
    save_quantized,
)
from hf_elastic.sparsity import sparsify, sparsity_of, weight_masks
from hf_elastic.utils import matches_module

SEQ, SAMPLES = 16, 8


def token_data(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (40,), generator=g) for _ in range(4)]


def run(model, **kwargs):
    kwargs.setdefault("group_size", 16)
    if kwargs.get("method") == "gptq":
        kwargs.setdefault("calibration", token_data())
    return quantize(model, seq_len=SEQ, num_samples=SAMPLES, show_progress=False, **kwargs)


def quant_modules(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def correlated_inputs(tokens: int = 512, dim: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g)
    return torch.randn(tokens, dim, generator=g) @ mix * (torch.rand(dim, generator=g) * 3)


def sparse_weight(rows: int = 32, cols: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.1
    w[torch.rand(rows, cols, generator=g) < 0.5] = 0
    w[:3, :16] = 0  # whole groups of zeros
    return w


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [16, -1])
def test_rtn_codes_in_range_and_error_within_half_a_step(bits, symmetric, group_size):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 24)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g))
        linear.weight[0, 5] = 3.0  # an outlier
    q = QuantLinear.from_linear(linear, bits, group_size, symmetric)
    gs = 64 if group_size == -1 else group_size
    assert (q.bits, q.group_size, q.symmetric, q.in_features, q.out_features) == (bits, gs, symmetric, 64, 24)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (24, 64)
    assert q.scales.dtype == torch.float32 and q.scales.shape == (24, 64 // gs)
    assert q.zeros.dtype == torch.uint8 and q.zeros.shape == (24, 64 // gs)
    assert int(q.qweight.max()) <= 2**bits - 1 and int(q.zeros.max()) <= 2**bits - 1
    if symmetric:
        assert (q.zeros == 2 ** (bits - 1)).all()
    deq = q.dequantize()
    assert torch.equal(deq, (q.qweight.float() - expand_groups(q.zeros, gs).float()) * expand_groups(q.scales, gs))
    bound = expand_groups(q.scales, gs) / 2
    err = (linear.weight - deq).abs()
    assert (err <= bound * (1 + 1e-5)).all()
    assert err.max() > 0.2 * bound.max()  # the bound is not vacuous
    x = torch.randn(3, 64, generator=g)
    assert torch.allclose(q(x), nn.functional.linear(x, deq, linear.bias))
    assert torch.equal(quantize_codes(linear.weight, q.scales, q.zeros, bits, gs), q.qweight)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_zero_weights_get_the_zero_point_rtn_and_gptq(symmetric, bits):
    w = sparse_weight()
    x = correlated_inputs()
    hessian = 2 * x.T @ x / x.shape[0]
    zero_mask = w == 0
    scales, zeros = compute_qparams(w, bits, 16, symmetric)
    rtn = (quantize_codes(w, scales, zeros, bits, 16), scales, zeros)
    gptq = gptq_quantize(w, hessian, bits, 16, symmetric)
    gptq_act = gptq_quantize(w, hessian, bits, 16, symmetric, act_order=True)
    for _, _, _, residual in (gptq, gptq_act):
        assert (residual[zero_mask] == 0).all()
    for codes, s, z in (rtn, gptq[:3], gptq_act[:3]):
        zero_points = expand_groups(z, 16)
        assert torch.equal(codes[zero_mask], zero_points[zero_mask])
        deq = dequantize_codes(codes, s, z, 16)
        assert (deq[zero_mask] == 0).all()
        assert (deq[:3, :16] == 0).all() and (s[:3, 0] > 0).all()
        assert int(codes.max()) <= 2**bits - 1


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_sparse_model_stays_sparse(base, arch, method, symmetric):
    model = fresh(base)
    sparsify(model, "magnitude", pattern="2:4", show_progress=False)
    nonzero = weight_masks(model)
    run(model, method=method, symmetric=symmetric)
    for name, module in quant_modules(model).items():
        mask = ~nonzero[name]
        assert torch.equal(module.qweight[mask], expand_groups(module.zeros, module.group_size)[mask]), name
        assert (module.dequantize()[mask] == 0).all(), name
    after = weight_masks(model)
    assert after.keys() == nonzero.keys()
    assert not any((after[n] & ~nonzero[n]).any() for n in nonzero)
    report = sparsity_of(model, "2:4")
    assert report.nm_valid is True and report.total_sparsity >= 0.5


def _naive_gptq(w, hessian, bits, group_size, symmetric, damp=0.01):
    """Column-by-column GPTQ with no lazy blocks, the textbook form, for comparison."""
    w = w.clone()
    pruned = w == 0
    upper = _inverse_cholesky(hessian.clone(), damp)
    codes = torch.empty_like(w, dtype=torch.uint8)
    for col in range(w.shape[1]):
        if col % group_size == 0:
            s, z = compute_qparams(w[:, col : col + group_size], bits, group_size, symmetric)
        q = torch.clamp(torch.round(w[:, col] / s[:, 0]) + z[:, 0].float(), 0, 2**bits - 1)
        codes[:, col] = q.to(torch.uint8)
        err = (w[:, col] - (q - z[:, 0].float()) * s[:, 0]) / upper[col, col]
        w[:, col + 1 :] -= err[:, None] * upper[col, col + 1 :][None, :]
        w[:, col + 1 :][pruned[:, col + 1 :]] = 0
    return codes


@pytest.mark.parametrize(("group_size", "block_size"), [(16, 128), (16, 8), (32, 24), (-1, 16)])
def test_gptq_blocks_match_the_column_by_column_algorithm(group_size, block_size):
    w, x = sparse_weight(), correlated_inputs()
    hessian = 2 * x.T @ x / x.shape[0]
    codes = gptq_quantize(w, hessian, 4, group_size, block_size=block_size)[0]
    reference = _naive_gptq(w, hessian, 4, 64 if group_size == -1 else group_size, False)
    assert (codes == reference).float().mean() > 0.995


@pytest.mark.parametrize(("bits", "symmetric", "act_order"), [(4, False, False), (4, True, False), (8, False, True)])
def test_gptq_has_lower_output_error_than_rtn(bits, symmetric, act_order):
    x = correlated_inputs()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g) * 0.1
    hessian = Hessian(64)
    for chunk in x.split(100):
        hessian.update(chunk)
    assert torch.allclose(hessian.hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    codes, scales, zeros, _ = gptq_quantize(w, hessian.hessian, bits, 16, symmetric, act_order=act_order)
    s, z = compute_qparams(w, bits, 16, symmetric)
    rtn = dequantize_codes(quantize_codes(w, s, z, bits, 16), s, z, 16)
    gptq = dequantize_codes(codes, scales, zeros, 16)

    def out_err(approx):
        return float((x @ (w - approx).T).norm() / (x @ w.T).norm())

    assert out_err(gptq) < 0.85 * out_err(rtn)
    # GPTQ trades weight error for output error.
    assert (w - gptq).norm() > (w - rtn).norm()


def test_gptq_model_report_beats_rtn_on_the_first_layer():
    base = ARCHS["llama"].build()
    rtn, gptq = fresh(base), fresh(base)
    r = run(rtn, method="rtn", calibration=token_data())
    g = run(gptq, method="gptq")
    assert r.num_calibration_samples == g.num_calibration_samples == SAMPLES
    first = [m for m in g.modules if ".layers.0." in m.name]
    rtn_errors = {m.name: m.output_error for m in r.modules}
    assert len(first) == 7
    assert all(m.output_error < rtn_errors[m.name] for m in first)
    assert g.mean_output_error < r.mean_output_error
    assert "GPTQ INT4, group_size=16" in str(g)


def test_quantized_model_close_to_float(base, arch):
    batch = {"input_ids": arch.batch()["input_ids"]}
    reference = base(**batch).logits
    for bits, tolerance in ((8, 0.01), (4, 0.1)):
        model = fresh(base)
        report = run(model, bits=bits)
        n_linear = sum(len(t.modules) for t in find_target_modules(base))
        assert len(quant_modules(model)) == len(report.modules) == n_linear
        err = (model(**batch).logits - reference).norm() / reference.norm()
        assert err < tolerance, (bits, float(err))
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    head = model.get_output_embeddings()
    assert head is None or isinstance(head, nn.Linear)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_save_load_round_trip_is_bit_exact(base, arch, method, tmp_path):
    model = fresh(base)
    keep_residual = method == "gptq"
    run(model, method=method, symmetric=arch.name == "bert", keep_residual=keep_residual)
    save_quantized(model, tmp_path)
    qc = json.loads((tmp_path / "quantization_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["method"], qc["dtype"]) == (4, 16, method, "float32")
    assert sorted(qc["modules"]) == sorted(quant_modules(model))
    loaded = load_quantized(tmp_path)
    before, after = quant_modules(model), quant_modules(loaded)
    assert before.keys() == after.keys()
    for name, module in before.items():
        assert (module.residual is not None) is keep_residual and (after[name].residual is not None) is keep_residual
        for buffer in ("qweight", "scales", "zeros") + (("residual",) if keep_residual else ()):
            assert torch.equal(getattr(module, buffer), getattr(after[name], buffer)), (name, buffer)
    batch = arch.batch()
    assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert loaded.hf_elastic_quantization == model.hf_elastic_quantization


def test_dtype_of_unquantized_parts_is_kept(tmp_path):
    arch = ARCHS["gpt2"]
    model = arch.build()
    run(model)
    model.to(torch.bfloat16)
    module = quant_modules(model)["transformer.h.0.attn.c_attn"]
    assert module.scales.dtype == torch.float32 and module.qweight.dtype == torch.uint8
    assert module.bias.dtype == torch.bfloat16
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.get_input_embeddings().weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert quant_modules(loaded)["transformer.h.0.attn.c_attn"].scales.dtype == torch.float32
    ids = arch.batch()["input_ids"]
    out = loaded(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and torch.equal(out, model(input_ids=ids).logits)


def test_peft_lora_wraps_quantlinear(base, arch):
    model = fresh(base)
    run(model)
    batch = arch.batch()
    reference = model(**batch).logits
    quantized = list(quant_modules(model))
    config = LoraConfig(**peft_kwargs(arch, r=4, fan_in_fan_out=False))
    config._register_custom_module({QuantLinear: LoraLinear})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model = get_peft_model(model, config)
    wrapped = [m for m in peft_model.modules() if isinstance(m, LoraLinear) and isinstance(m.base_layer, QuantLinear)]
    targeted = [n for n in quantized if any(matches_module(n, t) for t in arch.targets)]
    assert len(wrapped) == len(targeted) > 0
    assert all(
        (m.in_features, m.out_features) == (m.base_layer.in_features, m.base_layer.out_features) for m in wrapped
    )
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.allclose(peft_model(**batch).logits, reference, atol=1e-6)
    peft_model(**batch).loss.backward()
    assert all(m.lora_B["default"].weight.grad.abs().sum() > 0 for m in wrapped)


def test_elastic_lora_wraps_quantlinear():
    arch = ARCHS["llama"]
    model = arch.build()
    run(model)
    reference = model(**arch.batch()).logits
    config = NLSConfig(**peft_kwargs(arch, r=8, rank_choices=[8, 4]))
    config._register_custom_module({QuantLinear: ElasticLoraLinear})
    peft_model = get_peft_model(model, config)
    layers = [m for m in peft_model.modules() if isinstance(m, ElasticLoraLinear)]
    assert len(layers) == 14 and all(isinstance(m.base_layer, QuantLinear) for m in layers)
    assert torch.allclose(peft_model(**arch.batch()).logits, reference, atol=1e-6)
    peft_model(**arch.batch()).loss.backward()
    assert all(m.lora_B["default"].weight.grad is not None for m in layers)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 3}, r"QuantizationConfig.bits=3 is not supported. Use bits=4 or bits=8"),
        ({"group_size": 0}, r"QuantizationConfig.group_size=0 is invalid"),
        ({"method": "awq"}, r"QuantizationConfig.method='awq' is not supported"),
        ({"damp_percent": 0.0}, r"QuantizationConfig.damp_percent=0.0 is outside \(0, 1\]"),
        ({"block_size": 0}, r"QuantizationConfig.block_size must be a positive integer, got 0"),
        ({"keep_residual": "yes"}, r"QuantizationConfig.keep_residual must be True or False, got 'yes'"),
        ({"seq_len": 0}, r"QuantizationConfig.seq_len must be a positive integer or None, got 0"),
        ({"modules": []}, r"QuantizationConfig.modules is empty. Pass None to quantize every linear layer"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_size": 5}, r"group_size=5 does not divide in_features=32 of model.layers.0.self_attn.q_proj"),
        ({"method": "gptq", "calibration": None}, r"method='gptq' needs calibration data: pass calibration="),
        ({"method": "gptq", "calibration": []}, r"calibration data is empty"),
        ({"method": "gptq", "calibration": [torch.tensor([1, 500])]}, r"token id 500 is outside the model's voc"),
        ({"bits": 3}, r"bits=3 is not supported"),
    ],
)
def test_quantize_errors_leave_the_model_alone(kwargs, message):
    model = ARCHS["llama"].build()
    with pytest.raises(ValueError, match=message):
        run(model, **kwargs)
    assert not quant_modules(model)


def test_quantlinear_errors():
    with pytest.raises(ValueError, match=r"QuantLinear.bits=2 is not supported"):
        QuantLinear(32, 8, bits=2)
    with pytest.raises(ValueError, match=r"group_size=5 does not divide in_features=32"):
        QuantLinear(32, 8, group_size=5)
    q = QuantLinear(32, 8, group_size=16)
    with pytest.raises(ValueError, match=r"QuantLinear.scales must have shape \(8, 2\) .* got \(8, 4\)"):
        q.set_quantized(q.qweight, torch.ones(8, 4), q.zeros)
    with pytest.raises(ValueError, match=r"QuantLinear.residual must be int8, got torch.float32"):
        q.set_quantized(q.qweight, q.scales, q.zeros, torch.zeros(8, 32))
    with pytest.raises(ValueError, match=r"codes and zero points must lie in \[0, 15\]"):
        q.set_quantized(torch.full((8, 32), 16, dtype=torch.uint8), q.scales, q.zeros)
    with pytest.raises(TypeError, match=r"needs an nn.Linear or Conv1D, got Embedding"):
        QuantLinear.from_linear(nn.Embedding(4, 4))
    with pytest.raises(ValueError, match=r"found no QuantLinear in the model. Call quantize"):
        save_quantized(ARCHS["llama"].build(), "unused")


def test_load_errors(tmp_path):
    model = ARCHS["llama"].build()
    run(model)
    save_quantized(model, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No quantization_config.json in .*not written by save_quantized"):
        load_quantized(tmp_path / "missing")
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.scales"
    tensors[key] = torch.ones(32, 4)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{key} in model.safetensors is torch.float32 \(32, 4\), but .* needs "):
        load_quantized(tmp_path)
