"""Sub-network export, OpenVINO IR, model cards and the Hub upload."""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    ARCHS,
    byte_level_bpe,
    fresh,
    make_config,
    peft_kwargs,
    pruned,
    qa_config,
    quantized,
    random_llama,
    train_steps,
)
from huggingface_hub import EvalResult, HfApi, ModelCard, constants, metadata_load
from huggingface_hub.utils import _http
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer, models
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from hf_elastic import (
    CardInfo,
    ElasticLoraConfig,
    NLSConfig,
    QuantLinear,
    export_subnetwork,
    get_supernet,
    load_exported,
    optimize_for_inference,
    prepare_upload_folder,
    push_to_hub,
    quantize,
    save_quantized,
)
from hf_elastic.export import build_model_card, check_model_card, detect_artifact_kind, measure_sparsity
from hf_elastic.models import find_width_layers, slice_layer_width


# ---------------------------------------------------------------------------------------------------- export
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
    assert saved["hf_elastic_only"] == "per-layer widths"
    info = json.loads((out / "elastic_subnet.json").read_text())
    assert info["config"] == config and info["params"] < info["max"]["params"]
    reloaded = load_exported(out)
    # stock transformers refuses the folder, naming the loader, through the Auto classes and the model class alike
    with pytest.raises(ValueError, match=r"hf_elastic per-layer widths: load it with hf_elastic.load_exported"):
        AutoConfig.from_pretrained(out)
    with pytest.raises(ValueError, match=r"quantization config from the arguments has no `quant_method`"):
        type(reloaded).from_pretrained(out, ignore_mismatched_sizes=True)
    assert sum(p.numel() for p in reloaded.parameters()) == info["base_params"]
    with torch.no_grad():
        assert (reloaded(**batch).logits - expected).abs().max() <= 1e-5
    assert not (out / "sparsity_report.json").exists()


@pytest.mark.parametrize("heads", [(2, 4), (4, 2), (2, 2)])
def test_per_layer_heads_under_gqa_match_the_masked_supernetwork(tmp_path, heads):
    llama = ARCHS["llama"]
    base = llama.build()
    assert (base.config.num_attention_heads, base.config.num_key_value_heads) == (4, 2)  # 2 query heads per group
    model = get_peft_model(base, make_config("elastic", llama, init_lora_weights=False))
    sn = get_supernet(model)
    sn.reorder_channels("magnitude")  # the kept key/value group need not be the first
    config = sn.space.max_config() | {"0.heads": heads[0], "1.heads": heads[1], "1.ffn": 36}
    sn.activate(config)
    batch = llama.batch(5)
    with torch.no_grad():
        expected = model(**batch).logits
    out = export_subnetwork(sn, config, tmp_path / "sub")
    reloaded = load_exported(out)
    _, layers = find_width_layers(reloaded)
    attn = [layer.module.self_attn for layer in layers]  # head_dim 8, hidden 32
    assert [tuple(a.q_proj.weight.shape) for a in attn] == [(h * 8, 32) for h in heads]
    assert [tuple(a.k_proj.weight.shape) for a in attn] == [(h // 2 * 8, 32) for h in heads]
    assert [tuple(a.o_proj.weight.shape) for a in attn] == [(32, h * 8) for h in heads]
    with torch.no_grad():
        assert (reloaded(**batch).logits - expected).abs().max() <= 1e-5


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


def test_uniform_head_cut_that_does_not_divide_the_hidden_size_needs_load_exported(tmp_path):
    """transformers refuses hidden_size % num_attention_heads != 0 even with head_dim set: 48 % 5 != 0."""
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=8,
            head_dim=6,
        )  # fmt: skip
    )
    config = ElasticLoraConfig(
        rank_choices=[4], ffn_width_choices=None, head_choices=[8, 5], target_modules=["q_proj"]
    )
    sn = get_supernet(get_peft_model(base, config))
    sn.activate("min")
    batch = {"input_ids": torch.arange(12).reshape(2, 6)}
    with torch.no_grad():
        expected = sn.model(**batch).logits
    out = export_subnetwork(sn, "min", tmp_path / "five-heads")
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_attention_heads"] == 8 and saved["elastic_layer_widths"]["0"]["heads"] == 5
    with torch.no_grad():
        assert (load_exported(out)(**batch).logits - expected).abs().max() <= 1e-5
    if HAS_OPENVINO:  # the IR's KV cache has 5 heads, not the config's 8
        ov_model = load_openvino(export_openvino(load_exported(out), tmp_path / "ov"), **FP32_CPU_CONFIG)
        assert max_logit_diff(ov_model, load_exported(out), batch["input_ids"][:1]) <= 1e-4


