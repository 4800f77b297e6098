"""Export causal LMs to OpenVINO IR through optimum-intel, with exact INT4/INT8 codes for hf_elastic-quantized models.

`export_openvino` writes a folder that `optimum.intel.OVModelForCausalLM.from_pretrained` (or `load_openvino`) runs:
`openvino_model.xml/.bin`, `config.json`, `generation_config.json`, the tokenizer files and, when the tokenizer
converts, `openvino_tokenizer.xml` / `openvino_detokenizer.xml`.

Weights
-------
- Float models: `weight_format="fp32"` or `"fp16"`, or weight-only compression by NNCF (`"int8"`: per-channel,
  `"int4"`: group-wise, the optimum-intel `OVWeightQuantizationConfig` settings).
- Models quantized by `hf_elastic.quantize` (`QuantLinear`, e.g. a merged QA-SparsePEFT sub-network) are not
  quantized again. The dequantized model is exported to an fp32 IR; in the IR read back from disk every quantized
  weight constant is then replaced by the decompression subgraph that the OpenVINO CPU plugin fuses into a
  weight-compressed FullyConnected:

      Constant(u4|u8 codes [out, groups, group_size]) -> Convert(f32)
        -> Subtract(Convert(f32) <- Constant(u4|u8 zero points [out, groups, 1]))
        -> Multiply(Constant(f32 scales [out, groups, 1]) or Convert(f32) <- Constant(f16 scales))
        -> Reshape([out, in]) -> MatMul(transpose_b=True)

  This is NNCF's INT4_ASYM pattern with f32 instead of f16 arithmetic, so `(codes - zero_points) * scales` equals
  `QuantLinear.dequantize()` bit for bit. A layer's scales are stored as f16 only where the f16 values give that same
  weight bit for bit (rare for RTN scales, which are f32 quotients), else as f32. Symmetric hf_elastic models keep
  their zero point 2**(bits - 1). By default (`compress_float_weights`) the weights the model keeps in float, the
  embedding and LM head, are then compressed to int8 per channel by NNCF, as NNCF's own INT4 export does; the
  decompression subgraphs of the codes are not MatMul weight constants, so NNCF leaves them as they are.

Sparse weights
--------------
`ir_weight_sparsity` counts the exact zeros of the decompressed MatMul weights of an IR. The CPU plugin property
`CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE` (`SPARSE_WEIGHTS_PROPERTY`, `load_openvino(...,
sparse_weights_decompression_rate=0.5)`) still exists in OpenVINO 2026.4, but it only selects a sparse kernel
(`brgemm_avx512_amx_sparse_i8`) for int8 weights with int8 activations (statically quantized models) on CPUs with
Intel AMX. Weight-only compressed IRs like these exports keep their dense kernels whatever the rate.

Inference precision
-------------------
On CPUs with bf16 support the CPU plugin infers in bf16 by default. Pass `**FP32_CPU_CONFIG` to `load_openvino` for
fp32 results that match PyTorch.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..compression.quantization.format import (
    QUANT_CONFIG_NAME,
    QuantLinear,
    default_group_size,
    group_size_note,
)
from ..compression.quantization.serialization import load_dequantized, load_quantized
from ..devices import trim_heap
from ..models.arch import weight_out_in
from ..models.loading import TOKENIZER_FILES, copy_module
from ..utils import SUBNET_CONFIG_NAME, atomic_directory, check_output_dir
from .openvino_ir import (
    OV_MODEL_NAME,
    SPARSE_WEIGHTS_PROPERTY,
    IRWeight,
    _drop_f16_kv_cache_option,
    _embed_quantized,
    _require,
    ir_weight_sparsity,
    ir_weights,
)

logger = logging.getLogger(__name__)
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
OV_TOKENIZER_NAME = "openvino_tokenizer.xml"
OV_DETOKENIZER_NAME = "openvino_detokenizer.xml"
# CPU settings under which an fp32 IR computes in fp32: the CPU plugin otherwise infers in bf16 on CPUs that support
# it, stores the KV cache in u8 (or f16, from the IR's runtime options) and quantizes activations of
# weight-compressed MatMuls to int8 in groups of 32.
FP32_CPU_CONFIG = {
    "INFERENCE_PRECISION_HINT": "f32",
    "KV_CACHE_PRECISION": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
}
_TASK = "text-generation-with-past"

__all__ = [
    "FP32_CPU_CONFIG",
    "OV_DETOKENIZER_NAME",
    "OV_MODEL_NAME",
    "OV_TOKENIZER_NAME",
    "SPARSE_WEIGHTS_PROPERTY",
    "WEIGHT_FORMATS",
    "IRWeight",
    "export_openvino",
    "ir_weight_sparsity",
    "int4_group_size",
    "ir_weights",
    "load_openvino",
]


def _check_options(weight_format: Any, group_size: Any, symmetric: Any, ratio: Any) -> int | None:
    """Validate the export settings; returns the group size NNCF gets (None for fp32/fp16)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format={weight_format!r} is not supported. Use one of {list(WEIGHT_FORMATS)}.")
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be True or False, got {symmetric!r}.")
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0)
    ):
        raise ValueError(
            f"group_size={group_size!r} is invalid. Use a positive divisor of the hidden size (e.g. 128), -1 for one "
            "group per output channel, or None for the default."
        )
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio={ratio!r} must lie in (0, 1]: the fraction of weights compressed to 4 bits.")
    if weight_format == "int8":
        if group_size not in (None, -1) or ratio != 1:
            raise ValueError(
                f"weight_format='int8' is per-channel for all layers (NNCF INT8 modes); got group_size={group_size} "
                f"and ratio={ratio}. Leave group_size=None and ratio=1.0, or use weight_format='int4'."
            )
        return -1
    if weight_format == "int4":
        return group_size  # None: `int4_group_size(model)` picks it
    if group_size is not None or ratio != 1:
        raise ValueError(
            f"group_size and ratio apply to weight_format='int4'/'int8' only; got weight_format={weight_format!r} "
            f"with group_size={group_size} and ratio={ratio}."
        )
    return None


