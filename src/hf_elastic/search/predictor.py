"""Predictor-guided search (`strategy="predictor"`): a ridge model of the quality objective steers NSGA-II.

Each round fits `RidgePredictor` (one-hot choices, numpy only) on the sub-networks evaluated so far, runs NSGA-II over
the predicted quality and the cheap cost objectives (a latency table, a parameter count: no model forward), and
evaluates only `population` sub-networks spread along the predicted front; their measured quality, unseen by the
fit, scores the predictor (Spearman rank correlation, in `SearchResult.info["predictor"]`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..nas.search_space import SearchSpace, SubnetConfig
from .latency import spearman

SubnetSearch = Any  # hf_elastic.search.searcher.SubnetSearch, which imports this module


class RidgePredictor:
    """Ridge regression of an objective on the one-hot choices of every dimension with more than one choice.

    Example:

    ```py
    >>> predictor = RidgePredictor(space).fit(configs, accuracies)
    >>> predictor.predict([space.median_config()])
    ```
    """

    def __init__(self, space: SearchSpace, alpha: float = 1.0) -> None:
        if not alpha > 0:
            raise ValueError(f"RidgePredictor alpha={alpha} must be > 0.")
        self.space, self.alpha = space, alpha
        self._dims = [d for d in space if len(d.choices) > 1]
        self._offsets = np.cumsum([0] + [len(d.choices) for d in self._dims])
        self.weights: np.ndarray | None = None
        self.intercept = 0.0

    def features(self, configs: Sequence[SubnetConfig]) -> np.ndarray:
        x = np.zeros((len(configs), int(self._offsets[-1])))
        for row, config in enumerate(configs):
            for d, offset in zip(self._dims, self._offsets, strict=False):
                x[row, offset + d.choices.index(config[d.name])] = 1.0
        return x

    def fit(self, configs: Sequence[SubnetConfig], values: Sequence[float]) -> RidgePredictor:
        """Fit on `configs` and their objective `values` (at least one); returns self."""
        if not configs or len(configs) != len(values):
            raise ValueError(f"RidgePredictor.fit needs as many values as configs (>= 1), got {len(values)}.")
        x, y = self.features(configs), np.asarray(values, dtype=float)
        self.intercept = float(y.mean())
        x_mean = x.mean(axis=0)
        xc = x - x_mean
        self.weights = np.linalg.solve(xc.T @ xc + self.alpha * np.eye(x.shape[1]), xc.T @ (y - self.intercept))
        self.intercept -= float(x_mean @ self.weights)
        return self

    def predict(self, configs: Sequence[SubnetConfig]) -> np.ndarray:
        if self.weights is None:
            raise ValueError("RidgePredictor.predict was called before fit.")
        return self.features(configs) @ self.weights + self.intercept


def _predicted_front(
    search: SubnetSearch, predictor: RidgePredictor, costs: dict[str, list[float]], seed: int
) -> list[SubnetConfig]:
    """NSGA-II over the predicted quality and the cost objectives: its non-dominated sub-networks, no model run."""
    import optuna
    from optuna.distributions import IntDistribution

    cfg, space = search.config, search.space
    searchable = [d for d in space if len(d.choices) > 1]
    distributions = {d.name: IntDistribution(0, len(d.choices) - 1) for d in searchable}
    fixed = {d.name: d.choices[0] for d in space if len(d.choices) == 1}
    size = max(2, min(50, cfg.predictor_candidates // 10))
    sampler = optuna.samplers.NSGAIISampler(population_size=size, seed=seed)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(directions=search.directions, sampler=sampler)
        for _ in range(math.ceil(cfg.predictor_candidates / size)):
            trials = [study.ask(distributions) for _ in range(size)]
            configs = [fixed | {d.name: d.choices[t.params[d.name]] for d in searchable} for t in trials]
            predicted = predictor.predict(configs)
            for trial, config, quality in zip(trials, configs, predicted, strict=True):
                study.tell(trial, [float(quality), *_costs(search, config, costs)])
    finally:
        optuna.logging.set_verbosity(verbosity)
    front = [fixed | {d.name: d.choices[t.params[d.name]] for d in searchable} for t in study.best_trials]
    return list({search.key(c): c for c in front}.values())


def _costs(search: SubnetSearch, config: SubnetConfig, cache: dict[str, list[float]]) -> list[float]:
    key = search.key(config)
    if key not in cache:
        cache[key] = [float(e(search.supernet, config)) for e in search.evaluators[1:]]
    return cache[key]


def _spread(configs: list[SubnetConfig], count: int, costs: list[list[float]]) -> list[SubnetConfig]:
    """`count` of `configs`, evenly spaced along the first cost (all of them if there are fewer)."""
    if len(configs) <= count:
        return configs
    order = sorted(range(len(configs)), key=lambda i: costs[i][:1])
    picks = sorted({order[round(j * (len(order) - 1) / max(1, count - 1))] for j in range(count)})
    return [configs[i] for i in picks]


def predictor_search(search: SubnetSearch, bar: Any) -> int:
    """The `"predictor"` strategy on `search` (a `SubnetSearch` with its reference sub-networks evaluated)."""
    cfg, space, quality = search.config, search.space, search.objectives[0]
    rng, trials, costs = random.Random(cfg.seed), 0, {}
    held_out: list[tuple[float, float]] = []

    def evaluate(config: SubnetConfig, predicted: float | None) -> None:
        record, fresh = search.evaluate(config, "predictor")
        if fresh:
            bar.update(1)
            bar.set_postfix_str(search._best_text(), refresh=False)
            if predicted is not None and record.valid:
                held_out.append((predicted, record.values[quality]))

    while len(search.records) < cfg.population and search._budget_left() and trials < search._max_trials():
        trials += 1
        evaluate(space.sample(rng), None)  # the first round: random sub-networks to fit on, after the references
    rounds = 0
    while search._budget_left() and trials < search._max_trials():
        valid = [r for r in search.records.values() if r.valid]
        if not valid:
            raise ValueError(f"No sub-network got a finite {quality!r}, so the predictor has nothing to fit.")
        predictor = RidgePredictor(space, cfg.predictor_alpha).fit(
            [r.config for r in valid], [r.values[quality] for r in valid]
        )
        front = [c for c in _predicted_front(search, predictor, costs, cfg.seed + rounds) if search.key(c) not in
                 search.records]  # fmt: skip
        chosen = _spread(front, cfg.population, [_costs(search, c, costs) for c in front])
        while len(chosen) < cfg.population and trials < search._max_trials():  # the predicted front is evaluated
            trials += 1
            config = space.sample(rng)
            if search.key(config) not in search.records and config not in chosen:
                chosen.append(config)
        rounds += 1
        for config, predicted in zip(chosen, predictor.predict(chosen) if chosen else [], strict=True):
            if not search._budget_left():
                break
            trials += 1
            evaluate(config, float(predicted))
    pairs = list(zip(*held_out, strict=True)) if len(held_out) > 1 else None
    rho = spearman(*pairs) if pairs else math.nan
    search.predictor_info = {
        "rounds": rounds,
        "alpha": cfg.predictor_alpha,
        "candidates_per_round": cfg.predictor_candidates,
        "held_out": len(held_out),
        "spearman_held_out": rho if math.isfinite(rho) else None,
    }
    return trials
