from .arch import ARCH_SPECS, ArchSpec
from .config import ElasticLoraConfig

__all__ = ["ARCH_SPECS", "ArchSpec", "ElasticLoraConfig"]
