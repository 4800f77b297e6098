"""OpenVINO export: fp32 parity with torch, per-layer widths, NNCF INT4, exact hf_elastic INT4/INT8 codes, sparsity."""

from __future__ import annotations

import copy
import importlib.util
import sys

import numpy as np
import pytest
import torch
from conftest import byte_level_bpe, random_llama
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_elastic.elastic_lora.arch import find_width_layers, slice_layer_width
from hf_elastic.quantization import QuantLinear, quantize, save_quantized

HAS_OPENVINO = all(importlib.util.find_spec(m) is not None for m in ("openvino", "optimum.intel", "nncf"))
requires_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="needs pip install 'hf-elastic[openvino]'")
VOCAB = 300

if HAS_OPENVINO:
    from hf_elastic.openvino import (
        FP32_CPU_CONFIG,
        SPARSE_WEIGHTS_PROPERTY,
        export_openvino,
        ir_weight_sparsity,
        ir_weights,
        load_openvino,
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return random_llama(VOCAB, 64, 128, seed, bos_token_id=1, eos_token_id=2, pad_token_id=0).eval()


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Trained on three sentences, with VOCAB tokens."""
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "seven wizards hex jolly vampires quickly",
        "the lazy dog sleeps while the fox jumps",
    ]
    return byte_level_bpe(
        corpus, VOCAB, ["<pad>", "<s>", "</s>"], pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def prompt(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def max_logit_diff(ov_model, model: torch.nn.Module, ids: torch.Tensor) -> float:
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    return (torch.as_tensor(ov_model(input_ids=ids, attention_mask=mask).logits) - expected).abs().max().item()


def greedy(model, ids: torch.Tensor, new_tokens: int = 6) -> torch.Tensor:
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )


@requires_openvino
def test_fp32_export_generates_like_torch_with_tokenizers(tmp_path):
    model = tiny_llama()
    out = export_openvino(model, tmp_path / "ov", tokenizer=bpe_tokenizer())
    names = {p.name for p in out.iterdir()}
    assert {"openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml", "tokenizer.json"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["ov"]  # no temporary folder left behind
    ov_model = load_openvino(out, **FP32_CPU_CONFIG)
    ids = prompt()
    assert max_logit_diff(ov_model, model, ids) <= 1e-4
    assert torch.equal(greedy(ov_model, ids), greedy(model, ids))
    text = "the lazy fox jumps, quickly!"
    tokenizer = AutoTokenizer.from_pretrained(out)
    import openvino as ov
    import openvino_tokenizers  # noqa: F401 - registers the tokenizer operations

    core = ov.Core()
    ov_ids = core.compile_model(out / "openvino_tokenizer.xml", "CPU")([text])["input_ids"]
    assert ov_ids.tolist() == [tokenizer(text)["input_ids"]] and len(ov_ids[0]) == 8
    assert core.compile_model(out / "openvino_detokenizer.xml", "CPU")(ov_ids)[0].tolist() == [text]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_openvino(model, out)


@requires_openvino
def test_per_layer_widths_export_matches_torch(tmp_path):
    model = tiny_llama(1)
    _, layers = find_width_layers(model)
    slice_layer_width(layers[0], torch.arange(40), None)  # FFN 128 -> 40
    slice_layer_width(layers[1], torch.arange(96), torch.arange(1))  # FFN 96, 1 of 2 key/value heads
    out = export_openvino(model, tmp_path / "ov")
    ov_model = load_openvino(out, **FP32_CPU_CONFIG)
    ids = prompt()
    assert max_logit_diff(ov_model, model, ids) <= 1e-4
    assert torch.equal(greedy(ov_model, ids), greedy(model, ids))


@requires_openvino
def test_nncf_int4_export_runs(tmp_path):
    model = tiny_llama(2)
    out = export_openvino(model, tmp_path / "ov", weight_format="int4", group_size=32)
    weights = ir_weights(out)
    layer_types = {w.element_type for name, w in weights.items() if ".layers." in name}
    assert layer_types == {"u4"} and weights["self.model.layers.0.mlp.down_proj.weight"].scales.shape == (64, 4, 1)
    ov_model = load_openvino(out)
    ids = prompt(1)
    generated = greedy(ov_model, ids, new_tokens=8)
    assert generated.shape == (1, 18) and torch.equal(generated[:, :10], ids)
    assert max_logit_diff(ov_model, model, ids) < 0.5  # random weights, 4-bit RTN of NNCF


def _sparse_quantized(bits: int, group_size: int, symmetric: bool) -> LlamaForCausalLM:
    model = tiny_llama(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p[torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) < 0.5] = 0
    quantize(model, bits=bits, group_size=group_size, symmetric=symmetric, show_progress=False)
    return model


@requires_openvino
@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric", "from_folder"), [(4, 32, False, True), (8, -1, True, False)]
)
def test_exact_codes_of_hf_elastic_quantized_model(tmp_path, bits, group_size, symmetric, from_folder):
    model = _sparse_quantized(bits, group_size, symmetric)
    if from_folder:
        source = save_quantized(model, tmp_path / "int")
        bpe_tokenizer().save_pretrained(source)
    else:
        source = model
    out = export_openvino(source, tmp_path / "ov")
    assert (out / "openvino_tokenizer.xml").is_file() == from_folder
    weights = ir_weights(out)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 14
    for name, module in quantized.items():
        ir = weights[f"self.{name}.weight"]
        groups = module.in_features // module.group_size
        assert ir.element_type == f"u{bits}" and ir.scales.dtype == np.float32
        assert ir.codes.shape == (module.out_features, groups, module.group_size)
        assert np.array_equal(ir.codes.reshape(module.out_features, -1), module.qweight.numpy())
        assert np.array_equal(ir.zero_points[..., 0], module.zeros.numpy())
        assert np.array_equal(ir.scales[..., 0], module.scales.numpy())
        decompressed = (ir.codes.astype(np.float32) - ir.zero_points.astype(np.float32)) * ir.scales
        assert np.array_equal(decompressed.reshape(module.out_features, -1), module.dequantize().numpy())
        assert np.array_equal(ir.weight, module.dequantize().numpy())
    assert weights["self.lm_head.weight"].element_type == "f32"

    ov_model = load_openvino(out, **FP32_CPU_CONFIG)
    ids = prompt()
    diff = max_logit_diff(ov_model, model, ids)
    print(f"INT{bits} exact codes: max |logits OpenVINO - torch| = {diff:.2e}")
    assert diff <= 1e-4
    assert torch.equal(greedy(ov_model, ids), greedy(model, ids))

    report = ir_weight_sparsity(out)
    dense = {f"self.{name}.weight": m.dequantize() for name, m in quantized.items()}
    dense["self.lm_head.weight"] = model.lm_head.weight.detach()
    zeros = sum(int((w == 0).sum()) for w in dense.values())
    assert report["num_weights"] == sum(w.numel() for w in dense.values())
    assert report["num_zeros"] == zeros and report["sparsity"] == zeros / report["num_weights"] > 0.45
    for name, w in dense.items():
        assert report["weights"][name]["sparsity"] == (w == 0).sum().item() / w.numel()
    assert report["cpu_property"] == SPARSE_WEIGHTS_PROPERTY
    if bits == 8:
        sparse = load_openvino(out, sparse_weights_decompression_rate=0.5, compile=True)
        assert float(sparse.request.get_compiled_model().get_property(SPARSE_WEIGHTS_PROPERTY)) == 0.5
        return
    small = export_openvino(source, tmp_path / "ov_int8_head", compress_float_weights=True)
    small_weights = ir_weights(small)
    assert small_weights["self.lm_head.weight"].element_type == "u8"
    for name in quantized:
        key = f"self.{name}.weight"
        assert np.array_equal(small_weights[key].codes, weights[key].codes)
        assert np.array_equal(small_weights[key].weight, weights[key].weight)
    size = (small / "openvino_model.bin").stat().st_size / (out / "openvino_model.bin").stat().st_size
    assert size < 0.5  # embeddings and LM head dominate this tiny model
    assert max_logit_diff(load_openvino(small, **FP32_CPU_CONFIG), model, ids) < 0.05


def test_missing_openvino_names_the_extra(monkeypatch, tmp_path):
    from hf_elastic import openvino as hf_openvino

    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match=r"pip install 'hf-elastic\[openvino\]'"):
        hf_openvino.export_openvino(torch.nn.Linear(2, 2), tmp_path / "ov")
    with pytest.raises(ImportError, match=r"needs openvino"):
        hf_openvino.ir_weight_sparsity(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_format": "int3"}, r"weight_format='int3' is not supported"),
        ({"weight_format": "int4", "group_size": 0}, r"group_size=0 is invalid"),
        ({"weight_format": "int8", "group_size": 32}, r"per-channel .* group_size=32"),
        ({"weight_format": "fp16", "group_size": 32}, r"apply to weight_format='int4'/'int8' only"),
        ({"weight_format": "int4", "ratio": 1.5}, r"ratio=1.5 must lie in \(0, 1\]"),
    ],
)
def test_bad_options_are_rejected_before_export(tmp_path, kwargs, message):
    from hf_elastic.openvino import export_openvino as export

    with pytest.raises(ValueError, match=message):
        export(torch.nn.Linear(2, 2), tmp_path / "ov", **kwargs)


@requires_openvino
def test_bad_group_size_and_format_for_quantized_model(tmp_path):
    with pytest.raises(ValueError, match=r"group_size=48 does not divide in_features=64 of model.layers.0"):
        export_openvino(tiny_llama(), tmp_path / "ov", weight_format="int4", group_size=48)
    model = copy.deepcopy(tiny_llama())
    quantize(model, bits=4, group_size=32, show_progress=False)
    with pytest.raises(ValueError, match=r"already quantized by hf_elastic \(INT4, group_size=32\).*'fp32'"):
        export_openvino(model, tmp_path / "ov", weight_format="int4")
    with pytest.raises(ValueError, match=r"compress_float_weights=True applies to models quantized by hf_elastic"):
        export_openvino(tiny_llama(), tmp_path / "ov", compress_float_weights=True)
    with pytest.raises(ValueError, match=r"sparse_weights_decompression_rate=2"):
        load_openvino(tmp_path, sparse_weights_decompression_rate=2)
    assert not (tmp_path / "ov").exists()
