"""hf_elastic: weight-sharing neural architecture search over low-rank adapters on the Hugging Face stack.

The packages follow the pipeline, and each imports only from those before it:
`models` → `compression` → `tuners` → `nas` → `search` → `export` → `cli` / `demo`.
"""

import importlib
from typing import Any

from . import _compat, nas
from .compression import (
    QuantizationConfig,
    QuantLinear,
    SparsityConfig,
    SparsityReport,
    load_hub_quantized,
    load_quantized,
    quantize,
    save_quantized,
    sparsify,
    sparsity_of,
)
from .export import (
    CardInfo,
    export_subnetwork,
    load_exported,
    optimize_for_inference,
    prepare_upload_folder,
    push_to_hub,
)
from .nas import (
    TRL_NAMES,
    Dimension,
    NASArgumentsMixin,
    NASTrainer,
    NASTrainerMixin,
    NASTrainingArguments,
    SearchSpace,
    SubnetConfig,
    SuperNetwork,
    get_supernet,
    load_super_network,
    merge_subnet_adapter,
    register_sampler,
)
from .search import (
    CountEvaluator,
    Evaluator,
    ExactMatchEvaluator,
    FunctionEvaluator,
    LabelWordEvaluator,
    LatencyEvaluator,
    LatencyTable,
    LMEvalEvaluator,
    LossEvaluator,
    MetricEvaluator,
    PerplexityEvaluator,
    PredictedLatencyEvaluator,
    SearchConfig,
    SearchResult,
    SubnetSearch,
    remeasure,
    search_subnetworks,
)
from .tuners import ElasticLoraConfig, ElasticLoraLinear, NLSConfig
from .version import __version__

_compat.install()


def __getattr__(name: str) -> Any:
    if name in TRL_NAMES:  # NASSFTTrainer, NASSFTConfig: imported on first use, they need trl
        return getattr(nas, name)
    if name == "accelerate":  # renamed; warns
        return getattr(importlib.import_module(".export", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CardInfo",
    "CountEvaluator",
    "Dimension",
    "ElasticLoraConfig",
    "ElasticLoraLinear",
    "Evaluator",
    "ExactMatchEvaluator",
    "FunctionEvaluator",
    "LMEvalEvaluator",
    "LabelWordEvaluator",
    "LatencyEvaluator",
    "LatencyTable",
    "LossEvaluator",
    "MetricEvaluator",
    "NASArgumentsMixin",
    "NASSFTConfig",
    "NASSFTTrainer",
    "NASTrainer",
    "NASTrainerMixin",
    "NASTrainingArguments",
    "NLSConfig",
    "PerplexityEvaluator",
    "PredictedLatencyEvaluator",
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
    "export_subnetwork",
    "get_supernet",
    "load_exported",
    "load_hub_quantized",
    "load_quantized",
    "load_super_network",
    "merge_subnet_adapter",
    "optimize_for_inference",
    "prepare_upload_folder",
    "push_to_hub",
    "quantize",
    "register_sampler",
    "remeasure",
    "save_quantized",
    "search",
    "search_subnetworks",
    "sparsify",
    "sparsity_of",
]
