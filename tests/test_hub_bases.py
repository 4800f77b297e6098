"""GPTQ and compressed-tensors INT4/INT8 checkpoints as QA-SparsePEFT bases: read into QuantLinear, trained, merged
with every zero kept, written back to their own format; the rounding residual rebuilt from the float model."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import ARCHS, byte_level_bpe, pruned, qa_config, random_llama, train_steps
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from hf_elastic import QuantLinear, export_subnetwork, get_supernet, load_hub_quantized, quantize
from hf_elastic.cli import main
from hf_elastic.compression.quantization import QuantizedBaseConfig, rebuild_residual
from hf_elastic.compression.quantization.hub_formats import GPTQSettings, gptq_module, gptq_tensors

ARCH = ARCHS["llama"]
requires_ct = pytest.mark.skipif(
    importlib.util.find_spec("compressed_tensors") is None, reason="needs hf-elastic[compressed-tensors]"
)


def float_base(vocab: int = 96):
    return pruned(random_llama(vocab, hidden_size=64, intermediate_size=128)).eval()


def rtn(model, bits: int, group_size: int, symmetric: bool, keep_residual: bool = False):
    model = copy.deepcopy(model)
    quantize(model, bits=bits, group_size=group_size, symmetric=symmetric, keep_residual=keep_residual,
             show_progress=False)  # fmt: skip
    return model


def quant_layers(model) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


# ------------------------------------------------------------------ GPTQ, byte by byte from the documented layout
def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's packing: row r of the result holds rows r * (32 // bits) + j of `values`, code j at bits j * bits."""
    per = 32 // bits
    out = np.zeros((values.shape[0] // per, values.shape[1]), dtype=np.uint32)
    for j in range(per):
        out |= values[j::per].astype(np.uint32) << np.uint32(bits * j)
    return out.view(np.int32)


def unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    per = 32 // bits
    w = words.view(np.uint32)
    out = np.zeros((w.shape[0] * per, w.shape[1]), dtype=np.int64)
    for j in range(per):
        out[j::per] = (w >> np.uint32(bits * j)) & np.uint32(2**bits - 1)
    return out


def write_gptq(folder, float_model, quantized, bits, group_size, symmetric, checkpoint_format, tokenizer=None):
    """A GPTQ checkpoint of `quantized`'s codes with float16 scales, as AutoGPTQ / GPTQModel lay it out."""
    float_model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    for name, m in quant_layers(quantized).items():
        del tensors[f"{name}.weight"]
        zeros = m.zeros.numpy().astype(np.int64)
        stored = zeros - 1 if checkpoint_format == "gptq" else zeros
        assert stored.min() >= 0  # the documented v1 layout needs zero points >= 1
        tensors[f"{name}.qweight"] = torch.from_numpy(pack_rows(m.qweight.numpy().T, bits))
        tensors[f"{name}.qzeros"] = torch.from_numpy(pack_rows(stored, bits).T.copy())
        tensors[f"{name}.scales"] = m.scales.T.half().contiguous()
        tensors[f"{name}.g_idx"] = torch.arange(m.in_features, dtype=torch.int32) // group_size
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": symmetric,
                                     "desc_act": False, "checkpoint_format": checkpoint_format}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def gptq_reference(tensors: dict, name: str, bits: int, checkpoint_format: str, dtype: torch.dtype) -> torch.Tensor:
    """The documented GPTQ dequantization: `scales[g_idx] * (q - z[g_idx])`, z = stored + 1 in v1, in `dtype`."""
    q = unpack_rows(tensors[f"{name}.qweight"].numpy(), bits)  # (in, out)
    z = unpack_rows(tensors[f"{name}.qzeros"].numpy().T.copy(), bits).T  # (groups, out)
    z = z + 1 if checkpoint_format == "gptq" else z
    g = tensors[f"{name}.g_idx"].long().numpy()
    scales = tensors[f"{name}.scales"].to(dtype)
    return (scales[g] * torch.from_numpy(q - z[g]).to(dtype)).T


GPTQ_SCHEMES = [(4, 32, False, "gptq"), (4, 32, True, "gptq_v2"), (8, 64, True, "gptq")]


def qa_train_merge(model, config="min"):
    peft_model = get_peft_model(model, qa_config(ARCH, grouped=False))
    train_steps(peft_model, ARCH, steps=2)
    sn = get_supernet(peft_model)
    return sn, sn.extract_model(config)


def assert_zeros_kept(base: dict[str, torch.Tensor], merged) -> None:
    changed = 0
    for name, m in quant_layers(merged).items():
        w = m.dequantize()
        assert (w[base[name] == 0] == 0).all(), name
        assert (w == 0).float().mean() >= 0.5, name
        changed += int((w != base[name]).sum())
    assert changed > 0  # training moved codes


@pytest.mark.parametrize(("bits", "group_size", "symmetric", "checkpoint_format"), GPTQ_SCHEMES)
def test_gptq_base_loads_trains_merges_and_exports_as_gptq(tmp_path, bits, group_size, symmetric, checkpoint_format):
    base = float_base()
    quantized = rtn(base, bits, group_size, symmetric)
    folder = write_gptq(tmp_path / "gptq", base, quantized, bits, group_size, symmetric, checkpoint_format)
    tensors = load_file(folder / "model.safetensors")

    model = load_hub_quantized(folder)
    layers = quant_layers(model)
    assert len(layers) == 14 and model.hf_elastic_source_format["format"] == "gptq"
    for name, m in layers.items():
        assert (m.bits, m.group_size, m.symmetric, m.residual) == (bits, group_size, symmetric, None)
        for dtype in (torch.float16, torch.float32):
            assert torch.equal(m.dequantize(dtype), gptq_reference(tensors, name, bits, checkpoint_format, dtype))
        source = quant_layers(quantized)[name]
        assert torch.equal(m.qweight, source.qweight) and torch.equal(m.zeros, source.zeros)
    base_weights = {name: m.dequantize() for name, m in layers.items()}

    sn, merged = qa_train_merge(model)
    assert_zeros_kept(base_weights, merged)
    out = export_subnetwork(sn, "min", tmp_path / "out", format="gptq")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qconfig["bits"], qconfig["group_size"], qconfig["sym"]) == (bits, group_size, symmetric)
    assert qconfig["checkpoint_format"] == checkpoint_format and qconfig["desc_act"] is False
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == bits
    written = load_file(out / "model.safetensors")
    back = load_hub_quantized(out)
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    for name, m in quant_layers(merged).items():
        assert torch.equal(gptq_reference(written, name, bits, checkpoint_format, torch.float32), m.dequantize())
        again = back.get_submodule(name)
        assert torch.equal(again.qweight, m.qweight) and torch.equal(again.zeros, m.zeros)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_gptq_words_round_trip_a_zero_point_of_zero():
    """v1 stores z - 1 by whole-word subtraction (GPTQModel's writer); z = 0 becomes -1 and reads back as 0."""
    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        codes = torch.randint(0, 2**bits, (16, 64), generator=g, dtype=torch.int64).to(torch.uint8)
        zeros = torch.randint(0, 2**bits, (16, 2), generator=g, dtype=torch.int64).to(torch.uint8)
        zeros[0, 0], zeros[3, 1], zeros[15, 1] = 0, 0, 2**bits - 1
        scales = (torch.rand(16, 2, generator=g) + 0.1).half().float()
        for checkpoint_format in ("gptq", "gptq_v2"):
            tensors = {f"x.{k}": v for k, v in gptq_tensors(codes, scales, zeros, 32, bits, checkpoint_format).items()}
            settings = GPTQSettings(bits, 32, False, False, checkpoint_format, {})
            got = gptq_module(tensors, "x", (16, 64), settings, "f")
            assert torch.equal(got[0], codes) and torch.equal(got[1], scales) and torch.equal(got[2], zeros)


