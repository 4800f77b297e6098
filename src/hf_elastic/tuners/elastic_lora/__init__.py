from .config import ElasticLoraConfig

__all__ = ["ElasticLoraConfig"]
