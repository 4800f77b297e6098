"""The INT4/INT8 weight formats of Hub checkpoints, read into (and written from) `QuantLinear`'s codes, scales and
zero points: GPTQ (AutoGPTQ / GPTQModel) and compressed-tensors `pack-quantized`. No gptqmodel or auto-gptq needed.

GPTQ, per quantized linear layer `name` (codes `q`, zero points `z`, `w = (q - z) * s`):

- `name.qweight`: int32 (in * bits / 32, out), codes packed along the input dimension, the first in the lowest bits;
- `name.qzeros`: int32 (groups, out * bits / 32), zero points packed along the output dimension;
- `name.scales`: float16 (groups, out);
- `name.g_idx`: int32 (in,), the group of each input channel (`i // group_size` unless `desc_act` reordered them);
- `name.bias`: optional.

`checkpoint_format` "gptq" (v1, what AutoGPTQ wrote and most Hub models hold) stores `z - 1` in every zero-point field:
read as GPTQModel does, by adding `0x11111111` (INT4; `0x01010101` for INT8) to each whole word, which undoes the
whole-word subtraction its writer does (so a zero point of 0, stored as -1, survives); "gptq_v2" stores `z`.
Symmetric GPTQ has `z = 2**(bits - 1)` everywhere.

compressed-tensors `pack-quantized`: `name.weight_packed` int32 (out, in * bits / 32) holds `q` (the signed code plus
`2**(bits - 1)`) packed along the input dimension, `name.weight_scale` (out, groups), `name.weight_zero_point` int32
(out * bits / 32, groups) packed along the output dimension (asymmetric only), `name.weight_shape` (out, in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...utils import read_json

GPTQ = "gptq"
COMPRESSED_TENSORS = "compressed-tensors"
GPTQ_CONFIG_NAME = "quantize_config.json"
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
PACK_QUANTIZED = "pack-quantized"
_BITS = (4, 8)


def _read(path: Path) -> dict[str, Any]:
    return read_json(path, fix="download the checkpoint again")


def hub_quantization(folder: str | Path) -> tuple[str, dict[str, Any], Path] | None:
    """`(format, quantization config, the file it is in)` of a GPTQ or compressed-tensors checkpoint folder, or None
    for any other folder. GPTQ's settings come from `config.json`'s `quantization_config` (`quant_method: gptq`) or
    AutoGPTQ's `quantize_config.json`."""
    folder = Path(folder)
    config_file = folder / "config.json"
    qconfig = _read(config_file).get("quantization_config") if config_file.is_file() else None
    if isinstance(qconfig, dict):
        method = qconfig.get("quant_method")
        if method == GPTQ:
            return GPTQ, qconfig, config_file
        if method == COMPRESSED_TENSORS:
            return COMPRESSED_TENSORS, qconfig, config_file
    gptq_file = folder / GPTQ_CONFIG_NAME
    if gptq_file.is_file():
        return GPTQ, _read(gptq_file), gptq_file
    return None


# ------------------------------------------------------------------------------------------------ integer words
def unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int64 codes from integer `words` packed along `dim`: `word_bits // bits` codes per word, the first in the
    lowest bits (the layout of GPTQ and, for 4 and 8 bits, of compressed-tensors)."""
    per_word = words.element_size() * 8 // bits
    w = words.to(torch.int64).movedim(dim, -1)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    codes = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.flatten(-2).movedim(-1, dim)


def pack_words(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The int32 words of `unpack_words`: `codes` (values in [0, 2**bits - 1]) packed along `dim`, which must hold a
    multiple of `32 // bits` codes."""
    per_word = 32 // bits
    c = codes.to(torch.int64).movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per_word, per_word)
    words = (c << (torch.arange(per_word, dtype=torch.int64) * bits)).sum(-1)
    return _wrap(words).movedim(-1, dim).contiguous()


