"""Compression of the base model before adapter training: calibration, Wanda/magnitude sparsity, INT4/INT8 weights."""

from .quantization import QuantizationConfig, QuantizationReport, QuantLinear, load_quantized, quantize, save_quantized
from .sparsity import SparsityConfig, SparsityReport, sparsify, sparsity_of

__all__ = [
    "QuantLinear",
    "QuantizationConfig",
    "QuantizationReport",
    "SparsityConfig",
    "SparsityReport",
    "load_quantized",
    "quantize",
    "save_quantized",
    "sparsify",
    "sparsity_of",
]
