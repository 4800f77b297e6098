"""hf_elastic: weight-sharing neural architecture search over low-rank adapters on the Hugging Face stack."""

__version__ = "0.1.0"

from .elastic_lora import ElasticLoraConfig
from .nls import ElasticLoraLinear, NLSConfig
from .search_space import Dimension, SearchSpace, SubnetConfig
from .supernet import SuperNetwork, get_supernet, load_super_network, merge_subnet_adapter
from .trainer import NASTrainer, NASTrainingArguments, register_sampler

__all__ = [
    "Dimension",
    "ElasticLoraConfig",
    "ElasticLoraLinear",
    "NASTrainer",
    "NASTrainingArguments",
    "NLSConfig",
    "SearchSpace",
    "SubnetConfig",
    "SuperNetwork",
    "__version__",
    "get_supernet",
    "load_super_network",
    "merge_subnet_adapter",
    "register_sampler",
]