def test_gpt2_head_cuts_need_load_exported_even_when_uniform(tmp_path):
    arch = ARCHS["gpt2"]
    model = get_peft_model(arch.build(), make_config("elastic", arch, init_lora_weights=False))
    sn = get_supernet(model)
    config = sn.space.max_config() | {f"{i}.heads": 2 for i in range(2)}  # the same cut in every layer
    sn.activate(config)
    batch = arch.batch(2)
    with torch.no_grad():
        expected = model(**batch).logits
    out = export_subnetwork(sn, config, tmp_path / "gpt2")
    saved = json.loads((out / "config.json").read_text())
    assert saved["hf_elastic_only"] == "attention heads cut" and saved["n_head"] == 4  # n_embd / n_head is fixed
    with pytest.raises(ValueError, match=r"hf_elastic attention heads cut: load it with hf_elastic.load_exported"):
        AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert (load_exported(out)(**batch).logits - expected).abs().max() <= 1e-5
    ffn_only = sn.space.max_config() | {f"{i}.ffn": 24 for i in range(2)}  # uniform FFN cut: a stock checkpoint
    out = export_subnetwork(sn, ffn_only, tmp_path / "gpt2-ffn")
    assert AutoModelForCausalLM.from_pretrained(out).config.n_inner == 24


def test_sparse_and_int4_exports_reload_exactly(tmp_path):
    arch = ARCHS["llama"]
    sparse = get_peft_model(
        pruned(arch.build()), make_config("nls", arch, sparse_adapter=True, init_lora_weights=False)
    )
    train_steps(sparse, arch, steps=2)
    out = export_subnetwork(get_supernet(sparse), "median", tmp_path / "sparse")
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5)
    assert json.loads((out / "elastic_subnet.json").read_text())["sparse_adapter"] is True

    qa = get_peft_model(quantized(arch.build()), qa_config(arch, grouped=False))
    train_steps(qa, arch, steps=2)
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


def test_exports_loaded_from_their_config_decode_with_the_kv_cache(tmp_path):
    arch = ARCHS["llama"]
    models = {
        "widths": get_peft_model(arch.build(), make_config("elastic", arch)),
        "int4": get_peft_model(quantized(arch.build()), qa_config(arch, grouped=False)),
    }
    for name, model in models.items():
        model.base_model.model.config.use_cache = False  # as `Trainer` leaves it
        sn = get_supernet(model)
        config = sn.space.max_config() | {"0.ffn": 24} if name == "widths" else "min"
        out = export_subnetwork(sn, config, tmp_path / name)
        assert json.loads((out / "config.json").read_text())["use_cache"] is True
        reloaded = load_exported(out)
        assert reloaded.generation_config.use_cache is True
        prompt = arch.batch(0)["input_ids"][:1, :4]
        generated = reloaded.generate(prompt, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        assert generated.past_key_values is not None


def test_accelerate_backends(monkeypatch):
    model = ARCHS["llama"].build()
    batch = ARCHS["llama"].batch()
    with torch.no_grad():
        expected = model(**batch).logits
        assert optimize_for_inference(model, "none") is model
        compiled = optimize_for_inference(model, "compile", dynamic=False)
        assert (compiled(**batch).logits - expected).abs().max() <= 1e-5
    monkeypatch.setitem(__import__("sys").modules, "intel_extension_for_pytorch", None)
    with pytest.raises(ImportError, match=r"backend='ipex' needs intel_extension_for_pytorch.*use backend='compile'"):
        optimize_for_inference(model, "ipex")
    with pytest.raises(ValueError, match=r"backend='tensorrt' is unknown"):
        optimize_for_inference(model, "tensorrt")


# ---------------------------------------------------------------------------------------------------- openvino
HAS_OPENVINO = all(importlib.util.find_spec(m) is not None for m in ("openvino", "optimum.intel", "nncf"))
requires_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="needs pip install 'hf-elastic[openvino]'")
VOCAB = 300

