"""Calibration, Wanda/magnitude sparsity and INT4/INT8 quantization of the base model."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import ARCHS, VOCAB, fresh, peft_kwargs, random_llama
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_elastic import ElasticLoraLinear, NLSConfig, QuantizationConfig, load_quantized, quantize, save_quantized
from hf_elastic.compression.calibration import Hessian, find_target_modules, prepare_calibration
from hf_elastic.compression.quantization import (
    QuantLinear,
    compute_qparams,
    default_group_size,
    dequantize_codes,
    expand_groups,
    quantize_codes,
)
from hf_elastic.compression.quantization.gptq import _inverse_cholesky, gptq_quantize
from hf_elastic.compression.sparsity import SparsityConfig, nm_valid, prune_mask, sparsify, sparsity_of, weight_masks
from hf_elastic.models import weight_out_in
from hf_elastic.utils import matches_module

# ---------------------------------------------------------------------------------------------------- sparsity
SEQ, SAMPLES = 16, 8


def token_data(seed: int = 0, rows: int = 4, length: int = 40) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (length,), generator=g) for _ in range(rows)]


def word_tokenizer(size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: weight_out_in(m).detach().clone() for t in find_target_modules(model) for n, m in t.modules.items()}


def run_sparsify(model, **kwargs):
    kwargs.setdefault("seq_len", SEQ)
    kwargs.setdefault("num_samples", SAMPLES)
    if kwargs.get("method", "wanda") == "wanda":
        kwargs.setdefault("calibration", token_data())
    return sparsify(model, show_progress=False, **kwargs)


@pytest.mark.parametrize(("method", "sparsity"), [("wanda", 0.5), ("magnitude", 0.3), ("wanda", 0.7)])
def test_exact_target_per_row(base, arch, method, sparsity):
    model = fresh(base)
    report = run_sparsify(model, method=method, sparsity=sparsity)
    weights = targets(model)
    assert len(weights) == len(report.modules) > 0
    for name, w in weights.items():
        expected = round(sparsity * w.shape[1])
        assert ((w == 0).sum(1) == expected).all(), name
    assert report.total_sparsity == pytest.approx(sum((w == 0).sum().item() for w in weights.values()) / report.numel)
    assert all(m.min_row_zeros == m.max_row_zeros == round(sparsity * m.shape[1]) for m in report.modules)
    logits = model(**arch.batch()).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_exact_nm_pattern(base, arch, pattern):
    model = fresh(base)
    n, m = map(int, pattern.split(":"))
    report = run_sparsify(model, pattern=pattern)
    for name, w in targets(model).items():
        kept = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (kept == n).all(), name
        assert nm_valid(w, n, m)
    assert report.nm_valid is True
    assert report.total_sparsity == pytest.approx(1 - n / m)
    assert report.config.sparsity == pytest.approx(1 - n / m)


def test_embeddings_and_head_untouched(base, arch):
    model = fresh(base)
    run_sparsify(model, method="magnitude", sparsity=0.5)
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb, base.get_input_embeddings().weight)
    head = model.get_output_embeddings()
    if head is not None:
        assert torch.equal(head.weight, base.get_output_embeddings().weight)


def _captured_inputs(model, ids, modules):
    """Inputs of `modules` when the model runs on `ids`, as (tokens, in) tensors."""
    seen, handles = {}, []
    for name, module in modules.items():
        handles.append(
            module.register_forward_pre_hook(
                lambda m, a, name=name: seen.__setitem__(name, a[0].reshape(-1, a[0].shape[-1]))
            )
        )
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


def test_wanda_is_sequential_on_pruned_outputs(base, arch):
    """Layer k is scored on the outputs of the already pruned layers 0..k-1 (all modules of a layer at once)."""
    model = fresh(base)
    data = token_data()
    run_sparsify(model, calibration=data, sparsity=0.5)
    pruned = targets(model)
    ids = prepare_calibration(data, seq_len=SEQ, num_samples=SAMPLES)
    layers = find_target_modules(model)
    originals = find_target_modules(base)
    for k, layer in enumerate(layers):
        # The model as the runner saw it when scoring layer k: layers < k pruned, layers >= k original.
        probe = fresh(model)
        probe_layers = find_target_modules(probe)
        for later, orig in zip(probe_layers[k:], originals[k:], strict=True):
            for name, module in later.modules.items():
                weight_out_in(module).data.copy_(weight_out_in(orig.modules[name]))
        inputs = _captured_inputs(probe, ids, probe_layers[k].modules)
        for name in layer.modules:
            w = weight_out_in(originals[k].modules[name]).detach()
            score = w.abs() * inputs[name].float().pow(2).sum(0).sqrt()
            keep = score.topk(w.shape[1] - round(0.5 * w.shape[1]), dim=1).indices
            expected = torch.zeros_like(w, dtype=torch.bool).scatter_(1, keep, True)
            assert torch.equal(pruned[name] != 0, expected), name


def test_wanda_keeps_weights_of_loud_channels_that_magnitude_drops():
    arch = ARCHS["llama"]
    base = arch.build()
    channel = 5
    with torch.no_grad():
        base.model.layers[0].input_layernorm.weight[channel] *= 1e4
    wanda, magnitude = fresh(base), fresh(base)
    run_sparsify(wanda, sparsity=0.5)
    run_sparsify(magnitude, method="magnitude", sparsity=0.5)
    for proj in ("q_proj", "k_proj", "v_proj"):
        w_wanda = getattr(wanda.model.layers[0].self_attn, proj).weight[:, channel]
        w_mag = getattr(magnitude.model.layers[0].self_attn, proj).weight[:, channel]
        assert (w_wanda != 0).all(), proj
        assert (w_mag == 0).sum() >= 0.25 * w_mag.numel(), proj
    # Channels without the boost are pruned the same way by both methods only by chance.
    assert not torch.equal(
        wanda.model.layers[0].self_attn.q_proj.weight, magnitude.model.layers[0].self_attn.q_proj.weight
    )


def test_reproducible_and_data_dependent():
    base = ARCHS["qwen2"].build()
    first, second, other = fresh(base), fresh(base), fresh(base)
    run_sparsify(first, calibration=token_data(0), pattern="2:4")
    run_sparsify(second, calibration=token_data(0), pattern="2:4")
    run_sparsify(other, calibration=token_data(1), pattern="2:4")
    a, b, c = targets(first), targets(second), targets(other)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n] != 0, c[n] != 0) for n in a)


def test_prune_mask_ties_are_stable():
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 0.5]])
    assert prune_mask(score, 0.5).tolist() == [[True, True, False, False, False, True]]
    score = torch.tensor([[3.0, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 0.0]])
    assert prune_mask(score, 0.5, (2, 4)).tolist() == [[True, True, False, False, True, False, False, True]]


def test_save_pretrained_reloads_the_same_zeros(base, arch, tmp_path):
    model = fresh(base)
    report = run_sparsify(model, pattern="2:4")
    model.save_pretrained(tmp_path)
    path = report.save(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = type(model).from_pretrained(tmp_path).eval()
    before, after = targets(model), targets(loaded)
    assert all(torch.equal(before[n], after[n]) for n in before)
    saved = json.loads(path.read_text())
    assert saved["sparsity"] == pytest.approx(0.5)
    assert saved["nm_valid"] is True
    assert set(saved["modules"]) == set(before)
    assert sparsity_of(loaded, "2:4").nm_valid is True
    batch = arch.batch()
    assert torch.allclose(model(**batch).logits, loaded(**batch).logits, atol=1e-6)


def test_calibration_formats_agree():
    model = ARCHS["llama"].build()
    tokenizer = word_tokenizer(VOCAB)
    rows = [" ".join(f"w{int(t)}" for t in row) for row in token_data()]
    ids = [tokenizer(r)["input_ids"] for r in rows]
    expected = prepare_calibration(token_data(), seq_len=SEQ, num_samples=SAMPLES)
    assert expected.shape == (SAMPLES, SEQ)
    for data, tok in [
        (rows, tokenizer),
        (Dataset.from_dict({"text": rows}), tokenizer),
        (Dataset.from_dict({"input_ids": ids}), None),
        (torch.stack(token_data()), None),
    ]:
        assert torch.equal(prepare_calibration(data, tok, seq_len=SEQ, num_samples=SAMPLES), expected)
    short = prepare_calibration([torch.arange(1, 6)], seq_len=SEQ)
    assert short.tolist() == [[1, 2, 3, 4, 5]]
    a, b = fresh(model), fresh(model)
    run_sparsify(a, calibration=Dataset.from_dict({"text": rows}), tokenizer=tokenizer)
    run_sparsify(b, calibration=token_data())
    assert all(torch.equal(x, y) for x, y in zip(targets(a).values(), targets(b).values(), strict=True))


def test_modules_selects_a_subset():
    model = ARCHS["llama"].build()
    report = run_sparsify(model, method="magnitude", modules=["down_proj", "self_attn.q_proj"])
    assert sorted(m.name.split(".", 3)[-1] for m in report.modules) == [
        "mlp.down_proj",
        "mlp.down_proj",
        "self_attn.q_proj",
        "self_attn.q_proj",
    ]
    assert model.model.layers[0].self_attn.k_proj.weight.count_nonzero() == 32 * 16
    assert "total" in str(report) and "q_proj" in str(report)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"SparsityConfig.sparsity=1.0 is outside \[0, 1\)"),
        ({"sparsity": -0.1}, r"SparsityConfig.sparsity=-0.1 is outside \[0, 1\)"),
        ({"pattern": "4:4"}, r"pattern='4:4' needs 0 < N < M .* got N=4, M=4"),
        ({"pattern": "5:4"}, r"pattern='5:4' needs 0 < N < M"),
        ({"pattern": "0:4"}, r"pattern='0:4' needs 0 < N < M"),
        ({"pattern": "2/4"}, r"pattern='2/4' is not a sparsity pattern. Use 'unstructured' or 'N:M'"),
        ({"pattern": "2:4", "sparsity": 0.7}, r"sparsity=0.7 contradicts pattern='2:4', which removes 0.5"),
        ({"method": "sparsegpt"}, r"SparsityConfig.method='sparsegpt' is not supported. Use one of"),
        ({"num_samples": 0}, r"SparsityConfig.num_samples must be a positive integer, got 0"),
        ({"modules": []}, r"SparsityConfig.modules is empty. Pass None to prune every linear layer"),
        ({"seq_len": True}, r"SparsityConfig.seq_len must be a positive integer or None, got True"),
    ],
)
def test_sparsity_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparsityConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "3:6"}, r"M=6 does not divide in_features=32 of model.layers.0.self_attn.q_proj"),
        ({"calibration": []}, r"calibration data is empty \(0 tokens\)"),
        ({"calibration": None}, r"method='wanda' needs calibration data: pass calibration="),
        ({"calibration": [torch.tensor([3, 96, 5])]}, r"token id 96 is outside the model's vocabulary \[0, 96\)"),
        ({"calibration": ["w1 w2"]}, r"holds text but no tokenizer was given. Pass tokenizer="),
        (
            {"calibration": Dataset.from_dict({"body": ["x"]})},
            r"needs an 'input_ids' or a 'text' column, got \['body'\]",
        ),
        ({"seq_len": 65}, r"seq_len=65 exceeds the model's 64 positions. Pass seq_len <= 64"),
        ({"modules": ["nope"]}, r"\['nope'\] match no linear module inside the transformer layers"),
    ],
)
def test_sparsify_errors(kwargs, message):
    model = ARCHS["llama"].build()
    before = targets(model)
    kwargs = {"calibration": token_data()} | kwargs
    with pytest.raises(ValueError, match=message):
        sparsify(model, seq_len=kwargs.pop("seq_len", SEQ), show_progress=False, **kwargs)
    assert all(torch.equal(before[n], w) for n, w in targets(model).items())


def test_wrong_tokenizer_is_named():
    model = ARCHS["llama"].build()
    with pytest.raises(ValueError, match=r"token id 150 is outside .* tokenized with a different tokenizer"):
        run_sparsify(model, calibration=["w3 w150 w7"], tokenizer=word_tokenizer(200))


# ---------------------------------------------------------------------------------------------------- quantization
SEQ, SAMPLES = 16, 8


def run_quantize(model, **kwargs):
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
    run_quantize(model, method=method, symmetric=symmetric)
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
    r = run_quantize(rtn, method="rtn", calibration=token_data())
    g = run_quantize(gptq, method="gptq")
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
        report = run_quantize(model, bits=bits)
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
    run_quantize(model, method=method, symmetric=arch.name == "bert", keep_residual=keep_residual)
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
    run_quantize(model)
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
    run_quantize(model)
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
    run_quantize(model)
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
def test_quantization_config_errors(kwargs, message):
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
        ({"group_size": None}, r"None of 128/64/32 divides every input size \[32, 48\], so group_size has no default"),
    ],
)
def test_quantize_errors_leave_the_model_alone(kwargs, message):
    model = ARCHS["llama"].build()
    with pytest.raises(ValueError, match=message):
        run_quantize(model, **kwargs)
    assert not quant_modules(model)


def test_default_group_size_is_the_largest_of_128_64_32_that_divides(caplog, tmp_path):
    assert default_group_size([576, 1536]) == 64  # SmolLM2-135M: hidden 576, FFN 1536
    assert default_group_size([96, 192]) == 32
    assert default_group_size([2048, 8192]) == 128
    model = random_llama(VOCAB, hidden_size=96, intermediate_size=192)
    with caplog.at_level(logging.INFO, logger="hf_elastic"):
        report = quantize(model, bits=4, show_progress=False)
    assert report.config.group_size == 32 and {m.group_size for m in report.modules} == {32}
    assert "group size 32: the largest of 128/64/32 that divides every quantized input size" in caplog.text
    save_quantized(model, tmp_path)
    assert json.loads((tmp_path / "quantization_config.json").read_text())["group_size"] == 32
    # stock transformers refuses the folder with an error naming the hf_elastic loader, by either route
    with pytest.raises(ValueError, match=r"type `llama \(hf_elastic INT4 format: load it with hf_elastic.load_exp"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"quantization config from the arguments has no `quant_method`"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    reloaded = load_quantized(tmp_path)
    assert reloaded.config.model_type == "llama" and not hasattr(reloaded.config, "hf_elastic_only")
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


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
    run_quantize(model)
    save_quantized(model, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No quantization_config.json in .*not written by save_quantized"):
        load_quantized(tmp_path / "missing")
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.scales"
    tensors[key] = torch.ones(32, 4)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{key} in model.safetensors is torch.float32 \(32, 4\), but .* needs "):
        load_quantized(tmp_path)


def _edit_quant_config(change):
    def edit(folder):
        data = json.loads((folder / "quantization_config.json").read_text())
        (folder / "quantization_config.json").write_text(json.dumps(change(data)))

    return edit


def _set_bits(bits):
    def change(data):
        for spec in data["modules"].values():
            spec["bits"] = bits
        return data | {"bits": bits}

    return change


INT4_DAMAGE = {
    "weights missing": (
        lambda f: (f / "model.safetensors").unlink(),
        FileNotFoundError,
        r"model.safetensors does not",
    ),
    "weights truncated": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:200]),
        ValueError,
        r"model.safetensors \(200 bytes\) is not a readable safetensors file",
    ),
    "config invalid": (lambda f: (f / "quantization_config.json").write_text("{"), ValueError, "is not valid JSON"),
    "string version": (_edit_quant_config(lambda d: d | {"format_version": "2"}), ValueError, "integer version"),
    "no modules": (
        _edit_quant_config(lambda d: {k: v for k, v in d.items() if k != "modules"}),
        ValueError,
        r"lists no quantized 'modules'",
    ),  # fmt: skip
    "unknown dtype": (_edit_quant_config(lambda d: d | {"dtype": "float99"}), ValueError, r"dtype='float99'"),
    "bits 4 to 8": (_edit_quant_config(_set_bits(8)), ValueError, r"was edited after saving|differ from those saved"),
    "other save": (_edit_quant_config(lambda d: d | {"save_id": "0" * 32}), ValueError, "come from different saves"),
}


@pytest.mark.parametrize("case", list(INT4_DAMAGE))
def test_damaged_int4_folder_gives_a_clear_error(tmp_path, case):
    model = ARCHS["llama"].build()
    run_quantize(model)
    folder = save_quantized(model, tmp_path / "int4")
    damage, error, message = INT4_DAMAGE[case]
    damage(folder)
    with pytest.raises(error, match=message):
        load_quantized(folder)


def test_load_quantized_holds_each_weight_once(tmp_path):
    """Peak RSS of `load_quantized` in a fresh process stays within 1.2x the folder's size (the file's tensors are
    assigned to the model, not copied into a second one)."""
    import subprocess
    import sys

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=8192,
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=4,
        )  # fmt: skip
    )
    quantize(model, bits=4, group_size=128, keep_residual=True, show_progress=False)
    folder = save_quantized(model, tmp_path / "int4")
    size = sum(f.stat().st_size for f in folder.iterdir())
    code = r"""
