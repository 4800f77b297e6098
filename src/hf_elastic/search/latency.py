"""A latency model for the target: per-layer latencies of every width choice, measured once, predict a sub-network.

`LatencyTable.measure` slices the super-network to each FFN width and head count (all layers at once), times the
forward pass of each sliced model with hooks around every layer's FFN and attention block, and keeps the median per
layer and choice, plus a constant for the rest of the model (embeddings, norms, LM head). `predict(config)` is the
constant plus the chosen widths' times, summed over the layers: no forward pass, so a search can score thousands of
sub-networks (`PredictedLatencyEvaluator`) and re-measure only its front (`remeasure`). `validate` checks the model
against measured latencies (Spearman rank correlation and mean relative error). LoRA ranks do not enter: a deployed
sub-network is merged, so its rank does not change its speed.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..devices import synchronize
from ..models.arch import find_width_layers
from ..nas.search_space import SubnetConfig
from ..nas.supernet import NamedConfig, SuperNetwork
from ..utils import atomic_write_json, read_json
from .evaluators import Evaluator, LatencyEvaluator
from .result import SearchResult

LATENCY_FORMAT = "hf_elastic.LatencyTable"
LATENCY_VERSION = 1


def _block_modules(layer: Any, kind: str) -> list[nn.Module]:
    """The modules whose forward time is a layer's FFN (`"ffn"`) or attention (`"heads"`) time."""
    spec, get = layer.spec, layer.module.get_submodule
    if kind == "heads":
        return [get(spec.attn_module)]
    parents = {rel.rpartition(".")[0] for rel in (*spec.ffn_in, spec.ffn_out)}
    if len(parents) == 1 and next(iter(parents)):
        return [get(next(iter(parents)))]  # e.g. `mlp`: the projections and the activation
    return [get(rel) for rel in (*spec.ffn_in, spec.ffn_out)]  # BERT: intermediate and output are apart


