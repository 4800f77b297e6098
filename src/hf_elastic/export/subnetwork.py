"""Export a sub-network as a merged, physically sliced checkpoint, and load it back without remote code."""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from ..compression.quantization.format import QUANT_CONFIG_NAME, QuantLinear
from ..compression.quantization.serialization import load_quantized, write_quantized
from ..compression.sparsity import sparsity_of
from ..devices import trim_heap
from ..models.arch import find_width_layers, slice_layer_width
from ..models.loading import build_from_config, load_config, mark_hf_elastic_only
from ..nas.supernet import NamedConfig, SuperNetwork
from ..utils import SUBNET_CONFIG_NAME, atomic_directory, atomic_write_json, check_output_dir, write_safetensors
from .compressed_tensors import import_compressed_tensors, write_compressed_tensors
from .gguf_file import GGUF_NAME, import_gguf, write_gguf
from .gptq_file import write_gptq

WIDTHS_ATTR = "elastic_layer_widths"
EXPORT_FORMATS = ("hf-elastic", "compressed-tensors", "gguf", "gptq")


def export_subnetwork(
    supernet: SuperNetwork,
    config: Mapping[str, int] | NamedConfig,
    output_dir: str | Path,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    format: str = "hf-elastic",
) -> Path:
    """Merge the sub-network `config` into the base model, slice it and write it to `output_dir`.

    The folder holds `config.json` and `model.safetensors`: a stock checkpoint when the config of the model can
    express the widths (every layer the same widths; for GPT-2 and BERT also every head kept, since their configs
    cannot express a head count with another head size). Otherwise (per-layer widths in `config.elastic_layer_widths`)
    and for hf_elastic's INT4/INT8 format of a quantization-aware super-network (codes, scales and zero points; see
    `hf_elastic.compression.quantization.format`), `config.json` is marked so that stock transformers raises an error
    naming `load_exported`, which reads these folders exactly. Also written:
    `elastic_subnet.json` (config, size and MACs against the max sub-network), `sparsity_report.json` when the weights
    are sparse, and the tokenizer.
    The folder appears complete or not at all.

    `format="compressed-tensors"` writes an INT4/INT8 (quantization-aware) sub-network's exact codes, scales and zero
    points as a compressed-tensors `pack-quantized` checkpoint instead, which stock transformers (with
    `compressed-tensors` installed) and vLLM load; see `hf_elastic.export.compressed_tensors`. `format="gguf"` writes
    `model.gguf` for llama.cpp instead (a Llama; INT4 as Q4_1, INT8 as Q8_0, the tokenizer inside; see
    `hf_elastic.export.gguf_file`). `format="gptq"` writes a GPTQ checkpoint (`qweight`, `qzeros`, `scales`, `g_idx`),
    the format of a GPTQ base read with `load_hub_quantized` (see `hf_elastic.export.gptq_file`).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r} is unknown; use one of {', '.join(map(repr, EXPORT_FORMATS))}.")
    if format == "compressed-tensors":
        import_compressed_tensors()
    if format == "gguf":
        import_gguf()
        if tokenizer is None:
            raise ValueError("format='gguf' needs tokenizer=...: llama.cpp reads the vocabulary from the GGUF file.")
    check_output_dir(output_dir, overwrite)
    resolved = supernet.resolve(config)
    flags = {k: getattr(supernet.config, k) for k in ("sparse_adapter", "quantization_aware")}
    info = {"method": supernet.config.elastic_method, "config": resolved, **supernet.count(resolved)}
    info |= {"max": supernet.count("max"), **flags}
    model = supernet.extract_model(resolved, share_weights=True)
    trim_heap()  # the full-width copies of the merged layers, freed as each was sliced
    with atomic_directory(output_dir, overwrite) as tmp:
        if format == "compressed-tensors":
            write_compressed_tensors(model, tmp)
        elif format == "gguf":
            write_gguf(model, tmp / GGUF_NAME, tokenizer)
        elif format == "gptq":
            write_gptq(model, tmp)
        elif any(isinstance(m, QuantLinear) for m in model.modules()):
            write_quantized(model, tmp)
        else:
            with _streamed_safetensors():
                model.save_pretrained(tmp)
            widths = getattr(model.config, WIDTHS_ATTR, None)
            if widths:
                uniform = len({json.dumps(w, sort_keys=True) for w in widths.values()}) == 1
                reason = "attention heads cut" if uniform else "per-layer widths"
                saved = json.loads((tmp / "config.json").read_text())
                atomic_write_json(tmp / "config.json", mark_hf_elastic_only(saved, reason))
        report = sparsity_of(model)
        if report.total_sparsity > 0:
            report.save(tmp)
        atomic_write_json(tmp / SUBNET_CONFIG_NAME, info)
        if tokenizer is not None and format != "gguf":
            tokenizer.save_pretrained(tmp)
    return Path(output_dir)


@contextlib.contextmanager
def _streamed_safetensors() -> Iterator[None]:
    """Make `save_pretrained` write its safetensors files with `write_safetensors`, which does not hold a serialized
    copy of the weights in memory (safetensors' `save_file` does: one more copy of the model at the peak)."""
    import transformers.modeling_utils as modeling_utils

    save_file = modeling_utils.safe_save_file
    modeling_utils.safe_save_file = write_safetensors
    try:
        yield
    finally:
        modeling_utils.safe_save_file = save_file


def load_exported(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a folder written by `export_subnetwork` (or any transformers checkpoint) into its transformers class.

    Stock checkpoints load as with `from_pretrained`; hf_elastic INT4/INT8 folders through `load_quantized`;
    per-layer widths (`config.elastic_layer_widths`) are rebuilt by slicing each layer of a freshly built model to
    its recorded size before the weights are loaded. The model gets `dtype`, or else the dtype it was saved in (as
    `from_pretrained` does).
    """
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    if (path / QUANT_CONFIG_NAME).is_file():
        return load_quantized(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in {path}: not a model folder. Pass the folder export wrote.")
    config = load_config(path)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise ValueError(f"{path}/config.json names architectures={config.architectures}, unknown to transformers.")
    widths = getattr(config, WIDTHS_ATTR, None)
    if not widths:
        return model_class.from_pretrained(path, config=config, dtype=dtype)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = build_from_config(model_class, path, config, dtype)
    _, layers = find_width_layers(model)
    for layer in layers:
        width = widths.get(str(layer.index), widths.get(layer.index))
        ffn = torch.arange(width["ffn"]) if width["ffn"] != layer.ffn_dim else None
        kv_groups = width["heads"] // layer.group_size
        heads = torch.arange(kv_groups) if width["heads"] != layer.num_heads else None
        slice_layer_width(layer, ffn, heads)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors in {path}.")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for key, tensor in load_file(file).items():
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)  # each weight held once
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model.tie_weights()
    return model.eval()


def optimize_for_inference(
    model: nn.Module, backend: Literal["auto", "compile", "ipex", "none"] = "auto", **kwargs: Any
) -> Any:
    """Speed up PyTorch inference of an exported model (`torch.compile` or IPEX); returns the model to call.

    It was called `accelerate` before 0.2 (that name still works, with a `FutureWarning`).

    `"ipex"` runs `intel_extension_for_pytorch.optimize`, which only imports beside the torch release it was built
    for (IPEX is end-of-life; no build supports torch 2.13). `"compile"` runs `torch.compile` (inductor, works on
    CPU; the first call compiles). `"auto"` takes IPEX when it imports, else `torch.compile`. Keyword arguments go to
    the chosen function. For the largest CPU speed-up, export to OpenVINO instead (`export_openvino`).
    """
    if backend not in ("auto", "compile", "ipex", "none"):
        raise ValueError(f"backend={backend!r} is unknown; use 'auto', 'compile', 'ipex' or 'none'.")
    model.eval()
    if backend == "none":
        return model
    if backend in ("auto", "ipex"):
        try:
            ipex = importlib.import_module("intel_extension_for_pytorch")
        except Exception as err:  # IPEX raises on a torch version mismatch, not only ImportError
            if backend == "ipex":
                raise ImportError(
                    f"backend='ipex' needs intel_extension_for_pytorch, which does not import here ({err}). IPEX is "
                    f"end-of-life and has no build for torch {torch.__version__}; use backend='compile'."
                ) from None
        else:
            return ipex.optimize(model, **kwargs)
    return torch.compile(model, **kwargs)