# ---------------------------------------------------------------- compressed-tensors, with its own compressor
def write_compressed_tensors(folder, float_model, quantized, bits, group_size, symmetric):
    """A pack-quantized checkpoint of `quantized` written with compressed-tensors' own compressor and config."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                               strategy="channel" if group_size == -1 else "group",
                               group_size=None if group_size == -1 else group_size)  # fmt: skip
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    float_model.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    for name, m in quant_layers(quantized).items():
        del tensors[f"{name}.weight"]
        state = {"weight": m.dequantize(), "weight_scale": m.scales.clone()}
        if not symmetric:
            state["weight_zero_point"] = (m.zeros.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        compressed = PackedQuantizationCompressor.compress(state, scheme)
        tensors |= {f"{name}.{k}": v.contiguous() for k, v in compressed.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 quantization_status="compressed", ignore=["lm_head"])  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors",
                                     **qconfig.model_dump(exclude=["quant_method"], mode="json")}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return scheme


@requires_ct
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 32, False), (8, -1, True)])
def test_compressed_tensors_base_loads_trains_merges_and_exports(tmp_path, bits, group_size, symmetric):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from transformers import AutoModelForCausalLM

    base = float_base()
    quantized = rtn(base, bits, group_size, symmetric, keep_residual=True)
    scheme = write_compressed_tensors(tmp_path / "ct", base, quantized, bits, group_size, symmetric)
    tensors = load_file(tmp_path / "ct" / "model.safetensors")

    codes_only = load_hub_quantized(tmp_path / "ct")
    model = load_hub_quantized(tmp_path / "ct", float_model=base)
    for name, m in quant_layers(model).items():
        local = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        assert torch.equal(m.dequantize(), PackedQuantizationCompressor.decompress(local, scheme)["weight"]), name
        reference = quantized.get_submodule(name)
        assert torch.equal(m.residual, reference.residual), name  # rebuilt = what quantize(keep_residual=True) kept
        assert codes_only.get_submodule(name).residual is None
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with torch.no_grad():
        assert (stock(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-5

    base_weights = {name: m.dequantize() for name, m in quant_layers(model).items()}
    sn, merged = qa_train_merge(model)
    assert_zeros_kept(base_weights, merged)
    out = export_subnetwork(sn, "min", tmp_path / "out", format="compressed-tensors")
    written = load_file(out / "model.safetensors")
    for name, m in quant_layers(merged).items():
        local = {k.removeprefix(f"{name}."): v for k, v in written.items() if k.startswith(f"{name}.")}
        assert torch.equal(PackedQuantizationCompressor.decompress(local, scheme)["weight"], m.dequantize()), name
    back = load_hub_quantized(out)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, merged(input_ids=ids).logits)


# --------------------------------------------------------------------------------------------- wrong inputs
@pytest.fixture
def gptq_folder(tmp_path):
    base = float_base()
    write_gptq(tmp_path / "gptq", base, rtn(base, 4, 32, False), 4, 32, False, "gptq")
    return tmp_path / "gptq", base


def test_float_model_mismatches_are_named(tmp_path, gptq_folder):
    folder, base = gptq_folder
    model = load_hub_quantized(folder, float_model=base)
    assert all(m.residual is not None for m in quant_layers(model).values())
    with pytest.raises(FileNotFoundError, match=r"float_model .*/absent: neither a model folder nor a Hub model id"):
        load_hub_quantized(folder, float_model=tmp_path / "absent")
    with pytest.raises(ValueError, match=r"is itself a quantized checkpoint; pass the float model it was made from"):
        load_hub_quantized(folder, float_model=folder)
    narrow = random_llama(96, hidden_size=32, intermediate_size=128)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj is \(32, 32\), the quantized base's is"):
        rebuild_residual(model, narrow)
    other = random_llama(96, hidden_size=64, intermediate_size=128, seed=1)
    with pytest.raises(ValueError, match=r"q_proj lie \d+\.\d\d grid steps .* \(tolerance 1.0\); it is not the model"):
        rebuild_residual(model, other)
    short = copy.deepcopy(base)
    short.model.layers = short.model.layers[:1]
    with pytest.raises(ValueError, match=r"has no linear layer model.layers.1.self_attn.q_proj"):
        rebuild_residual(model, short)
    with pytest.raises(ValueError, match=r"float_model_tolerance=0 must be > 0"):
        QuantizedBaseConfig(float_model_tolerance=0)
    with pytest.raises(ValueError, match=r"is not a GPTQ or compressed-tensors checkpoint"):
        load_hub_quantized(tmp_path / "absent")


def test_gptq_export_refusals(tmp_path):
    float_model = get_peft_model(random_llama(96), qa_config(ARCH, grouped=False, quantization_aware=False))
    with pytest.raises(ValueError, match=r"format='gptq' writes the integer codes .* this one has no QuantLinear"):
        export_subnetwork(get_supernet(float_model), "max", tmp_path / "f", format="gptq")
    mixed = random_llama(96, hidden_size=64, intermediate_size=128)
    quantize(mixed, bits=4, group_size=32, modules=["mlp.down_proj"], show_progress=False)
    quantize(mixed, bits=8, group_size=32, show_progress=False)
    with pytest.raises(ValueError, match=r"one bits / group size / symmetric setting .* \(8, 32, False\)\]"):
        export_subnetwork(get_supernet(get_peft_model(mixed, qa_config(ARCH, grouped=False))), "max", tmp_path / "m",
                          format="gptq")  # fmt: skip
    rtn_model = get_peft_model(rtn(float_base(), 4, 32, False), qa_config(ARCH, grouped=False))
    with pytest.warns(UserWarning, match=r"stores scales in float16, which changes this model's float32 scales by up"):
        export_subnetwork(get_supernet(rtn_model), "max", tmp_path / "r", format="gptq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def _edit(folder, config=None, tensors=None):
    if config is not None:
        data = json.loads((folder / "config.json").read_text())
        data["quantization_config"] |= config
        (folder / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        state = load_file(folder / "model.safetensors")
        tensors(state)
        save_file(state, folder / "model.safetensors")


def test_gptq_refusals_name_the_file_and_the_setting(gptq_folder):
    folder, _ = gptq_folder
    _edit(folder, {"bits": 3})
    with pytest.raises(ValueError, match=r"config.json has bits=3; hf_elastic's QuantLinear holds 4- or 8-bit"):
        load_hub_quantized(folder)
    _edit(folder, {"bits": 4, "checkpoint_format": "marlin"})
    with pytest.raises(ValueError, match=r"checkpoint_format='marlin'; hf_elastic reads the GPTQ formats"):
        load_hub_quantized(folder)
    _edit(folder, {"checkpoint_format": "gptq", "dynamic": {"-:.*down_proj": {}}})
    with pytest.raises(ValueError, match=r"sets per-module overrides \('dynamic'\)"):
        load_hub_quantized(folder)
    _edit(folder, {"dynamic": None, "desc_act": True})
    load_hub_quantized(folder)  # desc_act with in-order groups (static groups) loads
    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(0)).int() // 32
    _edit(folder, tensors=lambda s: s.__setitem__("model.layers.0.mlp.up_proj.g_idx", shuffled))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.g_idx assigns input channels to groups out of"):
        load_hub_quantized(folder)
    dropped = ("model.layers.0.mlp.up_proj.g_idx", "model.layers.1.self_attn.v_proj.qzeros")
    _edit(folder, {"desc_act": False}, tensors=lambda s: [s.pop(key) for key in dropped])
    with pytest.raises(ValueError, match=r"model.safetensors has no 'model.layers.1.self_attn.v_proj.qzeros': the"):
        load_hub_quantized(folder)


@requires_ct
def test_compressed_tensors_refusals(tmp_path):
    base = float_base()
    write_compressed_tensors(tmp_path / "ct", base, rtn(base, 4, 32, False), 4, 32, False)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    for change, message in (
        ({"format": "naive-quantized"}, r"config group 'group_0' has format 'naive-quantized'; hf_elastic reads"),
        ({"config_groups": {"group_0": config["quantization_config"]["config_groups"]["group_0"]
                            | {"input_activations": {"num_bits": 8, "type": "int"}}}},
         r"config group 'group_0' quantizes input_activations; hf_elastic reads weight-only"),
        ({"sparsity_config": {"format": "sparse-24-bitmask"}}, r"sets sparsity_config"),
    ):  # fmt: skip
        _edit(tmp_path / "ct", change)
        with pytest.raises(ValueError, match=message):
            load_hub_quantized(tmp_path / "ct")
        (tmp_path / "ct" / "config.json").write_text(json.dumps(config))


def test_cli_trains_and_exports_a_gptq_base_with_its_float_model(tmp_path, capsys):
    words = ["good food", "bad taste", "great tea", "not very good", "it was bad"]
    tokenizer = byte_level_bpe(words * 10, 300, ["</s>"], eos_token="</s>", pad_token="</s>")
    base = float_base(vocab=len(tokenizer))
    base.save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    folder = write_gptq(tmp_path / "gptq", base, rtn(base, 4, 32, True), 4, 32, True, "gptq", tokenizer)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"review": " ".join(words[i:] + words[:i])}) + "\n" for i in range(5)) * 4)
    train = ["train", str(folder), str(tmp_path / "super"), "--data", str(data), "--template", "{review}",
             "--seq-len", "16", "--rank-choices", "4", "2", "--target-modules", "q_proj", "v_proj",
             "--quantization-aware", "--sparse-adapter", "--max-steps", "2", "--batch-size", "4"]  # fmt: skip
    main(train + ["--float-model", str(tmp_path / "float")])
    export = ["export", str(tmp_path / "super"), "--base", str(folder), "--config", "min", "--format", "gptq",
              "--float-model", str(tmp_path / "float")]  # fmt: skip
    main(export + ["--output", str(tmp_path / "out")])
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out
    back = load_hub_quantized(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["sym"] is True
    assert (tmp_path / "out" / "tokenizer.json").is_file() and len(quant_layers(back)) == 14

    with pytest.raises(SystemExit):
        main(train[:2] + [str(tmp_path / "t2")] + train[3:] + ["--float-model", str(tmp_path / "absent")])
    assert "error: --float-model " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path / "float"), str(tmp_path / "t3"), *train[3:], "--float-model", str(folder)])
    assert "--float-model applies to a GPTQ or compressed-tensors INT4/INT8 base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(export + ["--output", str(tmp_path / "o2"), "--float-model-tolerance", "0"])
    assert "--float-model-tolerance: 0 must be > 0" in capsys.readouterr().err


def test_a_hub_id_of_a_gptq_checkpoint_loads_from_the_cache(tmp_path, monkeypatch, gptq_folder):
    import shutil

    import huggingface_hub

    folder, base = gptq_folder
    snapshot = tmp_path / "hub" / "models--me--tiny-gptq" / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = load_hub_quantized("me/tiny-gptq", float_model=base)
    reference = load_hub_quantized(folder, float_model=base)
    for name, m in quant_layers(model).items():
        assert torch.equal(m.qweight, reference.get_submodule(name).qweight)
        assert torch.equal(m.residual, reference.get_submodule(name).residual)