if HAS_OPENVINO:
    from hf_elastic.export import FP32_CPU_CONFIG, export_openvino, load_openvino
    from hf_elastic.export.openvino_ir import SPARSE_WEIGHTS_PROPERTY, ir_weight_sparsity, ir_weights


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
    out = export_openvino(source, tmp_path / "ov", compress_float_weights=False)  # fp32 embedding and LM head
    assert (out / "openvino_tokenizer.xml").is_file() == from_folder
    weights = ir_weights(out)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 14
    for name, module in quantized.items():
        ir = weights[f"self.{name}.weight"]
        groups = module.in_features // module.group_size
        assert ir.element_type == f"u{bits}" and ir.scales.dtype == np.float32  # RTN scales are not exact in f16
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
    small = export_openvino(source, tmp_path / "ov_int8_head")  # the default: embedding and LM head in int8
    small_weights = ir_weights(small)
    assert small_weights["self.lm_head.weight"].element_type == "u8"
    for name, module in quantized.items():
        key = f"self.{name}.weight"
        assert np.array_equal(small_weights[key].codes, weights[key].codes)
        assert np.array_equal(small_weights[key].weight, module.dequantize().numpy())
    size = (small / "openvino_model.bin").stat().st_size / (out / "openvino_model.bin").stat().st_size
    print(f"INT4 exact codes IR .bin: int8 embedding/LM head / fp32 = {size:.3f}")
    assert size < 0.5  # embeddings and LM head dominate this tiny model (measured 0.436)
    small_model = load_openvino(small, **FP32_CPU_CONFIG)
    assert max_logit_diff(small_model, model, ids) < 0.05
    generated = greedy(small_model, ids, new_tokens=8)
    assert generated.shape == (2, 18) and torch.equal(generated[:, :10], ids)


@requires_openvino
def test_exact_codes_store_f16_scales_where_exact(tmp_path):
    """Layers whose scales are f16 values get f16 scale constants; the decompressed weights stay bit-exact."""
    model = _sparse_quantized(4, 32, False)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    half = {name for name in quantized if ".mlp." in name}
    with torch.no_grad():
        for name in half:
            quantized[name].scales.copy_(quantized[name].scales.half().float())
    keep = export_openvino(model, tmp_path / "ov_fp32_head", compress_float_weights=False)
    out = export_openvino(model, tmp_path / "ov")
    for folder in (keep, out):
        weights = ir_weights(folder)
        for name, module in quantized.items():
            ir = weights[f"self.{name}.weight"]
            assert ir.scales.dtype == (np.float16 if name in half else np.float32), name
            assert np.array_equal(ir.scales[..., 0].astype(np.float32), module.scales.numpy())
            assert np.array_equal(ir.weight, module.dequantize().numpy())
    assert len(half) == 6 and weights["self.lm_head.weight"].element_type == "u8"
    ids = prompt()
    keep_model = load_openvino(keep, **FP32_CPU_CONFIG)
    assert max_logit_diff(keep_model, model, ids) <= 1e-4
    assert torch.equal(greedy(keep_model, ids), greedy(model, ids))
    assert max_logit_diff(load_openvino(out, **FP32_CPU_CONFIG), model, ids) < 0.05


def test_missing_openvino_names_the_extra(monkeypatch, tmp_path):
    from hf_elastic.export import openvino as hf_openvino

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
    from hf_elastic.export.openvino import export_openvino as export

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


# ---------------------------------------------------------------------------------------------------- hub
TOKEN = "hf_TESTtokenThatMustNeverLeak0123456789"
BASE_ID = "HuggingFaceTB/SmolLM2-135M"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
ACCURACY = EvalResult(
    task_type="text-generation",
    dataset_type="openai/gsm8k",
    dataset_name="GSM8K",
    dataset_split="test",
    metric_type="accuracy",
    metric_value=0.412,
)


# ---------------------------------------------------------------------------------------------------- artefacts


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> dict:
    """A real sub-adapter, a real merged checkpoint (half of each decoder weight zeroed) and a fake OpenVINO dir."""
    root = tmp_path_factory.mktemp("artefacts")
    arch = ARCHS["llama"]
    base = arch.build()
    config = NLSConfig(rank_choices=[8, 6, 4], rank_groups=arch.rank_groups, **peft_kwargs(arch))
    model = get_peft_model(fresh(base), config)
    sn = get_supernet(model)
    with torch.no_grad():
        for module in sn.lora_modules.values():
            module.lora_B["default"].weight.normal_()

    adapter = sn.extract_adapter("median", root / "adapter")
    (adapter / "pareto.csv").write_text("name,params,accuracy\nmax,25000,0.45\nmedian,23000,0.44\nmin,21000,0.40\n")
    (adapter / "pareto.png").write_bytes(PNG)

    merged = root / "merged"
    sliced = sn.extract_model("min")
    with torch.no_grad():
        for name, param in sliced.named_parameters():
            if ".layers." in name and param.ndim == 2:
                param.view(-1)[::2] = 0.0
    sliced.save_pretrained(merged)
    subnet = {"config": sn.space.min_config(), **sn.count("min"), "max": sn.count("max")}
    (merged / "elastic_subnet.json").write_text(json.dumps(subnet))

    ov = root / "openvino"
    ov.mkdir()
    (ov / "openvino_model.xml").write_text("<?xml version='1.0'?><net name='fake'/>")
    (ov / "openvino_model.bin").write_bytes(b"\x00" * 64)
    shutil.copy(merged / "config.json", ov / "config.json")
    (ov / "openvino_config.json").write_text(json.dumps({"quantization_config": {"bits": 4, "group_size": 128}}))
    (ov / "openvino_tokenizer.xml").write_text("<net/>")
    return {"adapter": adapter, "merged": merged, "openvino": ov, "base": base, "model": model, "sn": sn}


