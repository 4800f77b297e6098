"""Weight-sharing NAS: the search space, the super-network view of a peft model, and the trainers that sample it.

`NASSFTTrainer` and `NASSFTConfig` (trl's SFTTrainer) are imported on first use and need `pip install hf-elastic[trl]`.
"""

from typing import Any

from .costs import COMPRESSION_COSTS, CompressionCosts
from .geometry import SubnetGeometry
from .importance import IMPORTANCE_METHODS
from .loading import load_super_network, merge_subnet_adapter
from .samplers import register_sampler
from .search_space import Dimension, SearchSpace, SubnetConfig
from .supernet import NamedConfig, SuperNetwork, compression_costs, get_supernet
from .trainer import NASArgumentsMixin, NASTrainer, NASTrainerMixin, NASTrainingArguments

TRL_NAMES = ("NASSFTConfig", "NASSFTTrainer")


def __getattr__(name: str) -> Any:
    if name not in TRL_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from . import sft
    except ImportError as error:
        raise ImportError(
            f"hf_elastic.{name} needs trl ({error}); install it with `pip install 'hf-elastic[trl]'` (Python >= 3.11)."
        ) from error
    return getattr(sft, name)


__all__ = [
    "COMPRESSION_COSTS",
    "CompressionCosts",
    "Dimension",
    "IMPORTANCE_METHODS",
    "NASArgumentsMixin",
    "NASSFTConfig",
    "NASSFTTrainer",
    "NASTrainer",
    "NASTrainerMixin",
    "NASTrainingArguments",
    "NamedConfig",
    "SearchSpace",
    "SubnetConfig",
    "SubnetGeometry",
    "SuperNetwork",
    "get_supernet",
    "load_super_network",
    "merge_subnet_adapter",
    "compression_costs",
    "register_sampler",
]
