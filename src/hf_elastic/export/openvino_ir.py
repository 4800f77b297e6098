"""Read and write the weights of an OpenVINO IR: exact integer codes in, decompressed weights and sparsity out."""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..compression.quantization.format import QuantLinear
from ..devices import trim_heap

OV_MODEL_NAME = "openvino_model.xml"
SPARSE_WEIGHTS_PROPERTY = "CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE"


def _require(module: str) -> Any:
    """Import an optional dependency of the OpenVINO export, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"hf_elastic's OpenVINO export needs {module.split('.')[0]}, which could not be imported ({error}). "
            "Install the "
            "OpenVINO extra: pip install 'hf-elastic[openvino]'"
        ) from error


def _pack_u4(values: np.ndarray) -> np.ndarray:
    """Pack uint8 values < 16 two per byte, first element in the low nibble (OpenVINO's u4 layout)."""
    flat = values.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack_4bit(packed: np.ndarray, shape: list[int], signed: bool) -> np.ndarray:
    size = int(np.prod(shape))
    packed = packed.reshape(-1).view(np.uint8)
    values = np.empty(packed.size * 2, np.uint8)
    values[0::2], values[1::2] = packed & 0x0F, packed >> 4
    values = values[:size].reshape(shape)
    if signed:
        return np.where(values > 7, values.astype(np.int16) - 16, values).astype(np.int8)
    return values


def _integer_constant(ov: Any, values: np.ndarray, bits: int) -> Any:
    if bits == 8:
        return ov.op.Constant(np.ascontiguousarray(values, dtype=np.uint8))
    tensor = ov.Tensor(ov.Type.u4, ov.Shape(list(values.shape)))
    tensor.data[:] = _pack_u4(values)
    return ov.op.Constant(tensor)


def _f16_scales_if_exact(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, dequantized: np.ndarray):
    """`scales` as float16 when `(codes - zeros) * float32(float16(scales))`, computed in float32 as the IR does,
    equals `dequantized` bit for bit; else None."""
    with np.errstate(over="ignore", under="ignore"):
        half = scales.astype(np.float16)
    if not np.all(np.isfinite(half)):
        return None
    weight = (codes.astype(np.float32) - zeros.astype(np.float32)) * half.astype(np.float32)
    return half if np.array_equal(weight.reshape(dequantized.shape), dequantized) else None


def _decompression_subgraph(ov: Any, name: str, module: QuantLinear, dequantized: np.ndarray) -> tuple[Any, str]:
    """The u4/u8 weight decompression subgraph of one `QuantLinear` and its scale type ("f16" or "f32").

    The subgraph returns the (out, in) f32 weight. Scales are stored as f16 (with a Convert to f32) only where that
    keeps the decompressed weight equal to `dequantized` (`QuantLinear.dequantize()`) bit for bit.
    """
    ops = importlib.import_module("openvino.opset13")
    out_features, in_features, group_size = module.out_features, module.in_features, module.group_size
    groups = in_features // group_size
    codes = module.qweight.detach().cpu().numpy().reshape(out_features, groups, group_size)
    zeros = module.zeros.detach().cpu().numpy().reshape(out_features, groups, 1)
    scales = module.scales.detach().cpu().float().numpy().reshape(out_features, groups, 1)
    half = _f16_scales_if_exact(codes, zeros, scales, dequantized)
    codes_c = _integer_constant(ov, codes, module.bits)
    codes_c.set_friendly_name(name)
    zeros_c = _integer_constant(ov, zeros, module.bits)
    zeros_c.set_friendly_name(f"{name}/zero_point")
    scales_c = ov.op.Constant(np.ascontiguousarray(scales if half is None else half))
    scales_c.set_friendly_name(f"{name}/scale")
    scale = scales_c if half is None else ops.convert(scales_c, ov.Type.f32)
    weight = ops.subtract(ops.convert(codes_c, ov.Type.f32), ops.convert(zeros_c, ov.Type.f32))
    weight.set_friendly_name(f"{name}/zero_point/subtract")
    weight = ops.multiply(weight, scale)
    weight.set_friendly_name(f"{name}/fq_weights_1")
    shape = ops.constant(np.array([out_features, in_features], dtype=np.int64))
    return ops.reshape(weight, shape, special_zero=False), "f32" if half is None else "f16"


def _rows(array: np.ndarray) -> np.ndarray:
    """The first and last rows of a 2-D weight: what the IR's constant is checked against, read without touching
    the rest of a constant mapped from the .bin file."""
    return np.stack([array[0], array[-1]])


def _value_key(array: np.ndarray) -> tuple[tuple[int, ...], str]:
    return tuple(array.shape), hashlib.sha1(np.ascontiguousarray(_rows(array)).tobytes()).hexdigest()


def _embed_quantized(model: Any, quantized: dict[str, QuantLinear]) -> dict[str, str]:
    """Replace the fp32 weight constants of the quantized modules in the OpenVINO `model` by their codes, in place;
    returns the scale type ("f16" where exact, else "f32") of each quantized module.

    Constants are matched by name (the PyTorch frontend names them `self.<module>.weight`) or, failing that, by the
    value of their first and last rows; either way the constant must have the (out, in) shape of the module and
    those rows must equal `QuantLinear.dequantize()`'s exactly. Only those rows of a constant are read, so an IR
    read back with its weights mapped from the .bin file keeps them on disk. Modules are dequantized one at a time.
    """
    ov = _require("openvino")

    def dequantized(name: str) -> np.ndarray:
        return quantized[name].dequantize(torch.float32).cpu().numpy()

    by_value: dict[tuple, list[str]] | None = None  # built on the first constant that no name matches
    done: dict[str, str] = {}
    scale_types: dict[str, str] = {}
    matmuls = [op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]  # no constant kept alive
    for op in matmuls:
        const = op.input_value(1).get_node()
        if const.get_type_name() != "Constant" or const.get_element_type() != ov.Type.f32:
            continue
        ir_name = const.get_friendly_name()
        if ir_name in done.values():
            continue
        stripped = ir_name.removeprefix("self.").removesuffix(".weight")
        array = const.get_data()
        if stripped in quantized and stripped not in done:
            name = stripped
        else:
            if array.ndim != 2:
                continue
            if by_value is None:
                by_value = {}
                for key in quantized.keys() - done.keys():
                    by_value.setdefault(_value_key(dequantized(key)), []).append(key)
            candidates = [n for n in by_value.get(_value_key(array), []) if n not in done]
            if not candidates:
                continue
            name = candidates[0]
        weight = dequantized(name)
        if (
            not op.get_attributes()["transpose_b"]
            or array.shape != weight.shape
            or not np.array_equal(_rows(array), _rows(weight))
        ):
            raise RuntimeError(
                f"The IR constant {ir_name!r} does not hold the dequantized weight of {name} in (out, in) layout, so "
                "the exact INT export cannot place its codes. Report this with the model class and the transformers "
                "and openvino versions."
            )
        subgraph, scale_types[name] = _decompression_subgraph(ov, ir_name, quantized[name], weight)
        const.output(0).replace(subgraph.output(0))
        done[name] = ir_name
        del const, array, weight, subgraph
        trim_heap()  # else each layer's transient float buffers stay in RSS as heap fragments
    missing = sorted(set(quantized) - set(done))
    if missing:
        raise RuntimeError(
            f"Found no fp32 weight constant in the IR for the quantized modules {missing}; their codes were not "
            "exported. Report this with the model class and transformers/openvino versions."
        )
    _drop_f16_kv_cache_option(model)
    model.set_rt_info("hf_elastic.QuantLinear", ["hf_elastic", "weight_compression"])
    return scale_types


def _drop_f16_kv_cache_option(model: Any) -> None:
    """optimum-intel asks for an f16 KV cache in fp IRs and drops the request for weight-compressed ones; so do we."""
    if model.has_rt_info(["runtime_options", "KV_CACHE_PRECISION"]):
        options = model.get_rt_info("runtime_options").value
        if options["KV_CACHE_PRECISION"] == "f16":
            options.pop("KV_CACHE_PRECISION")
            model.set_rt_info(options, "runtime_options")


@dataclass
class IRWeight:
    """A MatMul weight of an IR: the decompressed float32 weight and, when compressed, its integer parts."""

    name: str
    element_type: str
    weight: np.ndarray
    codes: np.ndarray | None = None
    zero_points: np.ndarray | None = None
    scales: np.ndarray | None = None


_NUMPY_TYPES = {"f32": np.float32, "f16": np.float16, "u8": np.uint8, "i8": np.int8, "u4": np.uint8, "i4": np.int8}


def _constant_array(node: Any) -> np.ndarray:
    type_name = node.get_element_type().get_type_name()
    shape = list(node.get_output_shape(0))
    if type_name in ("u4", "i4"):
        return _unpack_4bit(node.get_data(), shape, signed=type_name == "i4")
    if type_name not in _NUMPY_TYPES:
        raise ValueError(f"Unsupported constant type {type_name} in weight {node.get_friendly_name()!r}.")
    return np.array(node.get_data(), dtype=_NUMPY_TYPES[type_name]).reshape(shape)


def _evaluate_weight(output: Any, parts: dict[str, Any]) -> np.ndarray | None:
    """Evaluate a constant weight subgraph (Constant, Convert, Subtract, Multiply, Reshape) in numpy, exactly as
    typed in the IR; records the codes/zero-point/scale constants in `parts`. None if the input is not constant."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind == "Constant":
        parts.setdefault("codes", node)
        return _constant_array(node)
    if kind == "Convert":
        value = _evaluate_weight(node.input_value(0), parts)
        dtype = _NUMPY_TYPES.get(node.get_output_element_type(0).get_type_name())
        return None if value is None or dtype is None else value.astype(dtype)
    if kind in ("Subtract", "Multiply"):
        value = _evaluate_weight(node.input_value(0), parts)
        side = node.input_value(1).get_node()
        while side.get_type_name() == "Convert":
            side = side.input_value(0).get_node()
        other = _evaluate_weight(node.input_value(1), {})
        if value is None or other is None or side.get_type_name() != "Constant":
            return None
        parts["zero_points" if kind == "Subtract" else "scales"] = side
        return value - other if kind == "Subtract" else value * other
    if kind == "Reshape":
        value = _evaluate_weight(node.input_value(0), parts)
        return None if value is None else value.reshape(list(node.get_output_shape(0)))
    return None


def ir_weights(output_dir: str | os.PathLike) -> dict[str, IRWeight]:
    """The constant second inputs of every MatMul in `<output_dir>/openvino_model.xml`, decompressed to float32.

    Keys are the names of the weight constants (e.g. `self.model.layers.0.mlp.up_proj.weight`); weights keep the
    (out, in) layout of the IR.
    """
    ov = _require("openvino")
    path = Path(output_dir)
    xml = path / OV_MODEL_NAME if path.is_dir() else path
    if not xml.is_file():
        raise FileNotFoundError(f"No {OV_MODEL_NAME} in {path}. Pass a folder written by export_openvino.")
    model = ov.Core().read_model(xml)
    weights: dict[str, IRWeight] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        parts: dict[str, Any] = {}
        value = _evaluate_weight(op.input_value(1), parts)
        if value is None:
            continue
        codes = parts["codes"]
        name = codes.get_friendly_name()
        if name in weights:
            continue
        compressed = "scales" in parts
        weights[name] = IRWeight(
            name=name,
            element_type=codes.get_element_type().get_type_name(),
            weight=value.astype(np.float32),
            codes=_constant_array(codes) if compressed else None,
            zero_points=_constant_array(parts["zero_points"]) if "zero_points" in parts else None,
            scales=_constant_array(parts["scales"]) if compressed else None,
        )
    return weights


def ir_weight_sparsity(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Fraction of exact zeros in the decompressed MatMul weights of an exported IR, per weight and in total.

    Also reports whether this OpenVINO CPU plugin has `CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE` (`cpu_property`) and
    whether the CPU has Intel AMX (`cpu_has_amx`), which its sparse int8 kernel needs; see the module docstring.
    """
    ov = _require("openvino")
    weights = ir_weights(output_dir)
    per_weight = {}
    zeros = total = 0
    for name, w in weights.items():
        n_zero = int(np.count_nonzero(w.weight == 0))
        zeros, total = zeros + n_zero, total + w.weight.size
        per_weight[name] = {
            "shape": list(w.weight.shape),
            "element_type": w.element_type,
            "sparsity": n_zero / w.weight.size,
        }
    core = ov.Core()
    supported = SPARSE_WEIGHTS_PROPERTY in core.get_property("CPU", "SUPPORTED_PROPERTIES")
    capabilities = _cpu_flags()
    return {
        "sparsity": zeros / total if total else 0.0,
        "num_zeros": zeros,
        "num_weights": total,
        "weights": per_weight,
        "cpu_property": SPARSE_WEIGHTS_PROPERTY if supported else None,
        "cpu_has_amx": "amx_int8" in capabilities or "amx_tile" in capabilities,
    }


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
