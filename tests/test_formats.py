"""Serving formats of a merged INT4/INT8 sub-network: compressed-tensors (transformers, vLLM) and GGUF (llama.cpp)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ARCHS, byte_level_bpe, pruned, qa_config, random_llama, train_steps
from peft import get_peft_model
from safetensors.torch import load_file

from hf_elastic import QuantLinear, export_subnetwork, get_supernet, load_exported, quantize
from hf_elastic.cli import main
from hf_elastic.export import save_compressed_tensors
from hf_elastic.models import find_width_layers, slice_layer_width

requires_ct = pytest.mark.skipif(
    importlib.util.find_spec("compressed_tensors") is None, reason="needs hf-elastic[compressed-tensors]"
)
ARCH = ARCHS["llama"]
# (bits, group size, symmetric, 50 %-sparse base)
SCHEMES = [
    (4, 32, False, False),
    (4, 32, True, False),
    (8, 32, False, False),
    (4, 32, False, True),
    (4, 32, True, True),
    (8, -1, True, True),
]


def qa_supernet(bits: int, group_size: int, symmetric: bool, sparse: bool, vocab: int = 96):
    """A QA-SparsePEFT super-network (two training steps) on a tiny Llama quantized with round-to-nearest."""
    base = random_llama(vocab, hidden_size=64, intermediate_size=128).eval()
    if sparse:
        base = pruned(base)
    quantize(base, bits=bits, group_size=group_size, symmetric=symmetric, keep_residual=True, show_progress=False)
    model = get_peft_model(base, qa_config(ARCH, grouped=False))
    train_steps(model, ARCH, steps=2)
    return get_supernet(model)


def stock_logits(folders: list[str], ids: torch.Tensor, tmp_path) -> list[dict]:
    """Load each folder with stock transformers in a fresh process that never imports hf_elastic."""
    torch.save(ids, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        out = []
        for folder in {folders!r}:
            model = AutoModelForCausalLM.from_pretrained(folder)
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            torch.save(logits, folder + "/stock_logits.pt")
            linears = {{n: m for n, m in model.named_modules() if type(m).__name__ == "Linear"}}
            out.append({{"zeros": {{n: int((m.weight == 0).sum()) for n, m in linears.items()}},
                         "dtype": str(model.model.layers[0].mlp.down_proj.weight.dtype)}})
        assert not any(name.startswith("hf_elastic") for name in sys.modules), "hf_elastic was imported"
        print(json.dumps(out))
    """)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for folder, result in zip(folders, results, strict=True):
        result["logits"] = torch.load(f"{folder}/stock_logits.pt")
    return results


