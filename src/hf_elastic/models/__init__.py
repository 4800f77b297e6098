"""Architecture knowledge: where the transformer layers, FFN channels and attention heads of each model live."""

from .arch import (
    ARCH_SPECS,
    ArchSpec,
    WidthLayer,
    decoder_layers,
    find_width_layers,
    slice_layer_width,
    transformer_layers,
    weight_out_in,
)

__all__ = [
    "ARCH_SPECS",
    "ArchSpec",
    "WidthLayer",
    "decoder_layers",
    "find_width_layers",
    "slice_layer_width",
    "transformer_layers",
    "weight_out_in",
]
