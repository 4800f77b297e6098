"""Group-wise INT4/INT8 weight quantization: the `QuantLinear` format, RTN, GPTQ, saving/loading, and the GPTQ and
compressed-tensors checkpoints of the Hub as bases."""

from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GROUP_SIZE_CANDIDATES,
    QUANT_CONFIG_NAME,
    QUANT_REPORT_NAME,
    QUANT_WEIGHTS_NAME,
    QuantLinear,
    default_group_size,
    dequantize_codes,
    expand_groups,
    group_size_note,
    resolve_group_size,
)
from .gptq import gptq_quantize, output_error
from .hub_loading import QuantizedBaseConfig, load_hub_quantized, rebuild_residual
from .quantize import ModuleQuantization, QuantizationConfig, QuantizationReport, quantize
from .rtn import RESIDUAL_STEPS, compute_qparams, quantize_codes, residual_codes, round_codes
from .serialization import load_quantized, save_quantized

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GROUP_SIZE_CANDIDATES",
    "QUANT_CONFIG_NAME",
    "QUANT_REPORT_NAME",
    "QUANT_WEIGHTS_NAME",
    "RESIDUAL_STEPS",
    "ModuleQuantization",
    "QuantLinear",
    "QuantizationConfig",
    "QuantizationReport",
    "QuantizedBaseConfig",
    "compute_qparams",
    "default_group_size",
    "dequantize_codes",
    "expand_groups",
    "gptq_quantize",
    "group_size_note",
    "load_hub_quantized",
    "load_quantized",
    "output_error",
    "quantize",
    "quantize_codes",
    "rebuild_residual",
    "residual_codes",
    "resolve_group_size",
    "round_codes",
    "save_quantized",
]
