"""Sub-network search: score sub-networks of a trained super-network and find the best trade-offs.

After NAS training, `search_subnetworks` evaluates sub-networks with one or more objectives (a quality objective
such as the eval loss, and a cost such as the parameter count, the MACs or the measured latency) and returns a
`SearchResult` with every evaluated sub-network and the Pareto front.

Strategies:

- `"max"`, `"min"`, `"median"`: the fixed sub-networks of the search space (median is the Shears/SQFT heuristic).
- `"loss_based"`: uses the per-sub-network training losses of `nas_stats.json`; see `loss_based_config`.
- `"activation_based"`: uses adapter and channel activations on a few calibration batches; see
  `activation_importance`.
- `"random"`: `budget` distinct uniformly random sub-networks.
- `"nsga2"`: multi-objective evolutionary search (NSGA-II) over the choice index of every dimension.

NSGA-II comes from optuna (`optuna.samplers.NSGAIISampler`) rather than pymoo: optuna is actively maintained with
frequent releases; it is a pure-Python wheel whose dependencies (numpy, sqlalchemy, alembic, colorlog, pyyaml, tqdm)
need no compiler, while pymoo 0.6 requires scipy, autograd, cma, moocore and alive-progress; its ask/tell API keeps
the loop here (caching repeated sub-networks, the progress bar, NaN handling, activating the model); it handles
integer and categorical parameters natively; and a seeded sampler makes runs reproducible. The search runs over the
choice index (0 = largest) of every dimension with more than one choice.
`hf_elastic.search` is this package; the function is `search_subnetworks` (calling the package, or importing
`search` from it, still works with a `FutureWarning`).
"""

import sys
from types import ModuleType
from typing import Any

from ..utils import warn_renamed
from .evaluators import (
    COUNT_OBJECTIVES,
    CountEvaluator,
    Direction,
    Evaluator,
    FunctionEvaluator,
    LatencyEvaluator,
    LMEvalEvaluator,
    LossEvaluator,
    MetricEvaluator,
    PerplexityEvaluator,
)
from .heuristics import HEURISTICS, activation_based_config, activation_importance, loss_based_config
from .latency import LatencyTable, PredictedLatencyEvaluator, remeasure, spearman
from .result import Evaluation, SearchResult, hypervolume_2d, pareto_front
from .searcher import STRATEGIES, SearchConfig, SearchTarget, SubnetSearch, search_subnetworks
from .tasks import ExactMatchEvaluator, LabelWordEvaluator, extract_answer

__all__ = [
    "COUNT_OBJECTIVES",
    "HEURISTICS",
    "STRATEGIES",
    "CountEvaluator",
    "Direction",
    "Evaluation",
    "Evaluator",
    "ExactMatchEvaluator",
    "FunctionEvaluator",
    "LMEvalEvaluator",
    "LabelWordEvaluator",
    "LatencyEvaluator",
    "LatencyTable",
    "LossEvaluator",
    "MetricEvaluator",
    "PerplexityEvaluator",
    "PredictedLatencyEvaluator",
    "SearchConfig",
    "SearchResult",
    "SearchTarget",
    "SubnetSearch",
    "activation_based_config",
    "activation_importance",
    "extract_answer",
    "hypervolume_2d",
    "loss_based_config",
    "pareto_front",
    "remeasure",
    "search_subnetworks",
    "spearman",
]


def _renamed() -> None:
    warn_renamed("hf_elastic.search(...)", "hf_elastic.search_subnetworks(...)", "hf_elastic.search is the package", 4)


def __getattr__(name: str) -> Any:
    if name == "search":
        _renamed()
        return search_subnetworks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _SearchPackage(ModuleType):
    """Calling the package runs `search_subnetworks`, as `hf_elastic.search(...)` did when it was the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _renamed()
        return search_subnetworks(*args, **kwargs)


sys.modules[__name__].__class__ = _SearchPackage
