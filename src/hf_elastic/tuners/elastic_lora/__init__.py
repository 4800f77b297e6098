from .config import ElasticLoraConfig
from .width import WidthMasks, kept_units, width_choices

__all__ = ["ElasticLoraConfig", "WidthMasks", "kept_units", "width_choices"]