def _compressed_inputs(model: nn.Module) -> dict[str, int]:
    """in_features of every linear layer NNCF compresses group-wise in INT4: all but the LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: weight_out_in(module).shape[1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head
    }


def int4_group_size(model: nn.Module) -> int:
    """The default INT4 group size of `export_openvino` for `model`: the largest of 128/64/32 that divides the input
    size of every linear layer NNCF compresses (64 for SmolLM2-135M, whose hidden size is 576)."""
    return default_group_size(_compressed_inputs(model).values())


def _check_group_size(model: nn.Module, group_size: int) -> None:
    """NNCF compresses every linear layer except the LM head group-wise: `group_size` must divide their inputs."""
    if group_size == -1:
        return
    for name, in_features in _compressed_inputs(model).items():
        if in_features % group_size:
            divisors = [d for d in (256, 128, 64, 32, 16) if in_features % d == 0][:2]
            hint = f" such as {' or '.join(map(str, divisors))}" if divisors else ""
            raise ValueError(
                f"group_size={group_size} does not divide in_features={in_features} of {name}. Use a divisor "
                f"of {in_features}{hint}, or group_size=-1 for one group per output channel."
            )


def _load_folder(path: Path) -> tuple[nn.Module, Any]:
    """Load a checkpoint folder (stock, per-layer widths or hf_elastic INT4/INT8) and its tokenizer if it has one."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"No config.json in {path}: pass a transformers checkpoint folder, a folder written by "
            "hf_elastic.export.export_subnetwork or save_quantized, or an in-memory model."
        )
    from .subnetwork import load_exported

    model = load_exported(path, dtype=None if (path / QUANT_CONFIG_NAME).is_file() else torch.float32)
    tokenizer = None
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def _float32_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to("cpu", torch.float32) if tensor.is_floating_point() else tensor.to("cpu")


