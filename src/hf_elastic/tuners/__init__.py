"""peft tuners: elastic-rank LoRA (NLS: Shears, SQFT) and elastic rank plus elastic base width (LoNAS).

Each method is a package with its config and its layer, as in peft: `nls` (`NLSConfig`, the elastic-rank
`ElasticLoraLinear`, which LoNAS uses too) and `elastic_lora` (`ElasticLoraConfig`, and in `width` the masks that
cut FFN channels and attention heads).
"""

from .elastic_lora import ElasticLoraConfig, WidthMasks
from .nls import ElasticLoraLinear, NLSConfig

__all__ = ["ElasticLoraConfig", "ElasticLoraLinear", "NLSConfig", "WidthMasks"]
