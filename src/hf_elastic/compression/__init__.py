"""Compression of the base model before adapter training: calibration, Wanda/magnitude sparsity, INT4/INT8 weights."""

from .quantization import (
    QuantizationConfig,
    QuantizationReport,
    QuantizedBaseConfig,
    QuantLinear,
    load_hub_quantized,
    load_quantized,
    quantize,
    save_quantized,
)
from .sparsity import SparsityConfig, SparsityReport, sparsify, sparsity_of

__all__ = [
    "QuantLinear",
    "QuantizationConfig",
    "QuantizationReport",
    "QuantizedBaseConfig",
    "SparsityConfig",
    "SparsityReport",
    "load_hub_quantized",
    "load_quantized",
    "quantize",
    "save_quantized",
    "sparsify",
    "sparsity_of",
]