def _export_copy(model: nn.Module, quantized: dict[str, QuantLinear], owned: bool) -> nn.Module:
    """The float32 CPU model the exporter traces, holding each weight once: `model` itself when it is one already
    (or converted in place when it was loaded here), else a copy made tensor by tensor (`copy_module`), in which every
    `QuantLinear` is an `nn.Linear` holding `dequantize()`; float32 CPU tensors are shared, not copied."""
    tensors = [*model.parameters(), *model.buffers()]
    if not quantized and all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors if t.is_floating_point()
    ):
        return model
    if not quantized and owned:
        return model.to("cpu", torch.float32)
    replace = {}
    for module in quantized.values():
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.dequantize(torch.float32).cpu(), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(_float32_cpu(module.bias.detach()), requires_grad=False)
        replace[module] = linear
        trim_heap()
    return copy_module(model, _float32_cpu, replace)


def _quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _rewrite_ir(directory: Path, transform: Callable[[Any], Any]) -> None:
    """Read the IR saved in `directory` back, with its weights mapped from the .bin file rather than loaded, apply
    `transform` to it and write the result in place of the IR: the torch model it was traced from is gone by then,
    and the float weights that `transform` replaces are never read into memory (as optimum-intel's own export
    compresses weights)."""
    ov = _require("openvino")
    staged = directory / ".compressed"
    staged.mkdir()
    model = transform(ov.Core().read_model(directory / OV_MODEL_NAME))
    ov.save_model(model, staged / OV_MODEL_NAME, compress_to_fp16=False)
    del model
    trim_heap()
    for file in staged.iterdir():
        os.replace(file, directory / file.name)
    staged.rmdir()


def _compress_with_nncf(model: Any, bits: int, group_size: int, symmetric: bool, ratio: float) -> tuple[Any, Any]:
    """NNCF weight-only compression of the float MatMul/Gather weights of an in-memory IR (weights already
    compressed are left as they are); returns the model and optimum-intel's config of the settings."""
    nncf = _require("nncf")
    from optimum.intel import OVWeightQuantizationConfig

    config = OVWeightQuantizationConfig(bits=bits, sym=symmetric, group_size=group_size, ratio=ratio)
    model = nncf.compress_weights(model, **config.to_nncf_dict())
    _drop_f16_kv_cache_option(model)
    model.set_rt_info(nncf.__version__, ["optimum", "nncf_version"])
    return model, config


def _cache_shapes(model: nn.Module) -> list[tuple[int, int]] | None:
    """(key/value heads, head dim) of every layer's KV cache after a 2-token forward, or None if not a list."""
    device = next(model.parameters()).device
    with torch.no_grad():
        cache = model(input_ids=torch.ones(1, 2, dtype=torch.long, device=device), use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or not all(getattr(layer, "keys", None) is not None for layer in layers):
        return None
    return [(layer.keys.shape[1], layer.keys.shape[3]) for layer in layers]


def _per_layer_cache_export_config(model: nn.Module, shapes: list[tuple[int, int]]) -> dict[str, Any]:
    """An optimum-intel export config whose dummy KV cache has each layer's own head count (pruned heads)."""
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(
        model=model, exporter="openvino", task=_TASK, library_name="transformers"
    )
    base = constructor(model.config, int_dtype="int64", float_dtype="fp32")
    config = base.__class__(
        model.config, task=base.task, int_dtype="int64", float_dtype="fp32", use_past=True, use_past_in_inputs=True
    )
    generator = config.DUMMY_PKV_GENERATOR_CLASS

    class PerLayerCacheGenerator(generator):
        def generate(self, input_name: str, framework: str = "pt", int_dtype="int64", float_dtype="fp32"):
            past = super().generate(input_name, framework, int_dtype, float_dtype)
            if len(past) != len(shapes):
                raise RuntimeError(f"The dummy KV cache has {len(past)} layers, the model {len(shapes)}.")
            return [
                tuple(torch.randn(t.shape[0], heads, t.shape[2], dim, dtype=t.dtype) for t in layer)
                for layer, (heads, dim) in zip(past, shapes, strict=True)
            ]

    config.DUMMY_INPUT_GENERATOR_CLASSES = tuple(
        PerLayerCacheGenerator if cls is generator else cls for cls in config.DUMMY_INPUT_GENERATOR_CLASSES
    )
    config.DUMMY_PKV_GENERATOR_CLASS = PerLayerCacheGenerator
    return {"model": config}


def openvino_export_problem(model_type: str) -> str | None:
    """Why optimum-intel's OpenVINO exporter would refuse the architecture `model_type` under the installed
    transformers (no export config, or a version range that excludes it), or None when it supports it."""
    import transformers
    from packaging.version import Version

    _require("optimum.exporters.openvino")  # registers the OpenVINO export configs
    from optimum.exporters.tasks import TasksManager

    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="openvino", model_type=model_type, task=_TASK, library_name="transformers"
        )
    except (KeyError, ValueError):
        return f"optimum-intel has no OpenVINO export for model type {model_type!r}"
    config = getattr(constructor, "func", constructor)
    installed = Version(Version(transformers.__version__).base_version)
    low, high = getattr(config, "MIN_TRANSFORMERS_VERSION", None), getattr(config, "MAX_TRANSFORMERS_VERSION", None)
    if low is not None and installed < Version(str(low)):
        return (
            f"optimum-intel exports {model_type!r} with transformers >= {low}; {transformers.__version__} is installed"
        )
    if high is not None and installed > Version(str(high)):
        return (
            f"optimum-intel exports {model_type!r} with transformers <= {high} only; {transformers.__version__} is "
            f"installed (pip install 'transformers<={high}' in an environment for the OpenVINO export)"
        )
    return None


