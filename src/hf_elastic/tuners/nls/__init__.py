from .config import NLSConfig
from .layer import ElasticLoraLinear

__all__ = ["ElasticLoraLinear", "NLSConfig"]