def card_info(**kwargs) -> CardInfo:
    defaults = {
        "base_model": BASE_ID,
        "method": "shears",
        "license": "apache-2.0",
        "datasets": ["openai/gsm8k"],
        "hyperparameters": {"learning_rate": 3e-4, "num_train_epochs": 3},
        "eval_results": [ACCURACY],
    }
    return CardInfo(**(defaults | kwargs))


def listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", ["adapter", "merged", "openvino"])
def test_detects_artifact_kind(artefacts, kind):
    assert detect_artifact_kind(artefacts[kind]) == kind


def test_detection_errors_are_clear(tmp_path, artefacts):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_artifact_kind(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no sub-network artefact.*adapter_config.json"):
        detect_artifact_kind(tmp_path)
    broken = tmp_path / "adapter"
    broken.mkdir()
    shutil.copy(artefacts["adapter"] / "adapter_config.json", broken)
    with pytest.raises(FileNotFoundError, match="lacks adapter_model.safetensors or adapter_model.bin"):
        detect_artifact_kind(broken)
    ov = tmp_path / "ov"
    ov.mkdir()
    (ov / "openvino_model.xml").write_text("<net/>")
    with pytest.raises(FileNotFoundError, match="OpenVINO.*lacks openvino_model.bin, config.json"):
        detect_artifact_kind(ov)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(artefacts["merged"] / "config.json", sharded)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-1-of-2.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="missing weight shards"):
        detect_artifact_kind(sharded)


# ---------------------------------------------------------------------------------------------------- cards


def test_adapter_folder_is_exactly_what_is_uploaded(tmp_path, artefacts):
    source = artefacts["adapter"]
    out = prepare_upload_folder(source, tmp_path / "upload", card_info(max_size=artefacts["sn"].count("max")))
    assert listing(out) == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "elastic_subnet.json",
        "pareto.csv",
        "pareto.png",
    }
    for name in listing(out) - {"README.md", "adapter_config.json"}:
        assert (out / name).read_bytes() == (source / name).read_bytes()
    config = json.loads((source / "adapter_config.json").read_text())  # its base is the Hub id, never a local path
    assert json.loads((out / "adapter_config.json").read_text()) == config | {"base_model_name_or_path": BASE_ID}

    meta = metadata_load(out / "README.md")
    assert meta["base_model"] == BASE_ID
    assert meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["openai/gsm8k"]
    assert meta["pipeline_tag"] == "text-generation"
    assert {"hf-elastic", "nas", "shears", "nls", "lora"} <= set(meta["tags"])
    card = ModelCard.load(out / "README.md")
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_split, result.metric_type) == ("openai/gsm8k", "test", "accuracy")
    assert result.metric_value == pytest.approx(0.412)
    assert check_model_card(card)["model-index"][0]["name"] == "SmolLM2-135M-shears-subnet"

    text = card.text
    subnet = json.loads((source / "elastic_subnet.json").read_text())
    for name, value in subnet["config"].items():
        assert f'"{name}": {value}' in text
    ratio = subnet["params"] / artefacts["sn"].count("max")["params"]
    assert f"{ratio:.1%} of the maximal sub-network" in text
    assert "| median | 23000 | 0.44 |" in text
    assert "![Pareto front of the sub-network search](pareto.png)" in text
    assert 'PeftModel.from_pretrained(base, "REPO_ID")' in text
    assert f'AutoModelForCausalLM.from_pretrained("{BASE_ID}")' in text
    assert "arXiv:2404.10934" in text and "| learning_rate | 0.0003 |" in text
    assert "| text-generation | GSM8K | test | accuracy | 0.412 |" in text

    # stock peft loads the folder and reproduces the sub-network
    sn = artefacts["sn"]
    sn.activate("median")
    ids = ARCHS["llama"].batch()["input_ids"]
    loaded = PeftModel.from_pretrained(fresh(artefacts["base"]), out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, artefacts["model"](input_ids=ids).logits)