class _BlockTimer:
    """Forward hooks that add up the wall time of each (layer, kind) block during one forward pass."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device, self.times, self._start, self._handles = device, {}, {}, []
        _, layers = find_width_layers(model)
        for layer in layers:
            for kind in ("ffn", "heads"):
                for module in _block_modules(layer, kind):
                    key = f"{layer.index}.{kind}"
                    self._handles.append(module.register_forward_pre_hook(self._pre(key, id(module))))
                    self._handles.append(module.register_forward_hook(self._post(key, id(module))))

    def _pre(self, key: str, ident: int):
        def hook(module, args):
            synchronize(self.device)
            self._start[ident] = time.perf_counter()

        return hook

    def _post(self, key: str, ident: int):
        def hook(module, args, output):
            synchronize(self.device)
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - self._start.pop(ident)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class LatencyTable:
    """Measured latency of every width choice of every layer, in milliseconds, and a constant for the rest.

    `layers` maps a width dimension (e.g. `"0.ffn"`, `"3.heads"`) to `{str(choice): ms}`; `constant_ms` is the time
    of everything else in a forward pass of `batch_size` x `seq_len` tokens. Build it with `LatencyTable.measure`.
    """

    constant_ms: float
    layers: dict[str, dict[str, float]]
    batch_size: int
    seq_len: int
    backend: str = "pytorch"
    device: str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def measure(
        cls,
        supernet: SuperNetwork,
        batch_size: int = 1,
        seq_len: int = 128,
        repeats: int = 10,
        warmup: int = 2,
    ) -> LatencyTable:
        """Time every FFN width and head count of `supernet` (PyTorch, on the model's device).

        For each choice index one model is extracted with every layer at that choice; the models are timed in
        interleaved rounds (`warmup` untimed, then `repeats` timed), and each layer's block time is the median.
        Where timing noise makes a narrower choice slower than a wider one, it gets the wider one's time (the raw
        medians stay in `info["raw_layers"]`), so predictions never grow as widths shrink.
        """
        if repeats < 1 or warmup < 0:
            raise ValueError(f"LatencyTable.measure needs repeats >= 1 and warmup >= 0, got {repeats=} and {warmup=}.")
        dims = [d for d in supernet.space if d.kind in ("ffn", "heads")]
        if not dims:
            raise ValueError(
                "LatencyTable.measure needs width dimensions: build the super-network with ElasticLoraConfig and "
                "ffn_width_choices or head_choices (LoRA ranks do not change a merged sub-network's latency)."
            )
        base = supernet.space.max_config()
        configs = {"max": base}
        for kind in ("ffn", "heads"):
            kind_dims = [d for d in dims if d.kind == kind]
            for i in range(1, max((len(d.choices) for d in kind_dims), default=0)):
                configs[f"{kind}{i}"] = base | {d.name: d.choices[min(i, len(d.choices) - 1)] for d in kind_dims}
        models = {name: supernet.extract_model(config).eval() for name, config in configs.items()}
        first = next(iter(models.values()))
        device = next(first.parameters()).device
        vocab = getattr(first.config, "vocab_size", None)
        if vocab is None:
            raise ValueError("The model config has no vocab_size, so LatencyTable.measure cannot build input_ids.")
        g = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device)}
        timers = {name: _BlockTimer(model, device) for name, model in models.items()}
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in models}
        with torch.no_grad():
            for round_ in range(warmup + repeats):
                for name, model in models.items():
                    timer = timers[name]
                    timer.times = {}
                    synchronize(device)
                    start = time.perf_counter()
                    model(**inputs)
                    synchronize(device)
                    total = time.perf_counter() - start
                    if round_ >= warmup:
                        samples[name].append(timer.times | {"": total - sum(timer.times.values())})
        for timer in timers.values():
            timer.remove()

        def median_ms(name: str, key: str) -> float:
            return statistics.median(s[key] for s in samples[name]) * 1000.0

        layers: dict[str, dict[str, float]] = {}
        for name, config in configs.items():
            for d in dims:
                if name == "max" or d.kind == name.rstrip("0123456789"):
                    layers.setdefault(d.name, {})[str(config[d.name])] = median_ms(name, d.name)
        raw = copy.deepcopy(layers)
        for times in layers.values():  # timing noise must not make a narrower choice predict slower
            fastest = math.inf
            for choice in sorted(times, key=int, reverse=True):
                fastest = times[choice] = min(times[choice], fastest)
        constant = statistics.median(median_ms(name, "") for name in models)
        info = {
            "raw_layers": raw,
            "repeats": repeats,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "measured_ms": {name: median_ms(name, "") + sum(median_ms(name, d.name) for d in dims) for name in models},
        }
        return cls(constant, layers, batch_size, seq_len, "pytorch", str(device), info)

    def predict(self, config: Mapping[str, int]) -> float:
        """Predicted latency in ms of the sub-network `config`: the constant plus its widths' per-layer times."""
        total = self.constant_ms
        for name, times in self.layers.items():
            value = config.get(name, max(int(c) for c in times))
            if str(value) not in times:
                raise ValueError(
                    f"The latency table has no time for {name}={value} (it has {sorted(times, key=int)}); it was "
                    "measured on another search space. Measure it again with LatencyTable.measure(supernet)."
                )
            total += times[str(value)]
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LATENCY_FORMAT,
            "version": LATENCY_VERSION,
            "backend": self.backend,
            "device": self.device,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "constant_ms": self.constant_ms,
            "layers": self.layers,
            "info": self.info,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON (atomically: a crash never leaves half a file)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table written by `save`."""
        data = read_json(path, "measure it again with LatencyTable.measure(supernet) and save it")
        if data.get("format") != LATENCY_FORMAT or data.get("version") != LATENCY_VERSION:
            raise ValueError(
                f"{path} is not a latency table of version {LATENCY_VERSION} (format {data.get('format')!r}, version "
                f"{data.get('version')!r}); measure it again with LatencyTable.measure(supernet) and save it."
            )
        layers = data.get("layers")
        if not isinstance(layers, dict) or not all(
            isinstance(t, dict) and all(isinstance(v, (int, float)) for v in t.values()) for t in layers.values()
        ):
            raise ValueError(f"{path} has a damaged 'layers' table; measure it again with LatencyTable.measure.")
        return cls(
            float(data["constant_ms"]),
            {k: {c: float(v) for c, v in t.items()} for k, t in layers.items()},
            int(data["batch_size"]),
            int(data["seq_len"]),
            data.get("backend", "pytorch"),
            data.get("device", "cpu"),
            dict(data.get("info") or {}),
        )

    def validate(
        self,
        supernet: SuperNetwork,
        configs: Sequence[Mapping[str, int] | NamedConfig] | int = 8,
        *,
        evaluator: LatencyEvaluator | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Compare predictions with measured latencies on `configs` (or that many random sub-networks).

        Returns `spearman` (rank correlation of predicted and measured), `mean_relative_error` (mean of
        |predicted - measured| / measured), and the `predicted` and `measured` lists in ms. Measurement uses
        `evaluator` (default: `LatencyEvaluator` with the table's batch size and sequence length).
        """
        if isinstance(configs, int):
            import random

            rng = random.Random(seed)
            configs = [supernet.space.sample(rng) for _ in range(configs)]
        configs = [supernet.resolve(c) for c in configs]
        if len(configs) < 2:
            raise ValueError(f"LatencyTable.validate needs at least 2 sub-networks to rank, got {len(configs)}.")
        evaluator = evaluator or LatencyEvaluator(batch_size=self.batch_size, seq_len=self.seq_len, repeats=5)
        predicted = [self.predict(c) for c in configs]
        measured = [evaluator(supernet, c) for c in configs]
        errors = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]
        return {
            "spearman": spearman(predicted, measured),
            "mean_relative_error": statistics.fmean(errors),
            "predicted": predicted,
            "measured": measured,
        }


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0  # ties share their mean rank
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (ties get mean ranks); NaN if one is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of the same length >= 2, got {len(x)} and {len(y)}.")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm else math.nan


