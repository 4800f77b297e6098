"""Write an INT4/INT8 model as a compressed-tensors `pack-quantized` checkpoint (read by transformers and vLLM).

The codes, group scales and zero points of every `QuantLinear` go to disk as they are, so stock
`AutoModelForCausalLM.from_pretrained(folder)` (with `compressed-tensors` installed, no hf_elastic) computes the same
weights `(q - z) * s`. The layout, per quantized linear layer `name`:

- `name.weight_packed`: int32 (out, in * bits / 32), the signed codes `q - 2**(bits - 1)` packed along the input
  dimension, the first code in the lowest bits (8 codes per word for INT4, 4 for INT8);
- `name.weight_scale`: float32 (out, groups), the scales as they are;
- `name.weight_zero_point`: int32 (out * bits / 32, groups), the signed zero points `z - 2**(bits - 1)` packed along
  the output dimension; only for asymmetric quantization (symmetric groups have zero point `2**(bits - 1)`, which
  is the implicit signed zero);
- `name.weight_shape`: int64 (2,), the unpacked shape (out, in).

`config.json` carries the `quantization_config` (`quant_method: compressed-tensors`, `format: pack-quantized`, one
config group per distinct (bits, group size, symmetric) with `strategy: group`, or `channel` for one group per
row), and `ignore` lists every linear layer left in float (the LM head). INT8 is written as `pack-quantized` too:
vLLM serves weight-only INT8 from that format (its W8A16 kernels), not from `naive-quantized`.
"""

from __future__ import annotations

import importlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..compression.quantization.format import QuantLinear
from ..utils import atomic_directory, atomic_save_safetensors, atomic_write_json

COMPRESSED_TENSORS_FORMAT = "pack-quantized"
INSTALL_HINT = "pip install 'hf-elastic[compressed-tensors]'"
_DROPPED = ("qweight", "scales", "zeros", "residual")


def import_compressed_tensors() -> Any:
    """The `compressed_tensors` module, or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module("compressed_tensors")
    except ImportError:
        raise ImportError(
            f"format='compressed-tensors' needs the compressed-tensors package: {INSTALL_HINT} "
            "(compressed-tensors==0.20.0)."
        ) from None


def _stock_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of the stock transformers model built from `model.config` (on the meta device)."""
    import transformers

    model_class = getattr(transformers, type(model).__name__, None)
    if model_class is None:
        raise ValueError(
            f"format='compressed-tensors' needs a transformers model class; {type(model).__name__} is not one."
        )
    with torch.device("meta"):
        stock = model_class(model.config)
    return {name: m for name, m in stock.named_modules() if isinstance(m, nn.Linear)}


def _check_exportable(model: nn.Module, quant: dict[str, QuantLinear]) -> list[str]:
    """Raise when stock transformers could not rebuild `model`; return the float linear layers (the `ignore` list)."""
    if not quant:
        raise ValueError(
            "format='compressed-tensors' writes the integer codes of an INT4/INT8 model, and this one has no "
            "QuantLinear: quantize the base with hf_elastic.quantize and train with quantization_aware=True (or "
            "export the float model with format='hf-elastic')."
        )
    linears = _stock_linears(model)
    not_linear = [name for name in quant if name not in linears]
    if not_linear:
        raise ValueError(
            f"format='compressed-tensors' stores quantized nn.Linear layers only; {not_linear[:3]} are not "
            f"nn.Linear in stock {type(model).__name__} (e.g. GPT-2's Conv1D). Use format='hf-elastic'."
        )
    for name, stock in linears.items():
        module = quant.get(name) or model.get_submodule(name)
        shape = (module.out_features, module.in_features)
        if (stock.out_features, stock.in_features) != shape:
            raise ValueError(
                f"format='compressed-tensors' needs a model that stock transformers builds from its config, but "
                f"{name} is {shape[0]}x{shape[1]} here and {stock.out_features}x{stock.in_features} from the config: "
                "the sub-network has per-layer widths or cut heads (config.elastic_layer_widths) that the config "
                "cannot express. Choose a sub-network with the same widths in every layer, or use "
                "format='hf-elastic'."
            )
    return [name for name in linears if name not in quant]