def test_merged_folder_measures_sparsity_and_loads(tmp_path, artefacts):
    source = artefacts["merged"]
    assert measure_sparsity(source) == pytest.approx(0.5)
    out = prepare_upload_folder(source, tmp_path / "upload", card_info(method="lonas", eval_results=[]))
    assert listing(out) == {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "elastic_subnet.json",
    }
    meta = metadata_load(out / "README.md")
    assert (meta["library_name"], meta["base_model_relation"]) == ("transformers", "finetune")
    assert {"lonas", "sparse"} <= set(meta["tags"]) and "model-index" not in meta
    text = (out / "README.md").read_text()
    assert "50.00% of the weights in the linear layers are zero (measured on the published weights)" in text
    assert 'AutoModelForCausalLM.from_pretrained("REPO_ID")' in text and "aclanthology.org/2024.lrec-main.940" in text
    assert "| MACs per token |" in text and "No evaluation results were recorded." in text
    AutoModelForCausalLM.from_pretrained(out)


def test_openvino_card_reads_quantization(tmp_path, artefacts):
    source = artefacts["openvino"]
    info = card_info(method="sqft-qa-sparsepeft", sparsity=0.5, tags=["edge"], repo_id="me/tiny-ov")
    out = prepare_upload_folder(source, tmp_path / "upload", info)
    assert listing(out) == {p.name for p in source.iterdir()} | {"README.md"}
    meta = metadata_load(out / "README.md")
    assert meta["base_model_relation"] == "quantized" and "library_name" not in meta
    assert {"openvino", "int4", "sqft", "qa-sparsepeft", "sparse", "edge"} <= set(meta["tags"])
    text = (out / "README.md").read_text()
    assert "| Weights | INT4, group size 128 |" in text
    assert "4-bit integers with one scale per group of 128 weights" in text
    assert 'OVModelForCausalLM.from_pretrained("me/tiny-ov")' in text and "arXiv:2410.03750" in text


def test_int4_checkpoint_card_reads_reports_and_search(tmp_path, artefacts):
    source = tmp_path / "int4"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(artefacts["merged"] / name, source)
    quant = {"format": "hf_elastic.QuantLinear", "method": "gptq", "bits": 4, "group_size": 32, "symmetric": False}
    (source / "quantization_config.json").write_text(json.dumps(quant))
    (source / "sparsity_report.json").write_text(json.dumps({"pattern": "2:4", "total_sparsity": 0.5, "modules": {}}))
    (source / "search.csv").write_text(
        "index,sources,key,loss,params,pareto,0.rank.q_proj\n0,max,a,2.5,30000,1,8\n1,random,b,2.9,28000,0,6\n"
        "2,min,c,2.7,21000,1,4\n"
    )
    (source / "search.png").write_bytes(PNG)
    out = prepare_upload_folder(source, tmp_path / "upload", card_info(method="sqft-qa-sparsepeft", eval_results=[]))
    assert listing(out) == {p.name for p in source.iterdir()} | {"README.md"}
    meta = metadata_load(out / "README.md")
    assert meta["base_model_relation"] == "quantized" and "library_name" not in meta
    assert {"int4", "sparse", "qa-sparsepeft"} <= set(meta["tags"])
    text = (out / "README.md").read_text()
    assert "| Weights | INT4, group size 32 |" in text
    assert "4-bit integers (GPTQ, asymmetric) with one scale per group of 32 weights" in text
    assert "50.00% of the weights in the linear layers are zero (2:4 pattern, from `sparsity_report.json`)" in text
    assert 'load_exported(snapshot_download("REPO_ID"))' in text and "from_pretrained(" not in text
    assert "(the 2 Pareto-optimal of 3 evaluated sub-networks, from `search.csv`)" in text
    assert "| index | sources | key | loss | params |" in text and "| 2 | min | c | 2.7 | 21000 |" in text
    assert "| 1 | random |" not in text and "![Pareto front of the sub-network search](search.png)" in text


