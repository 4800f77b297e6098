"""Weight-sharing NAS: the search space, the super-network view of a peft model, and the trainer that samples it."""

from .search_space import Dimension, SearchSpace, SubnetConfig
from .supernet import NamedConfig, SuperNetwork, get_supernet, load_super_network, merge_subnet_adapter
from .trainer import NASTrainer, NASTrainingArguments, register_sampler

__all__ = [
    "Dimension",
    "NASTrainer",
    "NASTrainingArguments",
    "NamedConfig",
    "SearchSpace",
    "SubnetConfig",
    "SuperNetwork",
    "get_supernet",
    "load_super_network",
    "merge_subnet_adapter",
    "register_sampler",
]
