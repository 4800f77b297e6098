"""`ElasticLoraConfig`: LoNAS elastic LoRA rank plus elastic base-model width."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...utils import typed_fields
from ..nls.config import NLSConfig


def _check_width_choices(name: str, values: Any) -> list[float | int] | None:
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(
            f"ElasticLoraConfig.{name} must be a non-empty list or None, got {values!r}. Pass e.g. [1.0, 0.75, 0.5]."
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"ElasticLoraConfig.{name} holds {v!r}; use fractions (float) or absolute counts (int).")
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError(
                f"ElasticLoraConfig.{name} holds {v}, outside (0, 1]. Fractions must be in (0, 1]; "
                "pass absolute sizes as int."
            )
        if isinstance(v, int) and v < 1:
            raise ValueError(f"ElasticLoraConfig.{name} holds {v}; absolute sizes must be >= 1.")
    return list(values)


@dataclass
class ElasticLoraConfig(NLSConfig):
    """LoNAS: an elastic LoRA rank plus an elastic width of the base model (FFN channels and attention heads).

    Width choices are fractions in (0, 1] of the full size (float) or absolute sizes (int). Heads are removed as whole
    key/value groups, so with grouped-query attention a head choice must be a multiple of
    `num_attention_heads // num_key_value_heads`. A narrower sub-network keeps the channels that come first in
    `channel_order` (set by `SuperNetwork.reorder_channels`; default: the original order).
    """

    elastic_method: ClassVar[str] = "elastic_lora"
    elastic_fields: ClassVar[tuple[str, ...]] = NLSConfig.elastic_fields + (
        "ffn_width_choices",
        "head_choices",
        "channel_order",
    )

    ffn_width_choices: list[float | int] | None = field(
        default_factory=lambda: [1.0, 0.875, 0.75, 0.625, 0.5],
        metadata={
            "help": "FFN intermediate widths a sub-network may use: fractions of the full width (float, in (0, 1]) "
            "or channel counts (int). None keeps the FFN width fixed."
        },
    )
    head_choices: list[float | int] | None = field(
        default=None,
        metadata={
            "help": "Attention head counts a sub-network may use: fractions of num_attention_heads (float) or head "
            "counts (int). Heads go in whole key/value groups. None keeps all heads."
        },
    )
    channel_order: dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Importance order of FFN channels ('<layer>.ffn') and key/value groups ('<layer>.heads'), most "
            "important first. Written by SuperNetwork.reorder_channels; leave None to keep the original order."
        },
    )

    @typed_fields()
    def __post_init__(self) -> None:
        self.ffn_width_choices = _check_width_choices("ffn_width_choices", self.ffn_width_choices)
        self.head_choices = _check_width_choices("head_choices", self.head_choices)
        if self.channel_order is not None and not isinstance(self.channel_order, dict):
            raise ValueError(
                f"ElasticLoraConfig.channel_order must be a dict or None, got {type(self.channel_order).__name__}. "
                "Leave it None; SuperNetwork.reorder_channels fills it."
            )
        super().__post_init__()