def test_card_info_overrides_files_and_validates():
    with pytest.raises(ValueError, match="method='bogus' is not known"):
        CardInfo(method="bogus")
    with pytest.raises(ValueError, match=r"sparsity=50 is outside \[0, 1\]"):
        CardInfo(method="nls", sparsity=50)
    with pytest.raises(ValueError, match="bits must be an integer"):
        CardInfo(method="nls", bits=0)
    with pytest.raises(ValueError, match="group_size must be a positive integer or -1"):
        CardInfo(method="nls", group_size=0)
    with pytest.raises(ValueError, match="not a Hub model id"):
        CardInfo(method="nls", base_model="/home/me/llama/")
    with pytest.raises(ValueError, match="Required keys: task_type"):
        CardInfo(method="nls", eval_results=[{"metric_value": 1.0}])
    with pytest.raises(ValueError, match=r"subnet_config\['0.rank'\] must be an integer"):
        CardInfo(method="nls", subnet_config={"0.rank": "big"})
    info = CardInfo(method="nls", eval_results=[dict(ACCURACY.__dict__)], tags="x")
    assert info.eval_results == [ACCURACY] and info.tags == ["x"]
    tensor_metric = dict(ACCURACY.__dict__, metric_value=torch.tensor(0.25))
    assert CardInfo(method="nls", eval_results=[tensor_metric]).eval_results[0].metric_value == 0.25
    with pytest.raises(ValueError, match="accuracy on GSM8K is nan"):
        CardInfo(method="nls", eval_results=[dict(ACCURACY.__dict__, metric_value=float("nan"))])


def test_card_needs_a_hub_base_model(artefacts):
    # the tiny adapter records no base model, so the card cannot link one
    with pytest.raises(ValueError, match="Cannot tell the base model"):
        build_model_card(artefacts["adapter"], CardInfo(method="nls"))


def test_offline_card_validation_rejects_broken_metadata(artefacts):
    card = build_model_card(artefacts["adapter"], card_info())
    data = check_model_card(str(card))
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(0.412)
    with pytest.raises(ValueError, match="no '---' YAML metadata block"):
        check_model_card("# just text")
    with pytest.raises(ValueError, match="Invalid `model_index`"):
        check_model_card("---\nmodel-index:\n- name: x\n  results:\n  - foo: 1\n---\n")
    with pytest.raises(ValueError, match="base_model_relation='derived'"):
        check_model_card(f"---\nbase_model: {BASE_ID}\nbase_model_relation: derived\n---\n")
    with pytest.raises(ValueError, match="is not a Hub id"):
        check_model_card("---\nbase_model: ./local/dir\n---\n")


def test_prepare_is_atomic(tmp_path, artefacts, monkeypatch):
    out = tmp_path / "upload"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prepare_upload_folder(artefacts["adapter"], out, card_info())

    import hf_elastic.export.hub as hub

    calls = []

    def flaky_place(src, dst, link):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        shutil.copy2(src, dst)

    monkeypatch.setattr(hub, "_place", flaky_place)
    with pytest.raises(OSError, match="disk full"):
        prepare_upload_folder(artefacts["adapter"], out, card_info(), overwrite=True)
    assert listing(out) == {"old.txt"} and sorted(p.name for p in tmp_path.iterdir()) == ["upload"]
    monkeypatch.undo()
    prepare_upload_folder(artefacts["adapter"], out, card_info(), overwrite=True)
    assert "old.txt" not in listing(out) and "README.md" in listing(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]
    with pytest.raises(ValueError, match="must not overlap"):
        prepare_upload_folder(artefacts["adapter"], artefacts["adapter"] / "hub", card_info())
    with pytest.raises(ValueError, match="would overwrite"):
        prepare_upload_folder(
            artefacts["adapter"], tmp_path / "x", card_info(), extra_files={"README.md": out / "README.md"}
        )


# ---------------------------------------------------------------------------------------------------- upload