class PredictedLatencyEvaluator(Evaluator):
    """Latency in ms predicted by a `LatencyTable` (objective `"latency"`), with no forward pass."""

    name = "latency"
    direction = "minimize"
    needs_model = False

    def __init__(self, table: LatencyTable | str | os.PathLike, name: str = "latency") -> None:
        self.table = table if isinstance(table, LatencyTable) else LatencyTable.load(table)
        self.name = name

    def __call__(self, supernet: SuperNetwork | None, config: SubnetConfig) -> float:
        return self.table.predict(config)


def remeasure(
    result: SearchResult,
    supernet: SuperNetwork,
    evaluator: Evaluator | None = None,
    objective: str = "latency",
    front_only: bool = True,
    interleaved: bool = False,
) -> SearchResult:
    """Measure `objective` again for the front (or every evaluation) of `result` with a real evaluator.

    Returns a new `SearchResult` of those evaluations with the measured values (default evaluator:
    `LatencyEvaluator()`); `info["predicted"]` keeps the values the search used, by key. With `interleaved` the
    `LatencyEvaluator` times them in turns (`LatencyEvaluator.interleaved`: steadier ranks, but every sliced copy is
    held at once); otherwise one after the other.
    """
    result._check_objective(objective)
    evaluator = evaluator or LatencyEvaluator()
    if interleaved and not isinstance(evaluator, LatencyEvaluator):
        raise ValueError(
            f"remeasure(interleaved=True) times in turns with a LatencyEvaluator only, not "
            f"{type(evaluator).__name__}; pass interleaved=False to measure one after the other."
        )
    chosen = result.front if front_only else result.valid
    predicted = {e.key: e.values[objective] for e in chosen}
    if interleaved:
        measured = evaluator.interleaved(supernet, {e.key: e.config for e in chosen})
    else:
        measured, active = {}, supernet.active_config
        try:
            for e in chosen:
                if evaluator.needs_model:
                    supernet.activate(e.config)
                measured[e.key] = float(evaluator(supernet, e.config))
        finally:
            supernet.activate(active)
    evaluations = []
    for e in chosen:
        new = copy.deepcopy(e)
        new.values[objective] = measured[e.key]
        evaluations.append(new)
    info = dict(result.info) | {"predicted": predicted, "remeasured": objective}
    return SearchResult(
        result.space, list(result.objectives), list(result.directions), evaluations, result.strategy, result.seed, info
    )