def _scheme_key(m: QuantLinear) -> tuple[int, int | None, bool]:
    return m.bits, None if m.group_size == m.in_features else m.group_size, m.symmetric


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The `quantization_config` entry of `config.json` for the `QuantLinear` layers of `model`."""
    ct = import_compressed_tensors()
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    ignore = _check_exportable(model, quant)
    schemes: dict[tuple[int, int | None, bool], list[str]] = defaultdict(list)
    for name, m in quant.items():
        schemes[_scheme_key(m)].append(name)
    groups = {}
    for i, ((bits, group_size, symmetric), names) in enumerate(sorted(schemes.items(), key=str)):
        weights = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=symmetric,
            strategy="channel" if group_size is None else "group",
            group_size=group_size,
        )
        targets = ["Linear"] if len(schemes) == 1 else names
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=weights)
    config = QuantizationConfig(
        config_groups=groups,
        format=COMPRESSED_TENSORS_FORMAT,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )
    return {
        "version": ct.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(exclude=["quant_method"], mode="json"),
    }


def pack_module(module: QuantLinear) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one `QuantLinear` (local names: `weight_packed`, `weight_scale`, ...)."""
    import_compressed_tensors()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 2 ** (module.bits - 1)
    signed = (module.qweight.to(torch.int16) - offset).to(torch.int8)
    tensors = {
        "weight_packed": pack_to_int32(signed.cpu(), module.bits),
        "weight_scale": module.scales.detach().to(torch.float32).cpu().contiguous(),
        "weight_shape": torch.tensor([module.out_features, module.in_features], dtype=torch.int64),
    }
    if not module.symmetric:
        zeros = (module.zeros.to(torch.int16) - offset).to(torch.int8)
        tensors["weight_zero_point"] = pack_to_int32(zeros.cpu(), module.bits, packed_dim=0)
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().cpu().contiguous()
    return tensors


def _state_dict(model: nn.Module, quant: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: quantized layers packed, every other tensor once (tied weights under one key)."""
    tensors: dict[str, torch.Tensor] = {}
    seen = set()
    prefixes = tuple(f"{name}." for name in quant)
    for key, tensor in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        ref = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if ref in seen:
            continue
        seen.add(ref)
        tensors[key] = tensor.detach().cpu().contiguous()
    for name, module in quant.items():
        tensors.update({f"{name}.{k}": v for k, v in pack_module(module).items()})
    return tensors


def write_compressed_tensors(model: nn.Module, directory: Path) -> None:
    """The files of `save_compressed_tensors` (config.json, model.safetensors, generation_config.json), into an
    existing (temporary) folder."""
    qconfig = quantization_config(model)
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    atomic_save_safetensors(_state_dict(model, quant), directory / "model.safetensors")
    config = json.loads(model.config.to_json_string(use_diff=False))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config |= {
        "architectures": [type(model).__name__],
        "dtype": str(dtype).removeprefix("torch."),
        "quantization_config": qconfig,
    }
    config.pop("torch_dtype", None)
    atomic_write_json(directory / "config.json", config)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(model, "can_generate") and model.can_generate():
        atomic_write_json(directory / "generation_config.json", generation.to_diff_dict())


def save_compressed_tensors(
    model: nn.Module, save_directory: str | Path, *, tokenizer: Any = None, overwrite: bool = True
) -> Path:
    """Write a model quantized by hf_elastic (its `QuantLinear` layers) as a compressed-tensors checkpoint.

    Stock `transformers.AutoModelForCausalLM.from_pretrained(save_directory)` loads it when `compressed-tensors` is
    installed (on CPU it decompresses into `nn.Linear` layers with the same weights), and vLLM serves it. The folder
    appears complete or not at all; an existing folder is replaced unless `overwrite=False`.
    """
    with atomic_directory(save_directory, overwrite) as tmp:
        write_compressed_tensors(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(save_directory)


def describe_quantization(qconfig: Any) -> dict[str, Any] | None:
    """Bits, group size (-1: one per row), symmetry and format of a compressed-tensors `quantization_config` entry
    with integer weights (its first config group), or None for any other entry."""
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "compressed-tensors":
        return None
    groups = qconfig.get("config_groups")
    scheme = next(iter(groups.values()), None) if isinstance(groups, dict) else None
    weights = scheme.get("weights") if isinstance(scheme, dict) else None
    if not isinstance(weights, dict) or weights.get("type") != "int":
        return None
    return {
        "bits": weights.get("num_bits"),
        "group_size": -1 if weights.get("strategy") == "channel" else weights.get("group_size"),
        "symmetric": weights.get("symmetric"),
        "format": f"compressed-tensors/{qconfig.get('format')}",
    }