class FakeHub:
    """Answers huggingface_hub's HTTP calls like the Hub does and records them; files are committed inline."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.fail_create = False

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/agent-harnesses":  # huggingface_hub telemetry, not part of the upload
            return httpx.Response(404)
        self.requests.append(request)
        if path == "/api/repos/create":
            if self.fail_create:
                return httpx.Response(403, json={"error": "You don't have the rights to create a model under me"})
            body = json.loads(request.content)
            return httpx.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if path == "/api/validate-yaml":
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return httpx.Response(200, json={"files": modes})
        if "/branch/" in path:
            return httpx.Response(200, json={})
        if path.endswith("/discussions") and request.method == "POST":
            return httpx.Response(200, json={"num": 1})
        if path.endswith("/discussions/1"):
            return httpx.Response(200, json=discussion_details())
        if "/commit/" in path:
            return httpx.Response(
                200, json={"commitUrl": "https://huggingface.co/me/tiny/commit/" + "a" * 40, "commitOid": "a" * 40}
            )
        return httpx.Response(404, json={"error": f"unexpected {request.method} {path}"})

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests]

    def committed_files(self) -> dict[str, bytes]:
        (commit,) = [r for r in self.requests if "/commit/" in r.url.path]
        lines = [json.loads(line) for line in commit.content.splitlines()]
        return {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}


def discussion_details() -> dict:
    return {
        "title": "Upload",
        "num": 1,
        "author": {"name": "me"},
        "createdAt": "2026-01-01T00:00:00.000Z",
        "status": "draft",
        "repo": {"name": "me/tiny", "type": "model"},
        "isPullRequest": True,
        "changes": {"base": "refs/heads/main"},
        "filesWithConflicts": [],
        "events": [],
    }


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace huggingface_hub's HTTP client by one whose transport is `FakeHub` (the real request hooks stay)."""
    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # log every request as curl, to check the token stays out
    previous = _http._GLOBAL_CLIENT_FACTORY
    _http.set_client_factory(
        lambda: httpx.Client(
            transport=httpx.MockTransport(hub.handler), event_hooks={"request": [_http.hf_request_event_hook]}
        )
    )
    yield hub
    _http.set_client_factory(previous)


def assert_no_token(caplog, capfd, *texts: str) -> None:
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, *texts):
        assert TOKEN not in text
        assert TOKEN[3:] not in text