def _wrap(words: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """int64 values taken modulo the size of the integer `dtype`, in it (two's complement); int64 wraps by itself."""
    if dtype == torch.int64:
        return words
    word_bits = torch.iinfo(dtype).bits
    words = torch.remainder(words, 2**word_bits)
    return torch.where(words >= 2 ** (word_bits - 1), words - 2**word_bits, words).to(dtype)


def _v1_offset(bits: int, word_bits: int) -> int:
    return sum(1 << (k * bits) for k in range(word_bits // bits))


# ------------------------------------------------------------------------------------------------------ GPTQ
@dataclass(frozen=True)
class GPTQSettings:
    """The settings of a GPTQ checkpoint that reading it needs."""

    bits: int
    group_size: int  # -1: one group per row
    symmetric: bool
    desc_act: bool
    checkpoint_format: str
    source: dict[str, Any]

    @classmethod
    def from_config(cls, qconfig: dict[str, Any], file: Path) -> GPTQSettings:
        bits, group_size = qconfig.get("bits"), qconfig.get("group_size", 128)
        if bits not in _BITS or isinstance(bits, bool):
            raise ValueError(
                f"{file} has bits={bits!r}; hf_elastic's QuantLinear holds 4- or 8-bit codes, so GPTQ bases with "
                "bits=4 or bits=8 load. Use a 4- or 8-bit checkpoint."
            )
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
            raise ValueError(f"{file} has group_size={group_size!r}; GPTQ group sizes are positive or -1.")
        checkpoint_format = qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))
        if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
            raise ValueError(
                f"{file} has checkpoint_format={checkpoint_format!r}; hf_elastic reads the GPTQ formats "
                f"{list(GPTQ_CHECKPOINT_FORMATS)} (Marlin, BitBLAS and other kernel layouts are repacked weights: "
                "convert the checkpoint to 'gptq' with GPTQModel first)."
            )
        if qconfig.get("dynamic"):
            raise ValueError(
                f"{file} sets per-module overrides ('dynamic'); hf_elastic reads GPTQ checkpoints with one setting "
                "for every module."
            )
        return cls(
            bits,
            group_size,
            bool(qconfig.get("sym", True)),
            bool(qconfig.get("desc_act", False)),
            checkpoint_format,
            dict(qconfig),
        )


def _need(tensors: dict[str, torch.Tensor], key: str, files: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{files} has no {key!r}: the checkpoint is incomplete; download it again.")
    return tensors[key]


def _check_shape(key: str, tensor: torch.Tensor, shape: tuple[int, ...], why: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{key} is {tuple(tensor.shape)} but {why} needs {shape}; the checkpoint does not fit its "
                         "config.json.")  # fmt: skip


def gptq_module(
    tensors: dict[str, torch.Tensor],
    name: str,
    shape: tuple[int, int],
    settings: GPTQSettings,
    files: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`(codes uint8 (out, in), scales float32 (out, groups), zero points uint8 (out, groups), group size)` of the GPTQ
    layer `name` whose stock module is `shape` = (out, in)."""
    out_features, in_features = shape
    bits = settings.bits
    group_size = in_features if settings.group_size == -1 else min(settings.group_size, in_features)
    if in_features % group_size:
        raise ValueError(
            f"{name}: group_size={group_size} does not divide its {in_features} input channels; hf_elastic's "
            "QuantLinear needs whole groups."
        )
    groups = in_features // group_size
    qweight, qzeros = _need(tensors, f"{name}.qweight", files), _need(tensors, f"{name}.qzeros", files)
    scales = _need(tensors, f"{name}.scales", files)
    for key, tensor in ((f"{name}.qweight", qweight), (f"{name}.qzeros", qzeros)):
        if tensor.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
            raise ValueError(f"{key} is {tensor.dtype}; GPTQ packs codes into integer words.")
    word_bits = qweight.element_size() * 8
    why = (
        f"{bits}-bit codes, group size {group_size}, {word_bits}-bit words and the {out_features}x{in_features} layer"
    )
    _check_shape(f"{name}.qweight", qweight, (in_features * bits // word_bits, out_features), why)
    _check_shape(f"{name}.qzeros", qzeros, (groups, out_features * bits // (qzeros.element_size() * 8)), why)
    _check_shape(f"{name}.scales", scales, (groups, out_features), why)
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is not None:
        _check_shape(f"{name}.g_idx", g_idx, (in_features,), why)
        if not torch.equal(g_idx.long(), torch.arange(in_features) // group_size):
            raise ValueError(
                f"{name}.g_idx assigns input channels to groups out of order (desc_act=True without static groups): "
                "hf_elastic's QuantLinear shares a scale across consecutive input channels only, and cannot express "
                "this layer. Use a checkpoint quantized with desc_act=False, or with static_groups=True."
            )
    codes = unpack_words(qweight, bits, 0).T
    if settings.checkpoint_format == "gptq":  # v1: every field holds z - 1, subtracted from the whole word
        qzeros = _wrap(qzeros.to(torch.int64) + _v1_offset(bits, qzeros.element_size() * 8), qzeros.dtype)
    zeros = unpack_words(qzeros, bits, 1).T
    return (
        codes.to(torch.uint8).contiguous(),
        scales.T.float().contiguous(),
        zeros.to(torch.uint8).contiguous(),
        group_size,
    )


def gptq_tensors(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int, checkpoint_format: str
) -> dict[str, torch.Tensor]:
    """The GPTQ tensors (`qweight`, `qzeros`, `scales` float16, `g_idx`) of one layer's codes, scales and zero points
    (as `QuantLinear` holds them), in `checkpoint_format` "gptq" (v1) or "gptq_v2"."""
    out_features, in_features = codes.shape
    if in_features % (32 // bits) or out_features % (32 // bits):
        raise ValueError(
            f"GPTQ packs {32 // bits} codes per int32 word along both dimensions; a {out_features}x{in_features} "
            "layer does not fill whole words."
        )
    qzeros = pack_words(zeros.T, bits, 1).to(torch.int64)
    if checkpoint_format == "gptq":
        qzeros = qzeros - _v1_offset(bits, 32)
    return {
        "qweight": pack_words(codes.T, bits, 0),
        "qzeros": _wrap(qzeros),
        "scales": scales.T.to(torch.float16).contiguous(),
        "g_idx": (torch.arange(in_features) // group_size).to(torch.int32),
    }


# ----------------------------------------------------------------------------------------- compressed-tensors
def check_compressed_tensors_config(qconfig: dict[str, Any], file: Path) -> None:
    """Refuse compressed-tensors checkpoints other than weight-only INT4/INT8 `pack-quantized`, naming what differs."""
    groups = qconfig.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{file}: its compressed-tensors quantization_config has no config_groups.")
    where = f"{file} (compressed-tensors)"
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        value = qconfig.get(key)
        if value and not (key == "sparsity_config" and value.get("format") in (None, "dense")):
            raise ValueError(
                f"{where} sets {key}; hf_elastic reads weight-only INT4/INT8 pack-quantized checkpoints without it."
            )
    for group_name, scheme in groups.items():
        fmt = scheme.get("format") or qconfig.get("format")
        if fmt != PACK_QUANTIZED:
            raise ValueError(
                f"{where}: config group {group_name!r} has format {fmt!r}; hf_elastic reads {PACK_QUANTIZED!r} "
                "(INT4/INT8 codes packed in int32)."
            )
        weights = scheme.get("weights") or {}
        bits, strategy = weights.get("num_bits"), weights.get("strategy")
        if weights.get("type") != "int" or bits not in _BITS:
            raise ValueError(
                f"{where}: config group {group_name!r} has {weights.get('type')!r} weights of {bits!r} bits; "
                "hf_elastic's QuantLinear holds 4- or 8-bit integer codes."
            )
        if strategy not in ("group", "channel"):
            raise ValueError(
                f"{where}: config group {group_name!r} has strategy {strategy!r}; hf_elastic reads 'group' and "
                "'channel' (one scale per group of input channels, or per row)."
            )
        for act in ("input_activations", "output_activations"):
            if scheme.get(act):
                raise ValueError(
                    f"{where}: config group {group_name!r} quantizes {act}; hf_elastic reads weight-only checkpoints."
                )


def compressed_tensors_module(
    tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int], files: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, bool]:
    """`(codes, scales, zero points, bits, group size, symmetric)` of the pack-quantized layer `name` (stock shape
    (out, in)); bits, group size and symmetry follow from the tensors' shapes and the zero point's presence."""
    out_features, in_features = shape
    packed = _need(tensors, f"{name}.weight_packed", files)
    scales = _need(tensors, f"{name}.weight_scale", files)
    if packed.dtype != torch.int32:
        raise ValueError(f"{name}.weight_packed is {packed.dtype}; pack-quantized stores int32 words.")
    stored_shape = tensors.get(f"{name}.weight_shape")
    if stored_shape is not None and tuple(int(v) for v in stored_shape.flatten()) != shape:
        raise ValueError(
            f"{name}.weight_shape is {tuple(stored_shape.tolist())} but the model's config gives {shape}; the "
            "checkpoint does not fit its config.json."
        )
    bits = next((b for b in _BITS if packed.shape[-1] == math.ceil(in_features * b / 32)), None)
    if bits is None or packed.shape[0] != out_features:
        raise ValueError(
            f"{name}.weight_packed is {tuple(packed.shape)}, which holds neither 4- nor 8-bit codes of a "
            f"{out_features}x{in_features} layer."
        )
    if scales.dim() != 2 or scales.shape[0] != out_features or in_features % scales.shape[1]:
        raise ValueError(
            f"{name}.weight_scale is {tuple(scales.shape)}; hf_elastic needs ({out_features}, groups) with groups "
            f"dividing the {in_features} input channels (whole groups)."
        )
    group_size = in_features // scales.shape[1]
    g_idx = tensors.get(f"{name}.weight_g_idx")
    if g_idx is not None and not torch.equal(g_idx.long().flatten(), torch.arange(in_features) // group_size):
        raise ValueError(
            f"{name}.weight_g_idx assigns input channels to groups out of order (actorder='group'); hf_elastic's "
            "QuantLinear shares a scale across consecutive input channels only, and cannot express this layer."
        )
    codes = unpack_words(packed, bits, 1)[:, :in_features]
    zero_point = tensors.get(f"{name}.weight_zero_point")
    if zero_point is None:
        zeros = torch.full((out_features, scales.shape[1]), 2 ** (bits - 1), dtype=torch.int64)
    else:
        zeros = unpack_words(zero_point.to(torch.int32), bits, 0)[:out_features]
        if zeros.shape != (out_features, scales.shape[1]):
            raise ValueError(f"{name}.weight_zero_point is {tuple(zero_point.shape)}, which does not fit "
                             f"{out_features} rows and {scales.shape[1]} groups.")  # fmt: skip
    return (
        codes.to(torch.uint8).contiguous(),
        scales.float().contiguous(),
        zeros.to(torch.uint8).contiguous(),
        bits,
        group_size,
        zero_point is None,
    )