import pathlib, re, sys
import torch, transformers
from hf_elastic import load_quantized

def status(field):
    return int(re.search(field + r":\s+(\d+)", pathlib.Path("/proc/self/status").read_text())[1]) * 1024

pathlib.Path("/proc/self/clear_refs").write_text("5")
base = status("VmRSS")
model = load_quantized(sys.argv[1])
print(status("VmHWM") - base)
"""
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    rise = int(out.stdout.split()[-1])
    print(f"load_quantized: peak RSS rise {rise / 2**20:.1f} MiB, folder {size / 2**20:.1f} MiB")
    assert size > 40 * 2**20
    assert rise <= 1.2 * size, f"peak RSS rise {rise / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB folder"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_dequantized_holds_the_dequantized_weights(tmp_path, arch):
    """`load_dequantized` (what the exact OpenVINO export traces) gives `nn.Linear` layers with `dequantize()`'s
    weights bit for bit, the other tensors as saved and ties kept: the same logits as `load_quantized`'s model."""
    from hf_elastic.compression.quantization.serialization import load_dequantized

    model = ARCHS[arch].build()
    run_quantize(model)
    folder = save_quantized(model, tmp_path / "int4")
    quantized, dense = load_quantized(folder), load_dequantized(folder)
    for name, module in quantized.named_modules():
        if isinstance(module, QuantLinear):
            linear = dense.get_submodule(name)
            assert type(linear) is not QuantLinear
            assert torch.equal(weight_out_in(linear), module.dequantize(torch.float32)), name
    ids = torch.randint(0, quantized.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, quantized(ids).logits, rtol=0, atol=1e-5)
    embeddings = dense.get_input_embeddings().weight
    assert dense.config.tie_word_embeddings is False or dense.get_output_embeddings().weight is embeddings