def test_push_uploads_the_prepared_folder(tmp_path, artefacts, fake_hub, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    source = artefacts["adapter"]
    url = push_to_hub(
        source, "me/tiny", card_info=card_info(), token=TOKEN, private=True, commit_message="Add sub-network"
    )
    assert url == "https://huggingface.co/me/tiny/commit/" + "a" * 40
    assert fake_hub.calls() == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/me/tiny/preupload/main"),
        ("POST", "/api/models/me/tiny/commit/main"),
    ]
    create = json.loads(fake_hub.requests[0].content)
    assert create == {"name": "tiny", "organization": "me", "visibility": "private", "type": "model"}
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake_hub.requests)
    header = json.loads(fake_hub.requests[-1].content.splitlines()[0])
    assert header["value"]["summary"] == "Add sub-network"

    expected = prepare_upload_folder(source, tmp_path / "expected", card_info(repo_id="me/tiny"))
    files = fake_hub.committed_files()
    assert set(files) == listing(expected)
    assert all(files[name] == (expected / name).read_bytes() for name in files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == BASE_ID and "hf-elastic" in card.data.tags
    assert card.data.eval_results[0].metric_value == pytest.approx(0.412)
    assert 'PeftModel.from_pretrained(base, "me/tiny")' in card.text
    assert json.loads(fake_hub.requests[1].content)["content"] == files["README.md"].decode()
    assert "authorization: <TOKEN>" in caplog.text  # huggingface_hub's curl debug log ran, with the token masked
    assert_no_token(caplog, capfd)


def test_push_to_branch_and_pull_request(artefacts, fake_hub):
    push_to_hub(artefacts["merged"], "me/tiny", card_info=card_info(), token=TOKEN, revision="v1")
    calls = fake_hub.calls()
    assert ("POST", "/api/models/me/tiny/branch/v1") in calls and calls[-1] == (
        "POST",
        "/api/models/me/tiny/commit/v1",
    )
    assert json.loads(fake_hub.requests[0].content)["visibility"] == "public"

    fake_hub.requests.clear()
    url = push_to_hub(artefacts["merged"], "me/tiny", card_info=card_info(), token=TOKEN, create_pr=True)
    assert url == "https://huggingface.co/me/tiny/discussions/1"
    assert ("POST", "/api/models/me/tiny/discussions") in fake_hub.calls()
    assert fake_hub.calls()[-1] == ("POST", "/api/models/me/tiny/commit/refs/pr/1")


def test_dry_run_makes_no_calls(tmp_path, artefacts, fake_hub, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("dry run must not call the Hub")

    monkeypatch.setattr(HfApi, "create_repo", forbidden)
    monkeypatch.setattr(HfApi, "upload_folder", forbidden)
    folder = push_to_hub(
        artefacts["openvino"], "me/tiny-ov", card_info=card_info(), token=TOKEN, dry_run=True, local_dir=tmp_path / "d"
    )
    assert folder == tmp_path / "d" and "openvino_model.xml" in listing(folder)
    assert 'OVModelForCausalLM.from_pretrained("me/tiny-ov")' in (folder / "README.md").read_text()
    default = push_to_hub(artefacts["adapter"], "me/tiny", card_info=card_info(), dry_run=True)
    assert default.name == "tiny" and (default / "README.md").is_file()
    shutil.rmtree(default.parent)
    assert fake_hub.requests == []


def test_bad_inputs_fail_before_any_call(tmp_path, artefacts, fake_hub):
    for repo_id in ("a/b/c", "bad--name", "", "me/x.git"):
        with pytest.raises(ValueError, match="Invalid repo_id"):
            push_to_hub(artefacts["adapter"], repo_id, card_info=card_info(), token=TOKEN)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_to_hub(tmp_path / "missing", "me/tiny", card_info=card_info(), token=TOKEN)
    with pytest.raises(ValueError, match="create_pr=True opens a pull request against main"):
        push_to_hub(artefacts["adapter"], "me/tiny", card_info=card_info(), create_pr=True, revision="dev")
    assert fake_hub.requests == []


def test_hub_errors_do_not_leak_the_token(artefacts, fake_hub, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    fake_hub.fail_create = True
    with pytest.raises(ConnectionError, match=r"Could not push to me/tiny \(HfHubHTTPError: 403") as exc:
        push_to_hub(artefacts["adapter"], "me/tiny", card_info=card_info(), token=TOKEN)
    assert fake_hub.calls() == [("POST", "/api/repos/create"), ("GET", "/api/models/me/tiny")]  # exists? no
    assert_no_token(caplog, capfd, str(exc.value), repr(exc.value))


def test_push_uploads_only_artefact_files_and_guards_the_token(tmp_path, artefacts, fake_hub, caplog):
    source = tmp_path / "adapter"
    shutil.copytree(artefacts["adapter"], source)
    (source / "training_args.bin").write_bytes(b"pickle holding " + TOKEN.encode())
    (source / "checkpoint-2").mkdir()
    (source / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    (source / "checkpoint-2" / "adapter_config.json").write_text("{}")
    (source / "rng_state.pth").write_bytes(b"x")
    (source / "chat_template.jinja").write_text("{{ messages }}")  # a tokenizer file: uploaded
    with caplog.at_level(logging.WARNING):
        folder = prepare_upload_folder(source, tmp_path / "up", card_info())
    uploaded = listing(folder)
    assert uploaded == listing(artefacts["adapter"]) | {"README.md", "chat_template.jinja"}
    assert "training_args.bin" in caplog.text and "checkpoint-2/optimizer.pt" in caplog.text
    (source / "notes.txt").write_text(f"token={TOKEN}")
    with pytest.raises(ValueError, match="notes.txt contains your Hub token"):
        push_to_hub(source, "me/tiny", card_info=card_info(), token=TOKEN)
    (source / "notes.txt").unlink()
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    (source / "extra.json").symlink_to(outside)
    with pytest.raises(ValueError, match=r"extra.json is a link to .*secret.json, outside"):
        prepare_upload_folder(source, tmp_path / "up2", card_info())


def test_push_without_network_is_one_clear_error(artefacts, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    with pytest.raises(ConnectionError, match=r"Could not push to me/tiny \(ConnectError: .*name resolution\)"):
        push_to_hub(artefacts["adapter"], "me/tiny", card_info=card_info(), token=TOKEN)


def test_push_never_uploads_a_local_base_path(tmp_path, artefacts, fake_hub):
    source = tmp_path / "adapter"
    shutil.copytree(artefacts["adapter"], source)
    config = json.loads((source / "adapter_config.json").read_text())
    local = str(tmp_path / "models" / "my-llama")
    (source / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": local}))
    push_to_hub(source, "me/tiny", card_info=card_info(), token=TOKEN)  # staged with links to the artefact
    uploaded = json.loads(fake_hub.committed_files()["adapter_config.json"])
    assert uploaded["base_model_name_or_path"] == BASE_ID
    assert json.loads((source / "adapter_config.json").read_text())["base_model_name_or_path"] == local  # untouched
    folder = prepare_upload_folder(source, tmp_path / "dry", card_info())
    assert local not in "".join(p.read_text(errors="ignore") for p in folder.iterdir() if p.is_file())
