"""Write an INT4/INT8 model as a GPTQ checkpoint (`qweight`, `qzeros`, `scales`, `g_idx`; see
`hf_elastic.compression.quantization.hub_formats`), the format of the GPTQ base it came from.

The codes and zero points are written as they are; GPTQ stores scales in float16, which is exact for a base read from
a GPTQ checkpoint (its scales were float16) and rounds the float32 scales of hf_elastic's own quantizers (a warning
says by how much). The checkpoint format ("gptq", v1, unless the base came as "gptq_v2") and the other settings of the
source's quantization config are kept. In v1, an asymmetric group with zero point 0 is stored as GPTQModel writes it
(-1, subtracted from the whole word), which GPTQModel and hf_elastic read back exactly and v1 kernels that add 1 per
field (vLLM's) do not. Loading the result needs what any GPTQ checkpoint needs (transformers with
gptqmodel, or vLLM); hf_elastic reads it back with `load_hub_quantized`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..compression.quantization.format import QuantLinear
from ..compression.quantization.hub_formats import GPTQ, GPTQ_CONFIG_NAME, gptq_tensors
from ..compression.quantization.hub_loading import SOURCE_ATTR
from ..utils import atomic_save_safetensors, atomic_write_json
from .compressed_tensors import _check_exportable

_KEPT = ("damp_percent", "true_sequential", "static_groups", "model_name_or_path", "model_file_base_name", "meta")


def gptq_config(model: nn.Module, quant: dict[str, QuantLinear]) -> dict[str, Any]:
    """The `quantization_config` of the GPTQ checkpoint of `model`: one bits / group size / symmetry for all layers."""
    partial = {m.group_size for m in quant.values() if m.group_size < m.in_features}
    group_size = min(partial, default=-1)  # a layer no wider than the group size has one group per row
    settings = {
        (m.bits, m.symmetric, m.group_size == (m.in_features if group_size == -1 else min(group_size, m.in_features)))
        for m in quant.values()
    }
    if len(settings) > 1 or len(partial) > 1:
        found = sorted({(m.bits, m.group_size, m.symmetric) for m in quant.values()})
        raise ValueError(
            f"format='gptq' stores one bits / group size / symmetric setting for every layer, and this model has "
            f"(bits, group size, symmetric) = {found}. Use format='compressed-tensors', which stores one per group of "
            "layers."
        )
    bits, symmetric, _ = settings.pop()
    source = getattr(model, SOURCE_ATTR, None) or {}
    original = source.get("quantization_config", {}) if source.get("format") == GPTQ else {}
    checkpoint_format = original.get("checkpoint_format", original.get("format", "gptq"))
    kept = {k: original[k] for k in _KEPT if k in original}
    return kept | {
        "quant_method": GPTQ,
        "bits": bits,
        "group_size": group_size,
        "sym": symmetric,
        "desc_act": False,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
    }


def write_gptq(model: nn.Module, directory: Path) -> None:
    """The files of a GPTQ checkpoint of `model` (config.json with its `quantization_config`, quantize_config.json
    for AutoGPTQ, model.safetensors, generation_config.json), into an existing (temporary) folder."""
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise ValueError(
            "format='gptq' writes the integer codes of an INT4/INT8 model, and this one has no QuantLinear: train "
            "with quantization_aware=True on a quantized base (or export the float model with format='hf-elastic')."
        )
    _check_exportable(model, quant)
    qconfig = gptq_config(model, quant)
    tensors: dict[str, torch.Tensor] = {}
    seen = set()
    prefixes = tuple(f"{name}." for name in quant)
    for key, tensor in model.state_dict().items():
        ref = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key.startswith(prefixes) or ref in seen:
            continue
        seen.add(ref)
        tensors[key] = tensor.detach().cpu().contiguous()
    worst = 0.0
    for name, m in quant.items():
        packed = gptq_tensors(m.qweight.cpu(), m.scales.cpu(), m.zeros.cpu(), m.group_size, m.bits,
                              qconfig["checkpoint_format"])  # fmt: skip
        worst = max(worst, float(((packed["scales"].float().T - m.scales.cpu()).abs() / m.scales.cpu()).max()))
        tensors |= {f"{name}.{k}": v for k, v in packed.items()}
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().cpu().contiguous()
    if worst > 0:
        warnings.warn(
            f"format='gptq' stores scales in float16, which changes this model's float32 scales by up to "
            f"{worst:.1e} (relative); format='compressed-tensors' keeps them exactly.",
            stacklevel=3,
        )
    atomic_save_safetensors(tensors, directory / "model.safetensors")
    config = json.loads(model.config.to_json_string(use_diff=False))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config |= {"architectures": [type(model).__name__], "dtype": str(dtype).removeprefix("torch."),
               "quantization_config": qconfig}  # fmt: skip
    config.pop("torch_dtype", None)
    atomic_write_json(directory / "config.json", config)
    atomic_write_json(directory / GPTQ_CONFIG_NAME, {k: v for k, v in qconfig.items() if k != "quant_method"})
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(model, "can_generate") and model.can_generate():
        atomic_write_json(directory / "generation_config.json", generation.to_diff_dict())