@requires_ct
def test_compressed_tensors_loads_in_stock_transformers_with_equal_logits(tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    folders, references = [], []
    for i, (bits, group_size, symmetric, sparse) in enumerate(SCHEMES):
        sn = qa_supernet(bits, group_size, symmetric, sparse)
        sn.activate("min")
        with torch.no_grad():
            qa_logits = sn.model(input_ids=ids).logits
        merged = sn.extract_model("min")
        out = export_subnetwork(sn, "min", tmp_path / f"ct{i}", format="compressed-tensors")
        config = json.loads((out / "config.json").read_text())
        qconfig = config["quantization_config"]
        assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
        assert qconfig["ignore"] == ["lm_head"] and qconfig["quantization_status"] == "compressed"
        weights = qconfig["config_groups"]["group_0"]["weights"]
        assert weights["num_bits"] == bits and weights["symmetric"] == symmetric
        assert weights["strategy"] == ("channel" if group_size == -1 else "group")
        assert "hf_elastic_only" not in config and config["model_type"] == "llama"
        info = json.loads((out / "elastic_subnet.json").read_text())
        assert info["quantization_aware"] is True and info["config"] == sn.resolve("min")
        if sparse:
            assert json.loads((out / "sparsity_report.json").read_text())["sparsity"] >= 0.5

        # the written tensors, through compressed-tensors' own compressor and decompressor
        tensors = load_file(out / "model.safetensors")
        scheme = QuantizationScheme.model_validate(qconfig["config_groups"]["group_0"])
        quant = {name: m for name, m in merged.named_modules() if isinstance(m, QuantLinear)}
        assert len(quant) == 14 and not any(k.endswith((".qweight", ".scales", ".residual")) for k in tensors)
        for name, module in quant.items():
            local = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
            expected_keys = {"weight_packed", "weight_scale", "weight_shape"} | (
                set() if symmetric else {"weight_zero_point"}
            )
            assert set(local) == expected_keys, name
            assert local["weight_packed"].dtype == torch.int32 and local["weight_scale"].dtype == torch.float32
            assert local["weight_packed"].shape == (module.out_features, module.in_features * bits // 32)
            decompressed = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            assert torch.equal(decompressed, module.dequantize()), name
            offset = 2 ** (bits - 1)
            source = {"weight": module.dequantize(), "weight_scale": module.scales}
            if not symmetric:
                source["weight_zero_point"] = (module.zeros.to(torch.int16) - offset).to(torch.int8)
            compressed = PackedQuantizationCompressor.compress(source, scheme)
            assert torch.equal(compressed["weight_packed"], local["weight_packed"]), name
            if not symmetric:
                assert torch.equal(compressed["weight_zero_point"], local["weight_zero_point"]), name
        with torch.no_grad():
            merged_logits = merged(input_ids=ids).logits
        assert (merged_logits - qa_logits).abs().max() <= 1e-5
        folders.append(str(out))
        zeros = {name: int((m.dequantize() == 0).sum()) for name, m in quant.items()}
        sparsity = sum(zeros.values()) / sum(m.in_features * m.out_features for m in quant.values())
        assert (sparsity >= 0.5) == sparse
        references.append((merged_logits, zeros))

    for (bits, group_size, symmetric, sparse), (reference, zeros), stock in zip(
        SCHEMES, references, stock_logits(folders, ids, tmp_path), strict=True
    ):
        diff = (stock["logits"] - reference).abs().max().item()
        print(f"INT{bits} g{group_size} sym={symmetric} sparse={sparse}: max |stock - hf-elastic| = {diff:.2e}")
        assert diff <= 1e-5
        assert stock["dtype"] == "torch.float32"
        assert {n: stock["zeros"][n] for n in zeros} == zeros  # every zero of the sparse base kept


@requires_ct
def test_compressed_tensors_refusals(tmp_path):
    float_model = get_peft_model(random_llama(96), qa_config(ARCH, grouped=False, quantization_aware=False))
    with pytest.raises(ValueError, match=r"this one has no QuantLinear: quantize the base with hf_elastic.quantize"):
        export_subnetwork(get_supernet(float_model), "max", tmp_path / "f", format="compressed-tensors")
    assert not (tmp_path / "f").exists()
    with pytest.raises(ValueError, match=r"format='awq' is unknown; use one of 'hf-elastic', 'compressed-tensors'"):
        export_subnetwork(get_supernet(float_model), "max", tmp_path / "f", format="awq")
    widths = random_llama(96, hidden_size=64, intermediate_size=128)  # per-layer widths, then quantized
    slice_layer_width(find_width_layers(widths)[1][1], torch.arange(64), None)
    quantize(widths, bits=4, group_size=32, show_progress=False)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.gate_proj is 64x64 here and 128x64 from the config"):
        save_compressed_tensors(widths, tmp_path / "w")
    gpt2 = ARCHS["gpt2"].build()
    quantize(gpt2, bits=4, group_size=16, show_progress=False)
    with pytest.raises(
        ValueError, match=r"\['transformer.h.0.attn.c_attn', .* are not nn.Linear in stock GPT2LMHeadModel"
    ):
        save_compressed_tensors(gpt2, tmp_path / "g")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_compressed_tensors_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    model = get_peft_model(random_llama(96), qa_config(ARCH, grouped=False, quantization_aware=False))
    with pytest.raises(ImportError, match=r"pip install 'hf-elastic\[compressed-tensors\]'"):
        export_subnetwork(get_supernet(model), "max", tmp_path / "f", format="compressed-tensors")


@requires_ct
def test_cli_export_format_compressed_tensors(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    random_llama(300, hidden_size=64, intermediate_size=128).save_pretrained(base)
    words = ["good food", "bad taste", "great tea", "not very good", "it was bad"]
    byte_level_bpe(words * 10, 300, ["</s>"], eos_token="</s>", pad_token="</s>").save_pretrained(base)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"review": " ".join(words[i:] + words[:i])}) + "\n" for i in range(5)) * 4)
    int4 = tmp_path / "int4"
    main(["quantize", str(base), str(int4), "--group-size", "32", "--keep-residual"])
    super_dir = tmp_path / "super"
    main(["train", str(int4), str(super_dir), "--data", str(data), "--template", "{review}", "--seq-len", "16",
          "--rank-choices", "4", "2", "--target-modules", "q_proj", "v_proj", "--quantization-aware",
          "--max-steps", "2", "--batch-size", "4"])  # fmt: skip
    export = ["export", str(super_dir), "--base", str(int4), "--config", "min"]
    main(export + ["--output", str(tmp_path / "ct"), "--format", "compressed-tensors"])
    main(export + ["--output", str(tmp_path / "hf")])
    if importlib.util.find_spec("gguf") is not None:
        main(export + ["--output", str(tmp_path / "gguf"), "--format", "gguf"])
        assert (tmp_path / "gguf" / "model.gguf").stat().st_size > 0
    assert f"wrote {tmp_path / 'ct'}" in capsys.readouterr().out
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    reference = load_exported(tmp_path / "hf")
    assert isinstance(reference.model.layers[0].self_attn.q_proj, QuantLinear)
    assert (tmp_path / "ct" / "tokenizer.json").is_file()
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (stock(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() <= 1e-5
    main(["push", str(tmp_path / "ct"), "me/tiny-ct", "--base-model", "me/base", "--dry-run", "--local-dir",
          str(tmp_path / "card")])  # fmt: skip
    card = (tmp_path / "card" / "README.md").read_text()
    assert "stored in the compressed-tensors `pack-quantized` format (INT4, group size 32)" in card
    assert "vllm serve me/tiny-ct" in card and 'AutoModelForCausalLM.from_pretrained("me/tiny-ct")' in card
    assert "library_name: transformers" in card and "base_model_relation: quantized" in card
    assert "4-bit integers (asymmetric) with one scale per group of 32 weights" in card
    with pytest.raises(SystemExit):
        main(export + ["--output", str(tmp_path / "o"), "--format", "compressed-tensors", "--openvino"])
    assert "error: --openvino reads the hf-elastic folder; with --format compressed-tensors" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- GGUF
requires_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs hf-elastic[gguf]")
# (bits, group size, symmetric, sparse base, the ggml type expected for the quantized layers)
GGUF_SCHEMES = [(4, 64, False, True, "Q4_1"), (4, 32, True, True, "Q4_0"), (8, 32, True, False, "Q8_0"),
                (8, 32, False, False, "F32")]  # fmt: skip


def gguf_tokenizer():
    words = ["good food", "bad taste", "great tea", "not very good", "it was bad"]
    return byte_level_bpe(words * 10, 300, ["</s>"], eos_token="</s>", pad_token="</s>", bos_token="</s>")


@requires_gguf
@pytest.mark.parametrize(("bits", "group_size", "symmetric", "sparse", "ggml_type"), GGUF_SCHEMES)
def test_gguf_export_reads_back_with_gguf_and_transformers(tmp_path, bits, group_size, symmetric, sparse, ggml_type):
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    from hf_elastic.export.gguf_file import permute_rows

    tokenizer = gguf_tokenizer()
    sn = qa_supernet(bits, group_size, symmetric, sparse, vocab=len(tokenizer))
    merged = sn.extract_model("min")
    out = export_subnetwork(sn, "min", tmp_path / "gguf", tokenizer=tokenizer, format="gguf")
    assert sorted(p.name for p in out.iterdir())[:2] == ["elastic_subnet.json", "model.gguf"]
    reader = GGUFReader(out / "model.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.feed_forward_length"] == 128 and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(fields["tokenizer.ggml.merges"]) == len(
        json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    )
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors and tensors["token_embd.weight"].tensor_type.name == "F32"
    assert np.array_equal(tensors["token_embd.weight"].data, merged.model.embed_tokens.weight.detach().numpy())
    worst = 0.0
    for i, layer in enumerate(merged.model.layers):
        for hf_name, gguf_name in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                                   ("mlp.down_proj", "ffn_down")):  # fmt: skip
            module = layer.get_submodule(hf_name)
            assert isinstance(module, QuantLinear)
            tensor = tensors[f"blk.{i}.{gguf_name}.weight"]
            assert tensor.tensor_type.name == ggml_type
            got = dequantize(tensor.data, tensor.tensor_type).reshape(module.out_features, module.in_features)
            q, s, z = module.qweight.float(), module.scales, module.zeros.float()
            d = s.half().float().repeat_interleave(group_size, 1)
            z = z.repeat_interleave(group_size, 1)
            if ggml_type == "Q4_1":
                expected = d * q + (-z * d).half().float()  # d = fp16(s), m = fp16(-z d)
            elif ggml_type in ("Q8_0", "Q4_0"):
                expected = d * (q - z)  # Q4_0: z = 8
            else:
                expected = module.dequantize()
            reference = module.dequantize()
            if gguf_name in ("attn_q", "attn_k"):
                n_head = 4 if gguf_name == "attn_q" else 2
                expected, reference = permute_rows(expected, n_head), permute_rows(reference, n_head)
            assert np.array_equal(got, expected.numpy()), (i, hf_name)
            diff = np.abs(got - reference.numpy())
            assert (diff <= 2**-11 * 2**bits * s.max().item()).all()  # fp16 rounding of d (and m)
            if symmetric or ggml_type == "F32":
                assert np.array_equal(got == 0, reference.numpy() == 0)  # symmetric: m = -8 d is exact
            worst = max(worst, float(diff.max()))
    print(f"GGUF INT{bits} g{group_size} sym={symmetric} {ggml_type}: max |weight - hf-elastic| = {worst:.2e}")

    stock = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("good food and great tea, not bad")])
    with torch.no_grad():
        diff = (stock(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
    print(f"transformers' GGUF loader: max |logits - hf-elastic| = {diff:.2e}")
    assert diff <= (0.0 if ggml_type == "F32" else 2e-3)


@requires_gguf
def test_gguf_refusals(tmp_path):
    from hf_elastic.export.gguf_file import write_gguf

    tokenizer = gguf_tokenizer()
    model = random_llama(len(tokenizer), hidden_size=64, intermediate_size=128)
    quantize(model, bits=4, group_size=16, show_progress=False)
    with pytest.raises(ValueError, match=r"blocks of 32 weights with one scale, but model.layers.0.* group_size=16"):
        write_gguf(model, tmp_path / "a.gguf", tokenizer)
    with pytest.raises(ValueError, match=r"writes Llama-architecture models .* model_type='gpt2'"):
        write_gguf(ARCHS["gpt2"].build(), tmp_path / "c.gguf", tokenizer)
    float_model = get_peft_model(
        random_llama(len(tokenizer)), qa_config(ARCH, grouped=False, quantization_aware=False)
    )
    with pytest.raises(ValueError, match=r"format='gguf' needs tokenizer=...: llama.cpp reads the vocabulary"):
        export_subnetwork(get_supernet(float_model), "max", tmp_path / "d", format="gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
