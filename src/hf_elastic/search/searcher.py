"""`search` / `SubnetSearch`: evaluate sub-networks of a super-network with a strategy and a set of objectives."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn
from peft import PeftModel

from ..nas.loading import load_super_network
from ..nas.search_space import DIMENSION_KINDS, SearchSpace, SubnetConfig
from ..nas.supernet import SuperNetwork, get_supernet
from ..nas.trainer import NAS_STATS_NAME, NASTrainerMixin
from ..utils import config_from_kwargs, read_json, typed_fields
from .evaluators import (
    COUNT_OBJECTIVES,
    CountEvaluator,
    Evaluator,
    FunctionEvaluator,
    LatencyEvaluator,
    LossEvaluator,
    PerplexityEvaluator,
)
from .heuristics import HEURISTICS, activation_based_config, activation_importance, loss_based_config
from .predictor import predictor_search
from .result import Evaluation, SearchResult
from .scoring import extracted_subnetwork, merged_subnetwork, scores_extracted

STRATEGIES = ("nsga2", "predictor", "random", *HEURISTICS)
SEARCHED = ("nsga2", "predictor", "random")  # the strategies that spend `budget`


@dataclass
class SearchConfig:
    """Settings of a sub-network search."""

    strategy: str = field(
        default="nsga2",
        metadata={
            "help": f"How sub-networks are chosen: one of {list(STRATEGIES)}. 'predictor' fits a ridge model of the "
            "first objective on the evaluations so far and evaluates only the front NSGA-II predicts with it and the "
            "other objectives, which must need no model run (e.g. params, or latency from a LatencyTable)."
        },
    )
    objectives: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Objective names, e.g. ('loss', 'params'). Each is the name of a given evaluator, one of "
            f"{list(COUNT_OBJECTIVES)} or 'latency' (built in), or 'loss'/'perplexity' when searching from a "
            "NASTrainer with an eval dataset. None: the given evaluators' names, plus 'params' if there is only one."
        },
    )
    budget: int = field(
        default=100,
        metadata={
            "help": "Distinct sub-networks that 'nsga2', 'predictor' and 'random' evaluate in all (evaluator calls; "
            "repeated proposals are served from the cache), the reference sub-networks included: with the default "
            "three references, budget=40 leaves 37 evaluations to the strategy. The search also stops after 20 x "
            "budget proposals or when the space is exhausted."
        },
    )
    population: int = field(
        default=10,
        metadata={
            "help": "NSGA-II population size (sub-networks per generation); budget / population generations run. "
            "About budget / 10 worked best in benchmarks/bench_search.py. 'predictor': sub-networks evaluated per "
            "round; the first is the reference sub-networks, topped up with random ones to a population."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random and NSGA-II strategies."})
    reference_subnets: tuple[str, ...] = field(
        default=("max", "min", "median"),
        metadata={
            "help": f"Heuristic sub-networks evaluated first, among {list(HEURISTICS)} ('uniform': every layer at "
            "each width in turn, max to min). They count against the budget of 'nsga2', 'predictor' and 'random'."
        },
    )
    fixed_kinds: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": f"Dimension kinds held at their largest choice, among {list(DIMENSION_KINDS)}: e.g. ('rank',) "
            "when the sub-network is merged for deployment, where its LoRA rank costs nothing and a lower one only "
            "loses accuracy. The budget then goes to the widths."
        },
    )
    predictor_candidates: int = field(
        default=1000,
        metadata={"help": "predictor: sub-networks NSGA-II scores with the predictor in each round (no model run)."},
    )
    predictor_alpha: float = field(
        default=1.0, metadata={"help": "predictor: ridge regularization of the quality predictor (> 0)."}
    )
    crossover_prob: float = field(default=0.9, metadata={"help": "NSGA-II crossover probability."})
    mutation_prob: float | None = field(
        default=None, metadata={"help": "NSGA-II per-dimension mutation probability; None: 1 / number of dimensions."}
    )
    loss_tolerance: float = field(
        default=0.01,
        metadata={
            "help": "loss_based: take the smallest choice whose marginal loss is within this fraction of the best."
        },
    )
    activation_threshold: float = field(
        default=0.9,
        metadata={"help": "activation_based: take the smallest choice that keeps this fraction of activation energy."},
    )
    calibration_batches: int = field(
        default=4, metadata={"help": "activation_based: number of calibration batches to run."}
    )
    score_extracted: bool | Literal["auto"] = field(
        default="auto",
        metadata={
            "help": "Score each sub-network on its extracted copy (SuperNetwork.extract_model: adapters merged, cut "
            "FFN channels and heads removed) rather than on the masked super-network: the same function at the cost "
            "of the widths kept (about 1.5x faster at 62.5 % FFN on SmolLM2-135M), for the evaluators that only read "
            "the model (scores_merged). Holds a merged copy of the adapted and sliced layers while each sub-network "
            "is scored; 'auto' does so when some width is elastic and that copy takes at most half the device's "
            "free memory."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar with the current best."})

    @typed_fields()
    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"SearchConfig.strategy={self.strategy!r} is unknown; use one of {list(STRATEGIES)}.")
        if self.objectives is not None:
            if isinstance(self.objectives, str):
                self.objectives = (self.objectives,)
            self.objectives = tuple(self.objectives)
            if not self.objectives or not all(isinstance(o, str) and o for o in self.objectives):
                raise ValueError(
                    f"SearchConfig.objectives={self.objectives!r} must be a non-empty list of names, e.g. "
                    "('loss', 'params'), or None."
                )
            if len(set(self.objectives)) != len(self.objectives):
                raise ValueError(f"SearchConfig.objectives={self.objectives!r} repeats a name; list each once.")
        for name in ("budget", "population", "calibration_batches", "predictor_candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SearchConfig.{name}={value!r} must be a positive integer.")
        if self.population < 2:
            raise ValueError(f"SearchConfig.population={self.population} must be >= 2 (NSGA-II needs two parents).")
        self.reference_subnets = tuple(self.reference_subnets)
        bad = [r for r in self.reference_subnets if r not in HEURISTICS]
        if bad:
            raise ValueError(
                f"SearchConfig.reference_subnets holds {bad}; use names among {list(HEURISTICS)} or an empty tuple."
            )
        self.fixed_kinds = (self.fixed_kinds,) if isinstance(self.fixed_kinds, str) else tuple(self.fixed_kinds)
        if not set(self.fixed_kinds) <= set(DIMENSION_KINDS):
            raise ValueError(
                f"SearchConfig.fixed_kinds={self.fixed_kinds!r} names an unknown kind; use kinds among "
                f"{list(DIMENSION_KINDS)}, e.g. ('rank',), or ()."
            )
        references = len(set(self.reference_subnets))
        if self.strategy == "random" and self.budget < references:
            raise ValueError(
                f"SearchConfig.budget={self.budget} is smaller than the {references} reference sub-networks "
                f"{list(self.reference_subnets)} it includes. Raise budget to at least {references} or pass fewer "
                "reference_subnets."
            )
        if not self.predictor_alpha > 0:
            raise ValueError(f"SearchConfig.predictor_alpha={self.predictor_alpha} must be > 0, e.g. 1.0.")
        if self.strategy in ("nsga2", "predictor") and self.budget - references < self.population:
            refs = f" after the {references} reference sub-networks {list(self.reference_subnets)}" * bool(references)
            who = "NSGA-II" if self.strategy == "nsga2" else "the predictor"
            raise ValueError(
                f"SearchConfig.budget={self.budget} leaves {self.budget - references} evaluations to {who}{refs}, "
                f"fewer than population={self.population}: {who} would not finish its first round. Raise "
                f"budget to at least {self.population + references}, lower population"
                f"{', or pass reference_subnets=()' if references else ''}."
            )
        if not 0.0 <= self.crossover_prob <= 1.0:
            raise ValueError(f"SearchConfig.crossover_prob={self.crossover_prob} must be in [0, 1].")
        if self.mutation_prob is not None and not 0.0 <= self.mutation_prob <= 1.0:
            raise ValueError(f"SearchConfig.mutation_prob={self.mutation_prob} must be in [0, 1] or None.")
        if not self.loss_tolerance >= 0.0:
            raise ValueError(f"SearchConfig.loss_tolerance={self.loss_tolerance} must be >= 0 (0 = lowest loss).")
        if not 0.0 < self.activation_threshold <= 1.0:
            raise ValueError(f"SearchConfig.activation_threshold={self.activation_threshold} must be in (0, 1].")


SearchTarget = SuperNetwork | PeftModel | NASTrainerMixin | SearchSpace | str | os.PathLike


class SubnetSearch:
    """Runs one search; `search_subnetworks()` is the one-call front end.

    Args:
        target: a `SuperNetwork`, an elastic `PeftModel`, a `NASTrainer` or other `NASTrainerMixin` trainer (its
            eval dataset, collator and training statistics are used), a saved super-adapter directory (with
            `base_model`), or a bare `SearchSpace` (then every objective must be an evaluator that needs no model,
            e.g. `FunctionEvaluator`).
        evaluators: an `Evaluator`, a plain callable `fn(config) -> float` (objective `"score"`, minimized), or a
            list of them.
        config: the `SearchConfig`.
        base_model: the base model to load a super-adapter directory onto.
        nas_stats: training statistics for `loss_based`: a `nas_stats.json` path or its dict (default: the
            trainer's, or `nas_stats.json` in the super-adapter directory).
        calibration_data: batches for `activation_based` (default: the first evaluator's data, or the trainer's
            eval set).
    """

    def __init__(
        self,
        target: SearchTarget,
        evaluators: Evaluator | Callable | Sequence[Evaluator | Callable] | None = None,
        config: SearchConfig | None = None,
        *,
        base_model: nn.Module | None = None,
        nas_stats: str | os.PathLike | Mapping[str, Any] | None = None,
        calibration_data: Any = None,
    ) -> None:
        self.config = config or SearchConfig()
        trainer, directory = None, None
        if isinstance(target, NASTrainerMixin):
            trainer, self.supernet = target, target.supernet
        elif isinstance(target, SuperNetwork):
            self.supernet = target
        elif isinstance(target, PeftModel):
            self.supernet = get_supernet(target)
        elif isinstance(target, SearchSpace):
            self.supernet = None
        elif isinstance(target, (str, os.PathLike)):
            directory = Path(target)
            if base_model is None:
                raise ValueError(
                    f"Searching the super-adapter in {directory} needs the base model: pass base_model=... "
                    "(the model the adapter was trained on)."
                )
            self.supernet = get_supernet(load_super_network(base_model, directory))
        else:
            raise ValueError(
                f"Cannot search {type(target).__name__}; pass a SuperNetwork, an elastic PeftModel, a NASTrainer, "
                "a super-adapter directory or a SearchSpace."
            )
        self.space = (target if self.supernet is None else self.supernet.space).fixed(self.config.fixed_kinds)
        if len(self.space) == 0:
            raise ValueError("The search space has no dimensions: there is nothing to search.")
        if self.space.num_configs == 1:
            fixed = self.config.fixed_kinds
            raise ValueError(
                "Every dimension of the search space has a single choice, so there is only one sub-network and "
                "nothing to search. Give some dimension two or more choices"
                + (f", or fix fewer kinds than SearchConfig.fixed_kinds={list(fixed)}." if fixed else ".")
            )
        self.trainer = trainer
        self._stats_source = (nas_stats, trainer, directory)
        given = (
            [] if evaluators is None else list(evaluators) if isinstance(evaluators, (list, tuple)) else [evaluators]
        )
        given = [e if isinstance(e, Evaluator) else FunctionEvaluator(e) for e in given]
        self.objectives, self.evaluators = self._resolve_objectives(given)
        self.directions = [e.direction for e in self.evaluators]
        # quantization-aware adapters merge exactly (new codes, restored bit for bit), so quality is scored merged
        self._merge = self.supernet is not None and bool(self.supernet.config.quantization_aware)
        self._extract = self.supernet is not None and scores_extracted(
            self.supernet, self.space, self.config.score_extracted
        )
        self.calibration_data = calibration_data
        if calibration_data is None:
            self.calibration_data = next((e.batches for e in self.evaluators if hasattr(e, "batches")), None)
            if self.calibration_data is None and trainer is not None and trainer.eval_dataset is not None:
                self.calibration_data = trainer.get_eval_dataloader()
        self.records: dict[str, Evaluation] = {}
        self.cache_hits = 0
        self._heuristics: dict[str, list[SubnetConfig]] = {}
        self.predictor_info: dict[str, Any] = {}
        self._stats_name = "nas_stats"

    @functools.cached_property
    def nas_stats(self) -> dict[str, Any] | None:
        """The training statistics for `loss_based`, read on first use (other strategies never read them)."""
        nas_stats, trainer, directory = self._stats_source
        if isinstance(nas_stats, Mapping):
            return dict(nas_stats)
        if nas_stats is None and trainer is not None:
            self._stats_name = "the trainer's nas_stats"
            return trainer.sampler.stats()
        if nas_stats is None and directory is not None and (directory / NAS_STATS_NAME).is_file():
            nas_stats = directory / NAS_STATS_NAME
        if nas_stats is None:
            return None
        self._stats_name = str(nas_stats)
        stats = read_json(nas_stats, "train again, or pick a strategy other than loss_based")
        if not isinstance(stats.get("config_losses"), dict):
            raise ValueError(f"{nas_stats} has no 'config_losses' table; it was not written by NASTrainer.")
        return stats

    def _resolve_objectives(self, given: list[Evaluator]) -> tuple[list[str], list[Evaluator]]:
        names = [e.name for e in given]
        if len(set(names)) != len(names):
            raise ValueError(f"Two evaluators share a name in {names}; give each a distinct `name`.")
        objectives = self.config.objectives
        if objectives is None:
            if not given:
                objectives = ("loss", "params") if self.trainer is not None else ()
            else:
                objectives = tuple(names) + (("params",) if len(given) == 1 and self.supernet is not None else ())
            if not objectives:
                raise ValueError("No objective: pass an evaluator (e.g. LossEvaluator(batches)) or objectives=.")
        by_name = {e.name: e for e in given}
        trainer_data = None
        if self.trainer is not None and self.trainer.eval_dataset is not None:
            trainer_data = self.trainer.get_eval_dataloader()
        evaluators = []
        for name in objectives:
            if name in by_name:
                evaluator = by_name[name]
            elif name in COUNT_OBJECTIVES:
                evaluator = CountEvaluator(name)
            elif name == "latency":
                evaluator = LatencyEvaluator()
            elif name in ("loss", "perplexity") and trainer_data is not None:
                evaluator = (LossEvaluator if name == "loss" else PerplexityEvaluator)(trainer_data)
            else:
                known = [
                    *by_name,
                    *COUNT_OBJECTIVES,
                    "latency",
                    *(["loss", "perplexity"] if trainer_data is not None else []),
                ]
                raise ValueError(
                    f"Unknown objective {name!r}; available here: {known}. For another objective pass an Evaluator "
                    f"with name={name!r}."
                )
            if self.supernet is None and (
                evaluator.needs_model or isinstance(evaluator, (CountEvaluator, LatencyEvaluator))
            ):
                raise ValueError(
                    f"Objective {name!r} needs a super-network, but the target is a bare SearchSpace. Search a "
                    "SuperNetwork, or use FunctionEvaluator objectives."
                )
            evaluators.append(evaluator)
        if self.config.strategy == "predictor":
            slow = [
                n
                for n, e in zip(objectives[1:], evaluators[1:], strict=True)
                if e.needs_model or isinstance(e, LatencyEvaluator)
            ]
            if slow:
                raise ValueError(
                    f"strategy='predictor' predicts the first objective {objectives[0]!r} and computes the others for "
                    f"thousands of candidates, but {slow} run the model. Use costs that need no forward, e.g. "
                    "'params', 'macs' or PredictedLatencyEvaluator(LatencyTable.measure(supernet)); or use "
                    "strategy='nsga2'."
                )
        unused = [n for n in names if n not in objectives]
        if unused:
            raise ValueError(f"Evaluators {unused} are not in objectives={list(objectives)}; add their names.")
        return list(objectives), evaluators

    # ------------------------------------------------------------------ evaluation
    def key(self, config: SubnetConfig) -> str:
        return ".".join(map(str, self.space.encode(config)))

    def evaluate(self, config: SubnetConfig, source: str) -> tuple[Evaluation, bool]:
        """Evaluate `config` once (later calls return the cached record). Returns the record and whether it is new."""
        key = self.key(config)
        record = self.records.get(key)
        if record is not None:
            self.cache_hits += 1
            if source not in record.sources:
                record.sources.append(source)
            return record, False
        config = self.space.validate(config)
        if self.supernet is not None and any(e.needs_model for e in self.evaluators):
            self.supernet.activate(config)
        values = {}
        pairs = list(zip(self.objectives, self.evaluators, strict=True))
        cheaper = self._merge or self._extract  # a cheaper copy of the same function exists
        for merged in (False, True):
            todo = [(n, e) for n, e in pairs if (e.needs_model and e.scores_merged and cheaper) == merged]
            if not todo:
                continue
            with self._scoring(config) if merged else contextlib.nullcontext(self.supernet) as target:
                for name, evaluator in todo:
                    value = evaluator(target, config)
                    try:
                        values[name] = float(value)
                    except (TypeError, ValueError) as e:
                        raise TypeError(f"Evaluator {name!r} returned {value!r}; it must return a float.") from e
        values = {name: values[name] for name in self.objectives}
        record = Evaluation(len(self.records), key, config, values, [source])
        self.records[key] = record
        if not record.valid:
            warnings.warn(
                f"Sub-network {key} got non-finite objectives {values}; it is kept out of the front.", stacklevel=2
            )
        return record, True

    def _scoring(self, config: SubnetConfig) -> contextlib.AbstractContextManager[Any]:
        """The copy of `config` that the `scores_merged` evaluators score (see `hf_elastic.search.scoring`)."""
        if self._extract:
            return extracted_subnetwork(self.supernet, config)
        return merged_subnetwork(self.supernet)

    def heuristic_configs(self, name: str) -> list[SubnetConfig]:
        """The sub-networks a heuristic strategy picks (computed once per search): one, or the ladder of 'uniform'."""
        if name not in self._heuristics:
            self._heuristics[name] = self._heuristic_configs(name)
        return [dict(config) for config in self._heuristics[name]]

    def _heuristic_configs(self, name: str) -> list[SubnetConfig]:
        if name in ("max", "min", "median"):
            return [getattr(self.space, f"{name}_config")()]
        if name == "uniform":
            return self.space.uniform_configs()
        if name == "loss_based":
            if self.nas_stats is None:
                raise ValueError(
                    "strategy 'loss_based' needs training statistics: pass nas_stats= (nas_stats.json or its dict), "
                    "search a NASTrainer, or a super-adapter directory holding nas_stats.json."
                )
            return [loss_based_config(self.space, self.nas_stats, self.config.loss_tolerance, source=self._stats_name)]
        if name == "activation_based":
            if self.supernet is None:
                raise ValueError("strategy 'activation_based' needs a super-network, not a bare SearchSpace.")
            if self.calibration_data is None:
                raise ValueError(
                    "strategy 'activation_based' needs calibration batches: pass calibration_data= (a list of "
                    "batches or a DataLoader), a LossEvaluator, or a NASTrainer with an eval dataset."
                )
            batches = itertools.islice(self.calibration_data, self.config.calibration_batches)
            fractions = activation_importance(self.supernet, batches)
            return [activation_based_config(fractions, self.config.activation_threshold)]
        raise ValueError(f"Unknown heuristic {name!r}; use one of {list(HEURISTICS)}.")

    def _best_text(self) -> str:
        name, direction = self.objectives[0], self.directions[0]
        values = [r.values[name] for r in self.records.values() if r.valid]
        if not values:
            return ""
        return f"best {name}={(min(values) if direction == 'minimize' else max(values)):.4g}"

    # ------------------------------------------------------------------ strategies
    def run(self) -> SearchResult:
        """Evaluate the reference sub-networks, then run the strategy; returns the `SearchResult`."""
        from tqdm.auto import tqdm

        cfg = self.config
        model = self.supernet.model if self.supernet is not None else None
        previous = self.supernet.active_config if self.supernet is not None else None
        was_training = model.training if model is not None else False
        start, trials = time.perf_counter(), 0
        searched = cfg.strategy in SEARCHED
        if model is not None:
            model.eval()
        bar = tqdm(total=cfg.budget if searched else None, desc=f"search ({cfg.strategy})", disable=not cfg.progress)
        try:
            for name in cfg.reference_subnets:
                self._heuristic(name, bar)
            if cfg.strategy == "nsga2":
                trials = self._nsga2(bar)
            elif cfg.strategy == "predictor":
                trials = predictor_search(self, bar)
            elif cfg.strategy == "random":
                trials = self._random(bar)
            else:
                trials = self._heuristic(cfg.strategy, bar)
        finally:
            bar.close()
            if self.supernet is not None:
                self.supernet.activate(previous)
                model.train(was_training)
        evaluations = list(self.records.values())
        info = {
            "budget": cfg.budget if searched else None,
            "population": cfg.population if cfg.strategy in ("nsga2", "predictor") else None,
            "trials": trials,
            "evaluations": len(evaluations),
            "cache_hits": self.cache_hits,
            "wall_time_s": time.perf_counter() - start,
            "reference_subnets": list(cfg.reference_subnets),
            "score_extracted": self._extract,
        } | ({"predictor": self.predictor_info} if cfg.strategy == "predictor" else {})
        return SearchResult(self.space, self.objectives, self.directions, evaluations, cfg.strategy, cfg.seed, info)

    def _max_trials(self) -> int:
        return 20 * self.config.budget

    def _budget_left(self) -> bool:
        """Whether another distinct sub-network may be evaluated: the budget includes the reference sub-networks."""
        return len(self.records) < min(self.config.budget, self.space.num_configs)

    def _heuristic(self, name: str, bar: Any) -> int:
        """Evaluate the sub-networks of heuristic `name` (a reference or the strategy); returns how many it has."""
        for config in (configs := self.heuristic_configs(name)):
            if self.evaluate(config, name)[1]:
                bar.update(1)
        return len(configs)

    def _random(self, bar: Any) -> int:
        rng, trials = random.Random(self.config.seed), 0
        while self._budget_left() and trials < self._max_trials():
            trials += 1
            record, fresh = self.evaluate(self.space.sample(rng), "random")
            if fresh:
                bar.update(1)
                bar.set_postfix_str(self._best_text(), refresh=False)
        return trials

    def _nsga2(self, bar: Any) -> int:
        import optuna
        from optuna.distributions import IntDistribution
        from optuna.trial import TrialState

        cfg = self.config
        searchable = [d for d in self.space if len(d.choices) > 1]
        distributions = {d.name: IntDistribution(0, len(d.choices) - 1) for d in searchable}
        fixed = {d.name: d.choices[0] for d in self.space if len(d.choices) == 1}
        sampler = optuna.samplers.NSGAIISampler(
            population_size=cfg.population,
            crossover_prob=cfg.crossover_prob,
            mutation_prob=cfg.mutation_prob,
            seed=cfg.seed,
        )
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.create_study(directions=self.directions, sampler=sampler)
            trials = 0
            while self._budget_left() and trials < self._max_trials():
                trials += 1
                trial = study.ask(distributions)
                config = fixed | {d.name: d.choices[trial.params[d.name]] for d in searchable}
                record, fresh = self.evaluate(config, "nsga2")
                if record.valid:
                    study.tell(trial, [record.values[o] for o in self.objectives])
                else:
                    study.tell(trial, state=TrialState.FAIL)
                if fresh:
                    bar.update(1)
                    bar.set_postfix_str(self._best_text(), refresh=False)
        finally:
            optuna.logging.set_verbosity(verbosity)
        return trials


def search_subnetworks(
    target: SearchTarget,
    evaluator: Evaluator | Callable | Sequence[Evaluator | Callable] | None = None,
    config: SearchConfig | str | None = None,
    *,
    base_model: nn.Module | None = None,
    nas_stats: str | os.PathLike | Mapping[str, Any] | None = None,
    calibration_data: Any = None,
    output_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> SearchResult:
    """Search the sub-networks of a trained super-network.

    Args:
        target: a `SuperNetwork`, elastic `PeftModel`, `NASTrainer`, super-adapter directory (with `base_model`)
            or `SearchSpace`; see `SubnetSearch`.
        evaluator: the quality objective(s): `LossEvaluator`, `PerplexityEvaluator`, `MetricEvaluator`,
            `LMEvalEvaluator`, your own `Evaluator`, or a callable `fn(config) -> float`. Optional with a
            `NASTrainer` (its eval loss is used).
        config: a `SearchConfig` (strategy, objectives, budget, population, seed, ...), or a strategy name as a
            shortcut for `SearchConfig(strategy=name, **kwargs)`.
        base_model, nas_stats, calibration_data: see `SubnetSearch`.
        output_dir: if set, write `search.json`, `search.csv` and `search.png` there.
        **kwargs: instead of a `SearchConfig`, its fields, e.g. `objectives=("loss", "params"), budget=40`. The
            budget includes the `reference_subnets` (max, min and median by default), so `budget=40` makes exactly
            40 evaluator calls (fewer when the space is smaller): 3 references and 37 chosen by the strategy.

    Example:

    ```py
    >>> config = SearchConfig(objectives=("loss", "params"), budget=200)
    >>> result = search_subnetworks(supernet, LossEvaluator(eval_batches), config)
    >>> result.front                                        # non-dominated sub-networks
    >>> result.best_under("loss", "params", 0.7, relative=True).config
    ```
    """
    if isinstance(config, str):
        if "strategy" in kwargs:
            raise ValueError(
                f"search_subnetworks() got the strategy twice: {config!r} and strategy={kwargs['strategy']!r}."
            )
        config, kwargs = None, {"strategy": config, **kwargs}
    config = config_from_kwargs(SearchConfig, config, kwargs, "search_subnetworks")
    runner = SubnetSearch(
        target, evaluator, config, base_model=base_model, nas_stats=nas_stats, calibration_data=calibration_data
    )
    result = runner.run()
    if output_dir is not None:
        result.save(output_dir)
    return result
