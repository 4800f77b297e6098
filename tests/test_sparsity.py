"""Wanda and magnitude pruning: exact per-row targets, N:M patterns, sequential calibration, saving, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, VOCAB, fresh
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_elastic.calibration import find_target_modules, prepare_calibration
from hf_elastic.elastic_lora.arch import weight_out_in
from hf_elastic.sparsity import SparsityConfig, nm_valid, prune_mask, sparsify, sparsity_of

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


def run(model, **kwargs):
    kwargs.setdefault("seq_len", SEQ)
    kwargs.setdefault("num_samples", SAMPLES)
    if kwargs.get("method", "wanda") == "wanda":
        kwargs.setdefault("calibration", token_data())
    return sparsify(model, show_progress=False, **kwargs)


@pytest.mark.parametrize(("method", "sparsity"), [("wanda", 0.5), ("magnitude", 0.3), ("wanda", 0.7)])
def test_exact_target_per_row(base, arch, method, sparsity):
    model = fresh(base)
    report = run(model, method=method, sparsity=sparsity)
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
    report = run(model, pattern=pattern)
    for name, w in targets(model).items():
        kept = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (kept == n).all(), name
        assert nm_valid(w, n, m)
    assert report.nm_valid is True
    assert report.total_sparsity == pytest.approx(1 - n / m)
    assert report.config.sparsity == pytest.approx(1 - n / m)


def test_embeddings_and_head_untouched(base, arch):
    model = fresh(base)
    run(model, method="magnitude", sparsity=0.5)
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
    run(model, calibration=data, sparsity=0.5)
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
    run(wanda, sparsity=0.5)
    run(magnitude, method="magnitude", sparsity=0.5)
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
    run(first, calibration=token_data(0), pattern="2:4")
    run(second, calibration=token_data(0), pattern="2:4")
    run(other, calibration=token_data(1), pattern="2:4")
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
    report = run(model, pattern="2:4")
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
    run(a, calibration=Dataset.from_dict({"text": rows}), tokenizer=tokenizer)
    run(b, calibration=token_data())
    assert all(torch.equal(x, y) for x, y in zip(targets(a).values(), targets(b).values(), strict=True))


def test_modules_selects_a_subset():
    model = ARCHS["llama"].build()
    report = run(model, method="magnitude", modules=["down_proj", "self_attn.q_proj"])
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
def test_config_errors(kwargs, message):
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
        run(model, calibration=["w3 w150 w7"], tokenizer=word_tokenizer(200))


def test_unsupported_architecture():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4
        )
    )
    with pytest.raises(ValueError, match=r"sparsify supports model_type in .*got 'gpt_neox'"):
        run(model, method="magnitude")
