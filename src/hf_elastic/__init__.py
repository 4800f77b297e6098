"""hf_elastic: weight-sharing neural architecture search over low-rank adapters on the Hugging Face stack."""

__version__ = "0.1.0"

from .elastic_lora import ElasticLoraConfig
from .export import accelerate, export_subnetwork, load_exported
from .hub import CardInfo, prepare_upload_folder, push_to_hub
from .nls import ElasticLoraLinear, NLSConfig
from .quantization import QuantizationConfig, QuantLinear, load_quantized, quantize, save_quantized
from .search import (
    CountEvaluator,
    Evaluator,
    FunctionEvaluator,
    LatencyEvaluator,
    LMEvalEvaluator,
    LossEvaluator,
    MetricEvaluator,
    PerplexityEvaluator,
    SearchConfig,
    SearchResult,
    SubnetSearch,
    search,
)
from .search_space import Dimension, SearchSpace, SubnetConfig
from .sparsity import SparsityConfig, SparsityReport, sparsify, sparsity_of
from .supernet import SuperNetwork, get_supernet, load_super_network, merge_subnet_adapter
from .trainer import NASTrainer, NASTrainingArguments, register_sampler

__all__ = [
    "CardInfo",
    "CountEvaluator",
    "Dimension",
    "ElasticLoraConfig",
    "ElasticLoraLinear",
    "Evaluator",
    "FunctionEvaluator",
    "LMEvalEvaluator",
    "LatencyEvaluator",
    "LossEvaluator",
    "MetricEvaluator",
    "NASTrainer",
    "NASTrainingArguments",
    "NLSConfig",
    "PerplexityEvaluator",
    "QuantLinear",
    "QuantizationConfig",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "SparsityConfig",
    "SparsityReport",
    "SubnetConfig",
    "SubnetSearch",
    "SuperNetwork",
    "__version__",
    "accelerate",
    "export_subnetwork",
    "get_supernet",
    "load_exported",
    "load_quantized",
    "load_super_network",
    "merge_subnet_adapter",
    "prepare_upload_folder",
    "push_to_hub",
    "quantize",
    "register_sampler",
    "save_quantized",
    "search",
    "sparsify",
    "sparsity_of",
]
