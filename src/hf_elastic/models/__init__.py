"""Architecture knowledge: where the transformer layers, FFN channels and attention heads of each model live."""

from typing import Any

from . import arch
from .arch import (
    ARCH_OVERRIDES,
    ArchOverride,
    ArchSpec,
    WidthLayer,
    decoder_layers,
    find_width_layers,
    slice_layer_width,
    transformer_layers,
    weight_out_in,
)


def __getattr__(name: str) -> Any:
    if name == "ARCH_SPECS":  # renamed: FutureWarning from `arch`
        return getattr(arch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ARCH_OVERRIDES",
    "ArchOverride",
    "ArchSpec",
    "WidthLayer",
    "decoder_layers",
    "find_width_layers",
    "slice_layer_width",
    "transformer_layers",
    "weight_out_in",
]
