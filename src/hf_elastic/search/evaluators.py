"""Objectives of a sub-network search: quality (loss, perplexity, task metrics, lm-eval) and cost (size, latency)."""

from __future__ import annotations

import math
import os
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from ..devices import synchronize
from ..nas.search_space import SubnetConfig
from ..nas.supernet import SuperNetwork

Direction = Literal["minimize", "maximize"]
COUNT_OBJECTIVES = ("params", "base_params", "adapter_params", "macs", "nonzero_params", "bytes")


class Evaluator(ABC):
    """Scores one sub-network and returns a float.

    `name` is the objective name used in results, `direction` says whether lower (`"minimize"`) or higher
    (`"maximize"`) is better. When `needs_model` is True the search activates the sub-network on the super-network
    before calling the evaluator, so `supernet.model` runs it. When `scores_merged` is True the evaluator only scores
    the function `supernet.model` computes, so the search may run it on a cheaper copy of the same sub-network: merged
    into the base where that is exact (quantization-aware adapters: new integer codes in place of the adapter's
    per-call grid maths), or extracted and physically sliced (`SearchConfig.score_extracted`; `supernet.model` is
    then the extracted model).
    """

    name: str = "score"
    direction: Direction = "minimize"
    needs_model: bool = True
    scores_merged: bool = False

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
    """A size of a sub-network from `SuperNetwork.count` (no forward pass).

    `key` is one of `COUNT_OBJECTIVES`: `params`, `base_params`, `adapter_params`, `macs` (per token), or the costs
    that see compression, `nonzero_params` (zeros of a sparse base left out) and `bytes` (at the stored precision: INT4
    codes count half a byte); see `hf_elastic.nas.costs`.
    """

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
    scores_merged = True

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
        self.scores_merged = True
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
    """Score the active sub-network on lm-evaluation-harness tasks (needs `pip install 'hf-elastic[lm-eval]'`).

    Args:
        tasks: lm-eval task names, e.g. `["arc_easy"]`; the objective is the mean of `metric` over them.
        tokenizer: the model's tokenizer.
        metric: the result key per task, e.g. `"acc,none"` or `"acc_norm,none"`.
        limit: examples per task (None: all).
        batch_size: lm-eval batch size.
        include_path: a folder (or list of folders) of your own lm-eval task YAML files, so `tasks` may name them.
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
        include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        name: str = "lm_eval",
        direction: Direction = "maximize",
        **kwargs: Any,
    ) -> None:
        try:
            import lm_eval
            from lm_eval.models.huggingface import HFLM
        except ImportError as e:
            raise ImportError(
                "LMEvalEvaluator needs lm-evaluation-harness, which is not installed. Run `pip install "
                "'hf-elastic[lm-eval]'` (or pip install lm-eval)."
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
        if include_path is not None:
            paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
            missing = [str(p) for p in paths if not Path(p).is_dir()]
            if missing:
                raise FileNotFoundError(f"LMEvalEvaluator include_path {missing} is not a folder of task YAML files.")
            from lm_eval.tasks import TaskManager

            kwargs["task_manager"] = TaskManager(include_path=[str(p) for p in paths])
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
        return self.interleaved(supernet, {"": config})[""]

    def interleaved(self, supernet: SuperNetwork, configs: Mapping[str, SubnetConfig]) -> dict[str, float]:
        """The latency of each of `configs` (by key), timed in turns: each round runs every sub-network once, so a
        slow spell of the machine falls on all of them alike rather than on whichever was timed then. With `extract`
        every sub-network's sliced copy is held at once (`extract_model(share_weights=True)`: the merged and sliced
        layers); otherwise the super-network switches between them."""
        if self.extract:
            models = {k: supernet.extract_model(c, share_weights=True).eval() for k, c in configs.items()}
        else:
            models, active = dict.fromkeys(configs, supernet.model), supernet.active_config
        first = next(iter(models.values()), supernet.model)
        device = _device_of(first, None)
        inputs = {k: v.to(device) for k, v in self._inputs(first).items()}
        times: dict[str, list[float]] = {k: [] for k in configs}
        try:
            with torch.no_grad():
                synchronize(device)  # the extraction's copies and merges may still be queued
                for i in range(self.warmup + self.repeats):
                    for key, config in configs.items():
                        if not self.extract:
                            supernet.activate(config)
                        start = time.perf_counter()
                        models[key](**inputs)
                        synchronize(device)
                        if i >= self.warmup:
                            times[key].append(time.perf_counter() - start)
        finally:
            if not self.extract:
                supernet.activate(active)
        return {key: statistics.median(t) * 1000.0 for key, t in times.items()}


def _check_direction(direction: str) -> None:
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction={direction!r} is unknown; use 'minimize' or 'maximize'.")