def _export_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Save the HF tokenizer files and, when openvino_tokenizers converts it, the OpenVINO (de)tokenizer."""
    ov = _require("openvino")
    openvino_tokenizers = _require("openvino_tokenizers")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"  # as optimum-intel sets for text generation
    tokenizer.save_pretrained(directory)
    try:
        converted = openvino_tokenizers.convert_tokenizer(tokenizer, with_detokenizer=True)
    except Exception as error:  # noqa: BLE001 - openvino_tokenizers raises many types for unsupported tokenizers
        warnings.warn(
            f"openvino_tokenizers could not convert {type(tokenizer).__name__} ({error}); the folder has the HF "
            "tokenizer files only, which AutoTokenizer and OVModelForCausalLM use.",
            stacklevel=3,
        )
        return
    converted = converted if isinstance(converted, tuple) else (converted,)
    for model, name in zip(converted, (OV_TOKENIZER_NAME, OV_DETOKENIZER_NAME)[: len(converted)], strict=True):
        ov.save_model(model, directory / name)


def export_openvino(
    model_or_dir: nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    weight_format: str = "fp32",
    group_size: int | None = None,
    symmetric: bool = False,
    ratio: float = 1.0,
    compress_float_weights: bool | None = None,
    extra_files: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
) -> Path:
    """Export a causal LM to an OpenVINO IR folder that `OVModelForCausalLM.from_pretrained` runs.

    Args:
        model_or_dir: a transformers causal LM in memory (any per-layer widths), or a folder: a transformers
            checkpoint, one written by `hf_elastic.export.export_subnetwork`, or an hf_elastic INT4/INT8 folder from
            `save_quantized`.
        output_dir: the folder to write; it appears complete or not at all.
        tokenizer: the model's tokenizer (defaults to the one in `model_or_dir` when that is a folder). Saved as HF
            files and converted with `openvino_tokenizers.convert_tokenizer`.
        weight_format: "fp32", "fp16", or NNCF weight-only compression "int8" (per channel) or "int4" (group-wise).
            Models holding hf_elastic `QuantLinear` layers keep their own codes exactly and need "fp32" (the
            float parts, e.g. embeddings and LM head, stay fp32).
        group_size: int4 only: input channels per scale; must divide the input size of every linear layer but
            the LM head. None (the default) takes the largest of 128/64/32 that does (`int4_group_size`; logged),
            -1 gives one group per output channel.
        symmetric: int4/int8 only: symmetric codes (NNCF INT*_SYM) instead of asymmetric ones.
        ratio: int4 only: the fraction of the weights compressed to 4 bits; the rest get int8 (NNCF's ratio).
        compress_float_weights: hf_elastic-quantized models only: also compress the weights they keep in float
            (embeddings, LM head) to int8 per channel with NNCF, as NNCF's own INT4 export does. The codes of the
            quantized layers stay exact. None (the default) means True for hf_elastic-quantized models (and False
            for float ones); False keeps the embedding and LM head in fp32.
        extra_files: files copied into the folder, e.g. the `elastic_subnet.json` of an in-memory export (the one of
            a `model_or_dir` folder is copied anyway), so that model cards can tell the sub-network and method.
        overwrite: replace `output_dir` if it exists.

    Returns:
        The output folder.

    Example:

    ```py
    >>> export_openvino("subnet-int4", "subnet-int4-ov")  # hf_elastic INT4 folder: codes kept exactly
    >>> model = load_openvino("subnet-int4-ov")
    ```
    """
    nncf_group_size = _check_options(weight_format, group_size, symmetric, ratio)
    if compress_float_weights is not None and not isinstance(compress_float_weights, bool):
        raise ValueError(f"compress_float_weights must be True, False or None, got {compress_float_weights!r}.")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    _require("openvino")
    _require("openvino_tokenizers")
    exporters = _require("optimum.exporters.openvino")
    if weight_format in ("int4", "int8") or compress_float_weights:
        _require("nncf")
    extra_files = [Path(f) for f in ([extra_files] if isinstance(extra_files, (str, os.PathLike)) else extra_files)]
    if missing := [str(f) for f in extra_files if not f.is_file()]:
        raise FileNotFoundError(f"export_openvino extra_files {missing} do not exist.")
    owned = isinstance(model_or_dir, (str, os.PathLike))  # loaded here: converted and freed as the export goes
    if owned:
        model, folder_tokenizer = _load_folder(Path(model_or_dir))
        tokenizer = tokenizer if tokenizer is not None else folder_tokenizer
        subnet = Path(model_or_dir) / SUBNET_CONFIG_NAME
        if subnet.is_file() and subnet.name not in {f.name for f in extra_files}:
            extra_files.append(subnet)
    elif isinstance(model_or_dir, nn.Module):
        model = model_or_dir
    else:
        raise TypeError(
            f"model_or_dir must be a transformers model or a folder path, got {type(model_or_dir).__name__}."
        )
    if not (hasattr(model, "config") and hasattr(model, "can_generate") and model.can_generate()):
        raise ValueError(
            f"export_openvino exports causal language models (with a generate method); got {type(model).__name__}."
        )
    quantized = _quantized_modules(model)
    if quantized and weight_format != "fp32":
        first = next(iter(quantized.values()))
        raise ValueError(
            f"The model is already quantized by hf_elastic (INT{first.bits}, group_size={first.group_size}); its "
            f"codes are exported exactly. Use weight_format='fp32' (got {weight_format!r}) to keep them, or "
            "export a float model to re-quantize with NNCF."
        )
    if compress_float_weights is None:
        compress_float_weights = bool(quantized)
        if quantized:
            _require("nncf")
    if compress_float_weights and not quantized:
        raise ValueError(
            "compress_float_weights=True applies to models quantized by hf_elastic (QuantLinear layers); this model "
            "has none. Use weight_format='int8' or 'int4' to compress a float model with NNCF."
        )
    if weight_format == "int4":
        if nncf_group_size is None:
            nncf_group_size = int4_group_size(model)
            logger.info("export_openvino: INT4 %s.", group_size_note(nncf_group_size))
        _check_group_size(model, nncf_group_size)
    training, has_codes = model.training, bool(quantized)
    if owned and has_codes:  # the checked folder is read again, as float32, with nothing of it mapped
        model = quantized = None
        gc.collect()  # transformers models hold reference cycles
        export_model = load_dequantized(Path(model_or_dir))
    else:
        export_model = _export_copy(model, quantized, owned)
        if owned:
            model = None
    ov_config = None
    if weight_format == "fp16":
        from optimum.intel import OVConfig

        ov_config = OVConfig(dtype="fp16")
    compress = None
    if has_codes and compress_float_weights:
        compress = (8, -1, False, 1.0)
    elif weight_format in ("int4", "int8"):
        compress = (4 if weight_format == "int4" else 8, nncf_group_size, symmetric, ratio)
    compression_config = []

    def transform(ov_model: Any, quantized: dict[str, QuantLinear]) -> Any:
        if quantized:
            scale_types = _embed_quantized(ov_model, quantized)
            logger.info(
                "export_openvino: exact codes of %d layers, %d with f16 scales (exact in f16), the rest f32.",
                len(scale_types),
                sum(t == "f16" for t in scale_types.values()),
            )
        if compress is not None:
            ov_model, config = _compress_with_nncf(ov_model, *compress)
            compression_config.append(config)
        return ov_model

    try:
        with atomic_directory(output_dir, overwrite) as tmp:
            shapes = _cache_shapes(export_model)
            custom = None
            if shapes is not None and (len(set(shapes)) > 1 or hasattr(export_model.config, "elastic_layer_widths")):
                custom = _per_layer_cache_export_config(export_model, shapes)
            exporters.export_from_model(
                export_model,
                tmp,
                task=_TASK,
                ov_config=ov_config,
                stateful=True,
                preprocessors=[],
                custom_export_configs=custom,
            )
            if has_codes or compress is not None:
                del export_model
                gc.collect()  # transformers models hold reference cycles
                trim_heap()
                if owned and has_codes:
                    quantized = _quantized_modules(load_quantized(Path(model_or_dir)))
                _rewrite_ir(tmp, lambda ov_model: transform(ov_model, quantized))
            if compression_config and not has_codes:
                config = compression_config[0]
                (tmp / "openvino_config.json").write_text(
                    json.dumps(
                        {"dtype": f"int{compress[0]}", "quantization_config": config.to_dict()}, indent=2, default=str
                    )
                )
            if tokenizer is not None:
                _export_tokenizer(tokenizer, tmp)
            for file in extra_files:
                shutil.copyfile(file, tmp / file.name)
    finally:
        if not owned:
            model.train(training)
    return output_dir


def load_openvino(
    output_dir: str | os.PathLike,
    *,
    device: str = "CPU",
    sparse_weights_decompression_rate: float | None = None,
    compile: bool = True,
    **ov_config: Any,
) -> Any:
    """Load a folder written by `export_openvino` as an `optimum.intel.OVModelForCausalLM`.

    Args:
        output_dir: the exported folder.
        device: the OpenVINO device.
        sparse_weights_decompression_rate: sets `CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE`: int8 x int8 MatMuls whose
            weights have at least this fraction of zeros use a sparse kernel (CPUs with Intel AMX; 1.0 disables it;
            weight-only compressed models are not affected).
        compile: compile the model now.
        **ov_config: OpenVINO properties, e.g. `**FP32_CPU_CONFIG` for fp32 inference or `PERFORMANCE_HINT="LATENCY"`.
    """
    rate = sparse_weights_decompression_rate
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1):
        raise ValueError(f"sparse_weights_decompression_rate={rate!r} must lie in [0, 1] (1.0 disables it).")
    ov = _require("openvino")
    _require("optimum.intel")
    from optimum.intel import OVModelForCausalLM

    path = Path(output_dir)
    if not (path / OV_MODEL_NAME).is_file():
        hint = (
            " It is an hf_elastic quantized folder: run export_openvino on it first."
            if (path / QUANT_CONFIG_NAME).is_file()
            else ""
        )
        raise FileNotFoundError(f"No {OV_MODEL_NAME} in {path}. Pass a folder written by export_openvino.{hint}")
    config = {key: str(value) for key, value in ov_config.items()}
    if rate is not None:
        if device != "CPU" or SPARSE_WEIGHTS_PROPERTY not in ov.Core().get_property("CPU", "SUPPORTED_PROPERTIES"):
            raise ValueError(
                f"{SPARSE_WEIGHTS_PROPERTY} is a CPU property that device={device!r} with OpenVINO {ov.__version__} "
                "does not support; drop sparse_weights_decompression_rate."
            )
        config[SPARSE_WEIGHTS_PROPERTY] = str(float(rate))
    return OVModelForCausalLM.from_pretrained(path, device=device, ov_config=config, compile=compile)
