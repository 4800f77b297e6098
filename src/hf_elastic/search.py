"""Sub-network search: score sub-networks of a trained super-network and find the best trade-offs.

After NAS training, `search` evaluates sub-networks with one or more objectives (a quality objective such as the eval
loss, and a cost such as the parameter count, the MACs or the measured latency) and returns a `SearchResult` with
every evaluated sub-network and the Pareto front.

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
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
import random
import statistics
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import PeftModel

from .elastic_lora.arch import weight_out_in
from .nls.layer import ElasticLoraLinear
from .search_space import SearchSpace, SubnetConfig
from .supernet import SuperNetwork, get_supernet, load_super_network
from .trainer import NAS_STATS_NAME, NASTrainer
from .utils import atomic_write_json

Direction = Literal["minimize", "maximize"]
STRATEGIES = ("nsga2", "random", "max", "min", "median", "loss_based", "activation_based")
HEURISTICS = ("max", "min", "median", "loss_based", "activation_based")
COUNT_OBJECTIVES = ("params", "base_params", "adapter_params", "macs")


# ---------------------------------------------------------------------------------------------------- evaluators
class Evaluator(ABC):
    """Scores one sub-network and returns a float.

    `name` is the objective name used in results, `direction` says whether lower (`"minimize"`) or higher
    (`"maximize"`) is better. When `needs_model` is True the search activates the sub-network on the super-network
    before calling the evaluator, so `supernet.model` runs it.
    """

    name: str = "score"
    direction: Direction = "minimize"
    needs_model: bool = True

    @abstractmethod
    def __call__(self, supernet: SuperNetwork | None, config: SubnetConfig) -> float:
        """Score the sub-network `config` (already active on `supernet` when `needs_model` is True)."""


class FunctionEvaluator(Evaluator):
    """Wrap a plain function `fn(config) -> float` as an objective (e.g. a score computed elsewhere)."""

    def __init__(
        self, fn: Callable[[SubnetConfig], float], name: str = "score", direction: Direction = "minimize"
    ) -> None:
        _check_direction(direction)
        self.fn, self.name, self.direction, self.needs_model = fn, name, direction, False

    def __call__(self, supernet: SuperNetwork | None, config: SubnetConfig) -> float:
        return self.fn(config)


class CountEvaluator(Evaluator):
    """Parameter count or per-token MACs of a sub-network, from `SuperNetwork.count` (no forward pass)."""

    direction = "minimize"
    needs_model = False

    def __init__(self, key: str = "params") -> None:
        if key not in COUNT_OBJECTIVES:
            raise ValueError(f"CountEvaluator key={key!r} is unknown; use one of {list(COUNT_OBJECTIVES)}.")
        self.name = key

    def __call__(self, supernet: SuperNetwork | None, config: SubnetConfig) -> float:
        return float(supernet.count(config)[self.name])


class _Batches:
    """Re-iterable model batches from a list/DataLoader of batches, or a (datasets/torch) Dataset plus a collator."""

    def __init__(self, data: Any, data_collator: Callable | None, batch_size: int, max_batches: int | None) -> None:
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches={max_batches} must be >= 1 or None.")
        is_dataset = isinstance(data, torch.utils.data.Dataset) and not isinstance(
            data, torch.utils.data.IterableDataset
        )
        if is_dataset or _is_hf_dataset(data):
            from transformers import default_data_collator

            data = torch.utils.data.DataLoader(
                data, batch_size=batch_size, collate_fn=data_collator or default_data_collator
            )
        elif isinstance(data, Iterator):
            raise ValueError(
                "Evaluation data is a one-shot iterator, but every sub-network needs another pass. "
                "Pass a list of batches, a DataLoader or a datasets.Dataset."
            )
        self.data, self.max_batches = data, max_batches

    def __iter__(self):
        for i, batch in enumerate(self.data):
            if self.max_batches is not None and i >= self.max_batches:
                return
            yield {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _is_hf_dataset(data: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, datasets.Dataset)


def _device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _rows(batch: Mapping[str, torch.Tensor]) -> int:
    first = next(iter(batch.values()))
    return int(first.shape[0]) if first.dim() else 1


class LossEvaluator(Evaluator):
    """Mean eval loss of the active sub-network (lower is better).

    Args:
        data: a list (or DataLoader) of batches, i.e. dicts with `input_ids`, `labels` and optionally
            `attention_mask`; or a `datasets.Dataset`/torch Dataset of rows, batched with `data_collator`.
        data_collator: collates rows of a Dataset (default: `transformers.default_data_collator`).
        batch_size: batch size for a Dataset.
        max_batches: evaluate only the first `max_batches` batches.
        device: where batches go (default: the model's device).

    The loss of each batch is the model's own (mean over its tokens) and batches are averaged weighted by their
    number of rows, as `Trainer.evaluate` does.
    """

    name = "loss"
    direction = "minimize"

    def __init__(
        self,
        data: Any,
        data_collator: Callable | None = None,
        batch_size: int = 8,
        max_batches: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.batches = _Batches(data, data_collator, batch_size, max_batches)
        self.device = device

    def loss(self, model: nn.Module) -> float:
        device = _device_of(model, self.device)
        total, rows = 0.0, 0
        with torch.no_grad():
            for batch in self.batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model(**batch)
                if getattr(out, "loss", None) is None:
                    raise ValueError("The model returned no loss: the evaluation batches need `labels`.")
                n = _rows(batch)
                total += out.loss.float().item() * n
                rows += n
        if rows == 0:
            raise ValueError(f"{type(self).__name__} got no evaluation batches.")
        return total / rows

    def __call__(self, supernet: SuperNetwork | None, config: SubnetConfig) -> float:
        return self.loss(supernet.model)


class PerplexityEvaluator(LossEvaluator):
    """`exp` of `LossEvaluator`'s mean loss (lower is better); same arguments."""

    name = "perplexity"

    def __call__(self, supernet: SuperNetwork | None, config: SubnetConfig) -> float:
        try:
            return math.exp(self.loss(supernet.model))
        except OverflowError:
            return math.inf


class MetricEvaluator(Evaluator):
    """Task metric (accuracy by default) of the active sub-network from a user-supplied predict function.

    Args:
        data: batches or a Dataset, as for `LossEvaluator`.
        predict_fn: `predict_fn(model, batch) -> predictions` (a tensor or list per batch), e.g.
            `lambda model, batch: model(input_ids=batch["input_ids"]).logits.argmax(-1)`.
        metric: an `evaluate` metric object (anything with `.compute(predictions=..., references=...)` returning a
            dict), or a plain callable `metric(predictions, references) -> float | dict`; None computes exact-match
            accuracy. `evaluate.load("accuracy")` needs the Hugging Face Hub for the metric script, so offline build
            the metric object yourself (subclass `evaluate.Metric`) or pass a callable.
        references_key: batch key holding the references.
        metric_key: key of the value to use when the metric returns a dict (default: `name`, or its only value).
        name, direction: objective name and whether higher (`"maximize"`, default) or lower is better.
    """

    def __init__(
        self,
        data: Any,
        predict_fn: Callable[[nn.Module, dict[str, torch.Tensor]], Any],
        metric: Any = None,
        *,
        references_key: str = "labels",
        metric_key: str | None = None,
        name: str = "accuracy",
        direction: Direction = "maximize",
        data_collator: Callable | None = None,
        batch_size: int = 8,
        max_batches: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        _check_direction(direction)
        if metric is not None and not callable(getattr(metric, "compute", None)) and not callable(metric):
            raise ValueError(
                f"MetricEvaluator metric must be an evaluate metric (with .compute) or a callable, got {metric!r}."
            )
        self.batches = _Batches(data, data_collator, batch_size, max_batches)
        self.predict_fn, self.metric, self.references_key = predict_fn, metric, references_key
        self.metric_key, self.name, self.direction, self.device = metric_key, name, direction, device

    def __call__(self, supernet: SuperNetwork | None, config: SubnetConfig) -> float:
        model = supernet.model
        device = _device_of(model, self.device)
        predictions, references = [], []
        with torch.no_grad():
            for batch in self.batches:
                if self.references_key not in batch:
                    raise ValueError(f"Evaluation batch has no {self.references_key!r}; set references_key.")
                batch = {k: v.to(device) for k, v in batch.items()}
                predictions += _as_list(self.predict_fn(model, batch))
                references += _as_list(batch[self.references_key])
        if len(predictions) != len(references):
            raise ValueError(
                f"predict_fn gave {len(predictions)} predictions for {len(references)} references; return one "
                "prediction per row."
            )
        if self.metric is None:
            return sum(p == r for p, r in zip(predictions, references, strict=True)) / max(len(references), 1)
        if callable(getattr(self.metric, "compute", None)):
            value = self.metric.compute(predictions=predictions, references=references)
        else:
            value = self.metric(predictions, references)
        if isinstance(value, Mapping):
            key = self.metric_key or (self.name if self.name in value else None)
            if key is None and len(value) == 1:
                key = next(iter(value))
            if key not in value:
                raise ValueError(f"The metric returned {sorted(value)}; set metric_key to one of them.")
            value = value[key]
        return float(value)


def _as_list(values: Any) -> list:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().reshape(-1).tolist() if values.dim() else [values.item()]
    return list(values)


class LMEvalEvaluator(Evaluator):
    """Score the active sub-network on lm-evaluation-harness tasks (needs `pip install lm-eval`).

    Args:
        tasks: lm-eval task names, e.g. `["arc_easy"]`; the objective is the mean of `metric` over them.
        tokenizer: the model's tokenizer.
        metric: the result key per task, e.g. `"acc,none"` or `"acc_norm,none"`.
        limit: examples per task (None: all).
        batch_size: lm-eval batch size.
        name, direction: objective name and direction (`"maximize"` for accuracies).
        **kwargs: passed on to `lm_eval.simple_evaluate`.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Any,
        metric: str = "acc,none",
        *,
        limit: int | float | None = None,
        batch_size: int = 1,
        name: str = "lm_eval",
        direction: Direction = "maximize",
        **kwargs: Any,
    ) -> None:
        try:
            import lm_eval
            from lm_eval.models.huggingface import HFLM
        except ImportError as e:
            raise ImportError(
                "LMEvalEvaluator needs lm-evaluation-harness, which is not installed. Run `pip install lm-eval`."
            ) from e
        _check_direction(direction)
        if isinstance(tasks, str) or not tasks:
            raise ValueError(f"LMEvalEvaluator tasks must be a non-empty list of task names, got {tasks!r}.")
        self._lm_eval, self._hflm = lm_eval, HFLM
        self.tasks, self.tokenizer, self.metric, self.limit, self.batch_size = (
            list(tasks),
            tokenizer,
            metric,
            limit,
            batch_size,
        )
        self.name, self.direction, self.kwargs = name, direction, kwargs

    def __call__(self, supernet: SuperNetwork | None, config: SubnetConfig) -> float:
        # the transformers model with the elastic adapters injected: a PreTrainedModel, as HFLM expects
        lm = self._hflm(pretrained=supernet.base, tokenizer=self.tokenizer, batch_size=self.batch_size)
        out = self._lm_eval.simple_evaluate(model=lm, tasks=self.tasks, limit=self.limit, **self.kwargs)
        scores = []
        for task in self.tasks:
            result = out["results"].get(task, {})
            if self.metric not in result:
                raise ValueError(f"lm-eval task {task!r} has no {self.metric!r}; it reports {sorted(result)}.")
            scores.append(float(result[self.metric]))
        return statistics.fmean(scores)


class LatencyEvaluator(Evaluator):
    """Measured forward latency of a sub-network in milliseconds (median of `repeats` runs after `warmup` runs).

    Args:
        inputs: model inputs to time (default: random `input_ids` of shape `(batch_size, seq_len)`).
        batch_size, seq_len: shape of the default inputs.
        warmup, repeats: untimed and timed forward passes.
        extract: time the merged, physically sliced model from `SuperNetwork.extract_model` (what you would deploy;
            width cuts only pay off once sliced). False times the active super-network with its adapters.
    """

    name = "latency"
    direction = "minimize"

    def __init__(
        self,
        inputs: Mapping[str, torch.Tensor] | None = None,
        *,
        batch_size: int = 1,
        seq_len: int = 128,
        warmup: int = 2,
        repeats: int = 5,
        extract: bool = True,
    ) -> None:
        if repeats < 1 or warmup < 0:
            raise ValueError(f"LatencyEvaluator needs repeats >= 1 and warmup >= 0, got {repeats=} and {warmup=}.")
        self.inputs, self.batch_size, self.seq_len = inputs, batch_size, seq_len
        self.warmup, self.repeats, self.extract = warmup, repeats, extract
        self.needs_model = not extract

    def _inputs(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.inputs is not None:
            return dict(self.inputs)
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is None:
            raise ValueError("The model config has no vocab_size; pass LatencyEvaluator(inputs=...).")
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, vocab, (self.batch_size, self.seq_len), generator=g)}

    def __call__(self, supernet: SuperNetwork | None, config: SubnetConfig) -> float:
        model = supernet.extract_model(config).eval() if self.extract else supernet.model
        device = _device_of(model, None)
        inputs = {k: v.to(device) for k, v in self._inputs(model).items()}
        times = []
        with torch.no_grad():
            for i in range(self.warmup + self.repeats):
                start = time.perf_counter()
                model(**inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= self.warmup:
                    times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000.0


def _check_direction(direction: str) -> None:
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction={direction!r} is unknown; use 'minimize' or 'maximize'.")


# ---------------------------------------------------------------------------------------------------- heuristics
def _marginal_losses(space: SearchSpace, nas_stats: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """Count-weighted mean training loss of the sub-networks that used each choice, per dimension."""
    saved = nas_stats.get("search_space")
    if saved is not None and SearchSpace.from_dict(saved) != space:
        raise ValueError(
            "nas_stats were recorded on a different search space than this super-network's. Pass the "
            "nas_stats.json saved with this super-adapter."
        )
    sums: dict[str, dict[int, list[float]]] = {d.name: {} for d in space}
    for key, entry in (nas_stats.get("config_losses") or {}).items():
        loss, count = float(entry["mean_loss"]), int(entry["count"])
        if not math.isfinite(loss) or count <= 0:
            continue
        indices = [int(i) for i in key.split(".")]
        if len(indices) != len(space):
            raise ValueError(f"nas_stats key {key!r} has {len(indices)} indices; the space has {len(space)} dims.")
        for dim, i in zip(space, indices, strict=True):
            acc = sums[dim.name].setdefault(dim.choices[i], [0.0, 0])
            acc[0] += loss * count
            acc[1] += count
    return {name: {c: s / n for c, (s, n) in by_choice.items()} for name, by_choice in sums.items()}


def loss_based_config(space: SearchSpace, nas_stats: Mapping[str, Any], tolerance: float = 0.01) -> SubnetConfig:
    """The smallest choice per dimension whose marginal training loss is within `tolerance` of the best one.

    The marginal loss of a choice is the count-weighted mean of the recorded training losses (`config_losses` in
    `nas_stats.json`) of every trained sub-network that used that choice, averaging over the other dimensions. Per
    dimension, among choices with data, the smallest one with `marginal <= best * (1 + tolerance)` is taken, so
    `tolerance=0` picks the lowest-loss choice. A dimension with no recorded loss falls back to its median.
    Uniform sampling during training gives the least biased marginals.
    """
    if not nas_stats.get("config_losses"):
        raise ValueError("nas_stats has no config_losses: train with NASTrainer and pass its nas_stats.json.")
    marginals = _marginal_losses(space, nas_stats)
    config = {}
    for dim in space:
        losses = marginals[dim.name]
        if not losses:
            warnings.warn(f"No training loss recorded for {dim.name!r}; using its median.", stacklevel=2)
            config[dim.name] = dim.median
            continue
        best = min(losses.values())
        limit = best + tolerance * abs(best)
        config[dim.name] = min(c for c, loss in losses.items() if loss <= limit)
    return config


def activation_importance(
    supernet: SuperNetwork, batches: Iterable[Mapping[str, torch.Tensor]]
) -> dict[str, dict[int, float]]:
    """Fraction of each dimension's activation energy that each choice keeps, measured on the max sub-network.

    - Rank dimensions: for an adapter, component `j` of the LoRA update adds `scaling * B[:, j] * (A[j] @ x)`; its
      energy over the calibration tokens is `scaling**2 * ||B[:, j]||**2 * sum_t (A[j] @ x_t)**2`. Ranks are nested,
      so rank `k` keeps components `0..k-1`; energies of all adapters in the dimension's group are summed.
    - FFN and head dimensions: an input channel `c` of the down/output projection adds `W[:, c] * x_c`, energy
      `||W[:, c]||**2 * sum_t x_{t,c}**2`; a width keeps the channels (in `channel_order`) that the sub-network keeps.

    Returns `{dimension: {choice: kept fraction in [0, 1]}}`; a dimension with no energy (e.g. untrained adapters
    with `B = 0`) keeps 1.0 at every choice.
    """
    space, adapter = supernet.space, supernet.adapter_name
    rank_energy: dict[str, torch.Tensor] = {}
    width_energy: dict[str, torch.Tensor] = {}
    hooks = []

    def rank_hook(key: str, module: nn.Module, args: tuple, output: Any) -> None:
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        z = F.linear(args[0].to(a.dtype), a).float().reshape(-1, a.shape[0])
        e = z.pow(2).sum(0) * b.float().pow(2).sum(0) * float(module.scaling[adapter]) ** 2
        rank_energy[key] = rank_energy.get(key, 0) + e

    def width_hook(path: str, col_norm: torch.Tensor, module: nn.Module, args: tuple) -> None:
        x = args[0].float().reshape(-1, col_norm.shape[0])
        width_energy[path] = width_energy.get(path, 0) + x.pow(2).sum(0) * col_norm

    members: dict[str, list[str]] = {}
    full = supernet.module_ranks("max")
    for dim in space:
        if dim.kind == "rank" and len(dim.choices) > 1:
            smallest = space.max_config() | {dim.name: dim.choices[-1]}
            members[dim.name] = [k for k, r in supernet.module_ranks(smallest).items() if r != full[k]]
    for key in {k for keys in members.values() for k in keys}:
        module = supernet.lora_modules[key]
        hooks.append(module.register_forward_hook(lambda m, a, o, key=key: rank_hook(key, m, a, o)))
    width_paths: dict[str, tuple[Any, str]] = {}
    for layer in supernet.width_layers:
        for kind, rel in (("ffn", layer.spec.ffn_out), ("heads", layer.spec.attn_out)):
            name = f"{layer.index}.{kind}"
            if name not in space.dimensions or len(space[name].choices) == 1:
                continue
            path = layer.path(rel)
            module = supernet.base.get_submodule(path)
            weight = weight_out_in(module).detach().float()
            if isinstance(module, ElasticLoraLinear) and adapter in module.lora_A:  # full-rank adapter update too
                a, b = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
                weight = weight + float(module.scaling[adapter]) * (b @ a)
            col_norm = weight.pow(2).sum(0)
            width_paths[name] = (layer, path)
            hooks.append(module.register_forward_pre_hook(lambda m, a, p=path, n=col_norm: width_hook(p, n, m, a)))

    previous, was_training = supernet.active_config, supernet.model.training
    supernet.activate("max")
    supernet.model.eval()
    device = _device_of(supernet.model, None)
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                supernet.model(**{k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
                seen += 1
    finally:
        for handle in hooks:
            handle.remove()
        supernet.activate(previous)
        supernet.model.train(was_training)
    if seen == 0:
        raise ValueError("activation_importance got no calibration batches.")

    fractions: dict[str, dict[int, float]] = {}
    for dim in space:
        if len(dim.choices) == 1:
            fractions[dim.name] = {dim.choices[0]: 1.0}
        elif dim.kind == "rank":
            seen_members = [rank_energy[k] for k in members[dim.name] if k in rank_energy]
            cum = torch.stack(seen_members).sum(0).cumsum(0) if seen_members else None
            total = cum[-1].item() if cum is not None else 0.0
            fractions[dim.name] = {c: cum[c - 1].item() / total if total > 0 else 1.0 for c in dim.choices}
        else:
            layer, path = width_paths[dim.name]
            e = width_energy.get(path)
            total = e.sum().item() if e is not None else 0.0
            kind = dim.kind
            fractions[dim.name] = {}
            for c in dim.choices:
                keep = supernet.kept_units(layer, kind, c)
                if keep is None:
                    kept = total
                else:
                    cols = keep if kind == "ffn" else layer.head_slices(keep)[layer.spec.attn_out][1]
                    kept = e[cols].sum().item()
                fractions[dim.name][c] = kept / total if total > 0 else 1.0
    return fractions


def activation_based_config(fractions: Mapping[str, Mapping[int, float]], threshold: float = 0.9) -> SubnetConfig:
    """The smallest choice per dimension that keeps at least `threshold` of its activation energy."""
    return {
        name: min(c for c, f in by_choice.items() if f >= threshold - 1e-9) for name, by_choice in fractions.items()
    }


# ---------------------------------------------------------------------------------------------------- results
def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (NaN/inf points are never on the front)."""
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    vecs = [tuple(s * v for s, v in zip(signs, p, strict=True)) for p in points]
    valid = sorted((i for i, v in enumerate(vecs) if all(math.isfinite(x) for x in v)), key=lambda i: vecs[i])

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    # A dominating point sorts before the point it dominates, and domination is transitive, so comparing each point
    # with the front found so far is enough.
    front: list[int] = []
    for i in valid:
        if not any(dominates(vecs[j], vecs[i]) for j in front):
            front.append(i)
    return sorted(front)


def hypervolume_2d(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Area dominated by `points` (two objectives, both minimized) and bounded by the `reference` point."""
    inside = sorted(
        (x, y) for x, y in points if math.isfinite(x) and math.isfinite(y) and x < reference[0] and y < reference[1]
    )
    staircase: list[tuple[float, float]] = []
    for x, y in inside:  # left to right, keep the points that lower the best y so far
        if not staircase or y < staircase[-1][1]:
            staircase.append((x, y))
    area = 0.0
    for i, (x, y) in enumerate(staircase):
        right = staircase[i + 1][0] if i + 1 < len(staircase) else reference[0]
        area += (right - x) * (reference[1] - y)
    return area


@dataclass
class Evaluation:
    """One evaluated sub-network: its config, its compact key (choice indices joined by '.'), its objective values
    (NaN when an evaluator failed to give a finite number) and the strategies that proposed it."""

    index: int
    key: str
    config: SubnetConfig
    values: dict[str, float]
    sources: list[str]

    @property
    def valid(self) -> bool:
        return all(math.isfinite(v) for v in self.values.values())

    def to_dict(self) -> dict[str, Any]:
        values = {k: (v if math.isfinite(v) else None) for k, v in self.values.items()}
        return {"index": self.index, "key": self.key, "config": self.config, "values": values, "sources": self.sources}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        values = {k: (math.nan if v is None else float(v)) for k, v in data["values"].items()}
        return cls(int(data["index"]), data["key"], dict(data["config"]), values, list(data["sources"]))


@dataclass
class SearchResult:
    """Every sub-network a search evaluated, with its objectives; `front` is the Pareto front (non-dominated set)."""

    space: SearchSpace
    objectives: list[str]
    directions: list[str]
    evaluations: list[Evaluation]
    strategy: str
    seed: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def _check_objective(self, name: str) -> int:
        if name not in self.objectives:
            raise ValueError(f"Unknown objective {name!r}; this result has {self.objectives}.")
        return self.objectives.index(name)

    @property
    def valid(self) -> list[Evaluation]:
        """Evaluations whose objectives are all finite."""
        return [e for e in self.evaluations if e.valid]

    @property
    def front(self) -> list[Evaluation]:
        """The non-dominated evaluations, sorted by the last objective (usually the cost)."""
        points = [[e.values[o] for o in self.objectives] for e in self.evaluations]
        front = [self.evaluations[i] for i in pareto_front(points, self.directions)]
        return sorted(front, key=lambda e: [e.values[o] for o in reversed(self.objectives)])

    def by_source(self, source: str) -> list[Evaluation]:
        """The evaluations proposed by one strategy or reference sub-network (e.g. `"nsga2"`, `"median"`)."""
        return [e for e in self.evaluations if source in e.sources]

    def best(self, objective: str | None = None) -> Evaluation:
        """The valid evaluation with the best value of `objective` (default: the first objective)."""
        objective = objective or self.objectives[0]
        i = self._check_objective(objective)
        if not self.valid:
            raise ValueError("No evaluated sub-network has finite objective values.")
        sign = 1.0 if self.directions[i] == "minimize" else -1.0
        return min(self.valid, key=lambda e: sign * e.values[objective])

    def reference_value(self, objective: str) -> float:
        """The objective's value at the max sub-network if it was evaluated, else the largest value seen."""
        self._check_objective(objective)
        key = ".".join(["0"] * len(self.space))
        for e in self.evaluations:
            if e.key == key and math.isfinite(e.values[objective]):
                return e.values[objective]
        seen = [e.values[objective] for e in self.valid]
        if not seen:
            raise ValueError("No evaluated sub-network has finite objective values.")
        return max(seen)

    def best_under(self, objective: str, constraint: str, limit: float, *, relative: bool = False) -> Evaluation:
        """The best `objective` among sub-networks with `constraint <= limit`.

        With `relative=True`, `limit` is a fraction of the max sub-network's value (see `reference_value`), e.g.
        `result.best_under("loss", "params", 0.7, relative=True)` is the lowest loss under 70 % of the max params;
        `result.best_under("accuracy", "latency", 20.0)` the best accuracy under 20 ms.
        """
        i = self._check_objective(objective)
        self._check_objective(constraint)
        bound = limit * self.reference_value(constraint) if relative else limit
        ok = [e for e in self.valid if e.values[constraint] <= bound]
        if not ok:
            smallest = min((e.values[constraint] for e in self.valid), default=math.nan)
            what = f"{limit:g} x max = {bound:g}" if relative else f"{bound:g}"
            raise ValueError(
                f"No evaluated sub-network has {constraint} <= {what}; the smallest {constraint} seen is "
                f"{smallest:g}. Raise the limit or search more (a larger budget, or add 'min' to reference_subnets)."
            )
        sign = 1.0 if self.directions[i] == "minimize" else -1.0
        return min(ok, key=lambda e: sign * e.values[objective])

    def hypervolume(self, reference: Sequence[float], evaluations: Sequence[Evaluation] | None = None) -> float:
        """2-D hypervolume of `evaluations` (default: all) w.r.t. `reference`, one value per objective in order.

        Maximized objectives are negated (with their reference value) so that the volume is always "bigger is
        better".
        """
        if len(self.objectives) != 2:
            raise ValueError(f"hypervolume supports two objectives; this result has {self.objectives}.")
        signs = [1.0 if d == "minimize" else -1.0 for d in self.directions]
        evaluations = self.evaluations if evaluations is None else evaluations
        points = [[s * e.values[o] for s, o in zip(signs, self.objectives, strict=True)] for e in evaluations]
        return hypervolume_2d(points, [s * r for s, r in zip(signs, reference, strict=True)])

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        front = {e.key for e in self.front}
        return {
            "format": "hf_elastic.search/1",
            "strategy": self.strategy,
            "seed": self.seed,
            "objectives": self.objectives,
            "directions": self.directions,
            "search_space": self.space.to_dict(),
            "info": self.info,
            "evaluations": [e.to_dict() | {"pareto": e.key in front} for e in self.evaluations],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchResult:
        return cls(
            space=SearchSpace.from_dict(data["search_space"]),
            objectives=list(data["objectives"]),
            directions=list(data["directions"]),
            evaluations=[Evaluation.from_dict(e) for e in data["evaluations"]],
            strategy=data["strategy"],
            seed=data.get("seed"),
            info=dict(data.get("info") or {}),
        )

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON (atomically); NaN values are written as null."""
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SearchResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self, path: str | os.PathLike) -> Path:
        """One row per evaluation: index, sources, key, the objectives, pareto, then one column per dimension."""
        path = Path(path)
        front = {e.key for e in self.front}
        dims = [d.name for d in self.space]
        with _atomic_open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "sources", "key", *self.objectives, "pareto", *dims])
            for e in self.evaluations:
                values = [repr(e.values[o]) if math.isfinite(e.values[o]) else "nan" for o in self.objectives]
                dims_values = [e.config[d] for d in dims]
                writer.writerow([e.index, "+".join(e.sources), e.key, *values, int(e.key in front), *dims_values])
        return path

    def plot(self, path: str | os.PathLike, x: str | None = None, y: str | None = None) -> Path:
        """Save a PNG of all evaluations, the Pareto front and the heuristic sub-networks (`y` against `x`).

        Defaults: `y` is the first objective and `x` the second (e.g. loss against params).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if len(self.objectives) < 2 and (x is None or y is None):
            raise ValueError("plot needs two objectives; this result has one. Pass x= and y= explicitly.")
        y = y or self.objectives[0]
        x = x or next(o for o in self.objectives if o != y)
        self._check_objective(x)
        self._check_objective(y)
        fig = Figure(figsize=(6.4, 4.8))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        searched = [e for e in self.valid if not set(e.sources) & set(HEURISTICS)]
        if searched:
            ax.scatter(
                [e.values[x] for e in searched],
                [e.values[y] for e in searched],
                s=14,
                c="0.6",
                label=f"evaluated ({self.strategy})",
            )
        front = sorted(self.front, key=lambda e: e.values[x])
        ax.step([e.values[x] for e in front], [e.values[y] for e in front], where="post", c="tab:red", lw=1.2)
        ax.scatter([e.values[x] for e in front], [e.values[y] for e in front], s=22, c="tab:red", label="Pareto front")
        markers = {"max": "^", "min": "v", "median": "s", "loss_based": "D", "activation_based": "P"}
        for source, marker in markers.items():
            points = [e for e in self.valid if source in e.sources]
            if points:
                ax.scatter(
                    [e.values[x] for e in points],
                    [e.values[y] for e in points],
                    marker=marker,
                    s=60,
                    edgecolors="k",
                    label=source,
                    zorder=3,
                )
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(f"sub-network search ({self.strategy}, {len(self.evaluations)} evaluated)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        with _atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        return path

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write `search.json`, `search.csv` and (with two or more objectives) `search.png` into `output_dir`."""
        output_dir = Path(output_dir)
        self.to_json(output_dir / "search.json")
        self.to_csv(output_dir / "search.csv")
        if len(self.objectives) >= 2 and self.valid:
            self.plot(output_dir / "search.png")
        return output_dir


@contextlib.contextmanager
def _atomic_open(path: Path, mode: str, **kwargs: Any):
    """Open a temporary file next to `path` and move it into place when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------- search
@dataclass
class SearchConfig:
    """Settings of a sub-network search."""

    strategy: str = field(
        default="nsga2",
        metadata={"help": f"How sub-networks are chosen: one of {list(STRATEGIES)}."},
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
            "help": "Distinct sub-networks that 'nsga2' and 'random' evaluate (evaluator calls; repeated proposals "
            "are served from the cache). The search also stops after 20 x budget proposals or when the space is "
            "exhausted."
        },
    )
    population: int = field(
        default=10,
        metadata={
            "help": "NSGA-II population size (sub-networks per generation); budget / population generations run. "
            "About budget / 10 worked best in benchmarks/bench_search.py."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random and NSGA-II strategies."})
    reference_subnets: tuple[str, ...] = field(
        default=("max", "min", "median"),
        metadata={
            "help": f"Heuristic sub-networks evaluated as well, for comparison and plots; among {list(HEURISTICS)}. "
            "They do not count against the budget."
        },
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
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar with the current best."})

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
        for name in ("budget", "population", "calibration_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SearchConfig.{name}={value!r} must be a positive integer.")
        if self.population < 2:
            raise ValueError(f"SearchConfig.population={self.population} must be >= 2 (NSGA-II needs two parents).")
        if self.strategy == "nsga2" and self.budget < self.population:
            raise ValueError(
                f"SearchConfig.budget={self.budget} is smaller than population={self.population}: NSGA-II would not "
                f"finish its first generation. Raise budget to at least {self.population} or lower population."
            )
        self.reference_subnets = tuple(self.reference_subnets)
        bad = [r for r in self.reference_subnets if r not in HEURISTICS]
        if bad:
            raise ValueError(
                f"SearchConfig.reference_subnets holds {bad}; use names among {list(HEURISTICS)} or an empty tuple."
            )
        if not 0.0 <= self.crossover_prob <= 1.0:
            raise ValueError(f"SearchConfig.crossover_prob={self.crossover_prob} must be in [0, 1].")
        if self.mutation_prob is not None and not 0.0 <= self.mutation_prob <= 1.0:
            raise ValueError(f"SearchConfig.mutation_prob={self.mutation_prob} must be in [0, 1] or None.")
        if not self.loss_tolerance >= 0.0:
            raise ValueError(f"SearchConfig.loss_tolerance={self.loss_tolerance} must be >= 0 (0 = lowest loss).")
        if not 0.0 < self.activation_threshold <= 1.0:
            raise ValueError(f"SearchConfig.activation_threshold={self.activation_threshold} must be in (0, 1].")


SearchTarget = SuperNetwork | PeftModel | NASTrainer | SearchSpace | str | os.PathLike


class SubnetSearch:
    """Runs one search; `search()` is the one-call front end.

    Args:
        target: a `SuperNetwork`, an elastic `PeftModel`, a `NASTrainer` (its eval dataset, collator and training
            statistics are used), a saved super-adapter directory (with `base_model`), or a bare `SearchSpace`
            (then every objective must be an evaluator that needs no model, e.g. `FunctionEvaluator`).
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
        if isinstance(target, NASTrainer):
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
        self.space = target if self.supernet is None else self.supernet.space
        if len(self.space) == 0:
            raise ValueError("The search space has no dimensions: there is nothing to search.")
        if self.space.num_configs == 1:
            raise ValueError(
                "Every dimension of the search space has a single choice, so there is only one sub-network and "
                "nothing to search. Give some dimension two or more choices."
            )
        self.trainer = trainer
        self.nas_stats = self._load_stats(nas_stats, trainer, directory)
        given = (
            [] if evaluators is None else list(evaluators) if isinstance(evaluators, (list, tuple)) else [evaluators]
        )
        given = [e if isinstance(e, Evaluator) else FunctionEvaluator(e) for e in given]
        self.objectives, self.evaluators = self._resolve_objectives(given)
        self.directions = [e.direction for e in self.evaluators]
        self.calibration_data = calibration_data
        if calibration_data is None:
            self.calibration_data = next((e.batches for e in self.evaluators if hasattr(e, "batches")), None)
            if self.calibration_data is None and trainer is not None and trainer.eval_dataset is not None:
                self.calibration_data = trainer.get_eval_dataloader()
        self.records: dict[str, Evaluation] = {}
        self.cache_hits = 0
        self._heuristics: dict[str, SubnetConfig] = {}

    @staticmethod
    def _load_stats(nas_stats: Any, trainer: NASTrainer | None, directory: Path | None) -> dict[str, Any] | None:
        if isinstance(nas_stats, Mapping):
            return dict(nas_stats)
        if nas_stats is not None:
            return json.loads(Path(nas_stats).read_text())
        if trainer is not None:
            return trainer.sampler.stats()
        if directory is not None and (directory / NAS_STATS_NAME).is_file():
            return json.loads((directory / NAS_STATS_NAME).read_text())
        return None

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
        for name, evaluator in zip(self.objectives, self.evaluators, strict=True):
            value = evaluator(self.supernet, config)
            try:
                values[name] = float(value)
            except (TypeError, ValueError) as e:
                raise TypeError(f"Evaluator {name!r} returned {value!r}; it must return a float.") from e
        record = Evaluation(len(self.records), key, config, values, [source])
        self.records[key] = record
        if not record.valid:
            warnings.warn(
                f"Sub-network {key} got non-finite objectives {values}; it is kept out of the front.", stacklevel=2
            )
        return record, True

    def heuristic_config(self, name: str) -> SubnetConfig:
        """The sub-network a heuristic strategy picks (computed once per search)."""
        if name not in self._heuristics:
            self._heuristics[name] = self._heuristic_config(name)
        return dict(self._heuristics[name])

    def _heuristic_config(self, name: str) -> SubnetConfig:
        if name in ("max", "min", "median"):
            return getattr(self.space, f"{name}_config")()
        if name == "loss_based":
            if self.nas_stats is None:
                raise ValueError(
                    "strategy 'loss_based' needs training statistics: pass nas_stats= (nas_stats.json or its dict), "
                    "search a NASTrainer, or a super-adapter directory holding nas_stats.json."
                )
            return loss_based_config(self.space, self.nas_stats, self.config.loss_tolerance)
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
            return activation_based_config(fractions, self.config.activation_threshold)
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
        searched = cfg.strategy in ("nsga2", "random")
        total = cfg.budget if searched else 1
        bar = tqdm(total=total, desc=f"search ({cfg.strategy})", disable=not cfg.progress)
        if model is not None:
            model.eval()
        try:
            for name in cfg.reference_subnets:
                self.evaluate(self.heuristic_config(name), name)
            if cfg.strategy == "nsga2":
                trials = self._nsga2(bar)
            elif cfg.strategy == "random":
                trials = self._random(bar)
            else:
                self.evaluate(self.heuristic_config(cfg.strategy), cfg.strategy)
                trials = 1
                bar.update(1)
        finally:
            bar.close()
            if self.supernet is not None:
                self.supernet.activate(previous)
                model.train(was_training)
        evaluations = list(self.records.values())
        info = {
            "budget": cfg.budget if searched else None,
            "population": cfg.population if cfg.strategy == "nsga2" else None,
            "trials": trials,
            "evaluations": len(evaluations),
            "cache_hits": self.cache_hits,
            "wall_time_s": time.perf_counter() - start,
            "reference_subnets": list(cfg.reference_subnets),
        }
        return SearchResult(self.space, self.objectives, self.directions, evaluations, cfg.strategy, cfg.seed, info)

    def _max_trials(self) -> int:
        return 20 * self.config.budget

    def _random(self, bar: Any) -> int:
        rng, new, trials = random.Random(self.config.seed), 0, 0
        while new < self.config.budget and trials < self._max_trials() and len(self.records) < self.space.num_configs:
            trials += 1
            record, fresh = self.evaluate(self.space.sample(rng), "random")
            if fresh:
                new += 1
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
            new, trials = 0, 0
            while new < cfg.budget and trials < self._max_trials() and len(self.records) < self.space.num_configs:
                trials += 1
                trial = study.ask(distributions)
                config = fixed | {d.name: d.choices[trial.params[d.name]] for d in searchable}
                record, fresh = self.evaluate(config, "nsga2")
                if record.valid:
                    study.tell(trial, [record.values[o] for o in self.objectives])
                else:
                    study.tell(trial, state=TrialState.FAIL)
                if fresh:
                    new += 1
                    bar.update(1)
                    bar.set_postfix_str(self._best_text(), refresh=False)
        finally:
            optuna.logging.set_verbosity(verbosity)
        return trials


def search(
    target: SearchTarget,
    evaluator: Evaluator | Callable | Sequence[Evaluator | Callable] | None = None,
    strategy: str = "nsga2",
    *,
    objectives: Sequence[str] | None = None,
    budget: int = 100,
    population: int = 10,
    seed: int = 0,
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
        strategy: one of `"nsga2"`, `"random"`, `"max"`, `"min"`, `"median"`, `"loss_based"`, `"activation_based"`.
        objectives: objective names, e.g. `("loss", "params")`, `("accuracy", "latency")`; default: the
            evaluator's name and `"params"`.
        budget, population, seed: distinct sub-networks to evaluate, NSGA-II population size, and seed.
        output_dir: if set, write `search.json`, `search.csv` and `search.png` there.
        **kwargs: other `SearchConfig` fields (e.g. `reference_subnets=()`, `progress=False`).

    Example:

    ```py
    >>> result = search(supernet, LossEvaluator(eval_batches), objectives=("loss", "params"), budget=200)
    >>> result.front                                        # non-dominated sub-networks
    >>> result.best_under("loss", "params", 0.7, relative=True).config
    ```
    """
    objectives = tuple(objectives) if objectives is not None else None
    config = SearchConfig(
        strategy=strategy, objectives=objectives, budget=budget, population=population, seed=seed, **kwargs
    )
    runner = SubnetSearch(
        target, evaluator, config, base_model=base_model, nas_stats=nas_stats, calibration_data=calibration_data
    )
    result = runner.run()
    if output_dir is not None:
        result.save(output_dir)
    return result
