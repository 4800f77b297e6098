"""peft tuners: elastic-rank LoRA (NLS: Shears, SQFT) and elastic rank plus elastic base width (LoNAS)."""

from .elastic_lora import ElasticLoraConfig
from .nls import ElasticLoraLinear, NLSConfig

__all__ = ["ElasticLoraConfig", "ElasticLoraLinear", "NLSConfig"]
