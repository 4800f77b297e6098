"""Sub-networks chosen without a search: from training losses (`nas_stats.json`) or from activations."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.arch import weight_out_in
from ..nas.activations import Statistic, input_statistics, squared_norms
from ..nas.search_space import SearchSpace, SubnetConfig
from ..nas.supernet import SuperNetwork
from ..tuners.nls.layer import ElasticLoraLinear

HEURISTICS = ("max", "min", "median", "uniform", "loss_based", "activation_based")
"""Sub-networks chosen without a search; 'uniform' is a ladder (`SearchSpace.uniform_configs`), the others one each."""


def _marginal_losses(space: SearchSpace, nas_stats: Mapping[str, Any], source: str) -> dict[str, dict[int, float]]:
    """Count-weighted mean training loss of the sub-networks that used each choice, per dimension."""
    fix = "use the nas_stats.json NASTrainer saved with this super-adapter, or pick a strategy other than loss_based"
    saved = nas_stats.get("search_space")
    if saved is not None:
        try:
            recorded = SearchSpace.from_dict(saved)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{source} has a damaged 'search_space' ({error!r}); {fix}.") from None
        if recorded != space:
            raise ValueError(f"{source} was recorded on a different search space than this super-network's; {fix}.")
    table = nas_stats.get("config_losses")
    if not isinstance(table, Mapping):
        raise ValueError(f"{source} has no 'config_losses' table (got {type(table).__name__}); {fix}.")
    sums: dict[str, dict[int, list[float]]] = {d.name: {} for d in space}
    nonfinite = []
    for key, entry in table.items():
        where = f"{source}: config_losses[{key!r}]"
        if not isinstance(entry, Mapping) or not {"mean_loss", "count"} <= set(entry):
            raise ValueError(f'{where} must be {{"mean_loss": <number>, "count": <int>}}, got {entry!r}; {fix}.')
        loss, count = entry["mean_loss"], entry["count"]
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise ValueError(f"{where}['mean_loss'] = {loss!r} is not a number; {fix}.")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{where}['count'] = {count!r} is not a positive integer; {fix}.")
        parts = str(key).split(".")
        if len(parts) != len(space) or not all(p.isdigit() for p in parts):
            raise ValueError(
                f"{where}: the key must be {len(space)} choice indices joined by '.' (one per dimension: "
                f"{', '.join(d.name for d in space)}); {fix}."
            )
        indices = [int(p) for p in parts]
        for dim, i in zip(space, indices, strict=True):
            if i >= len(dim.choices):
                raise ValueError(
                    f"{where}: index {i} is outside dimension {dim.name!r}, which has {len(dim.choices)} choices "
                    f"(indices 0 to {len(dim.choices) - 1}); {fix}."
                )
        if not math.isfinite(loss):
            nonfinite.append(key)
            continue
        for dim, i in zip(space, indices, strict=True):
            acc = sums[dim.name].setdefault(dim.choices[i], [0.0, 0])
            acc[0] += loss * count
            acc[1] += count
    if nonfinite and len(nonfinite) == len(table):
        raise ValueError(f"{source}: every mean_loss in config_losses is NaN or infinite; {fix}.")
    if nonfinite:
        warnings.warn(
            f"{source}: {len(nonfinite)} of {len(table)} sub-networks have a NaN or infinite mean_loss (first: "
            f"{nonfinite[0]!r}); loss_based leaves them out.",
            stacklevel=3,
        )
    return {name: {c: s / n for c, (s, n) in by_choice.items()} for name, by_choice in sums.items()}


def loss_based_config(
    space: SearchSpace, nas_stats: Mapping[str, Any], tolerance: float = 0.01, *, source: str = "nas_stats"
) -> SubnetConfig:
    """The smallest choice per dimension whose marginal training loss is within `tolerance` of the best one.

    The marginal loss of a choice is the count-weighted mean of the recorded training losses (`config_losses` in
    `nas_stats.json`) of every trained sub-network that used that choice, averaging over the other dimensions. Per
    dimension, among choices with data, the smallest one with `marginal <= best * (1 + tolerance)` is taken, so
    `tolerance=0` picks the lowest-loss choice. A dimension with no recorded loss falls back to its median.
    Uniform sampling during training gives the least biased marginals. A damaged table raises a `ValueError` naming
    `source` (the file) and the entry; NaN losses are left out with a warning.
    """
    if not nas_stats.get("config_losses"):
        raise ValueError(f"{source} has no config_losses: train with NASTrainer and pass its nas_stats.json.")
    marginals = _marginal_losses(space, nas_stats, source)
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

    def adapter_energy(module: nn.Module) -> Statistic:
        def energy(x: torch.Tensor) -> torch.Tensor:
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            z = F.linear(x.to(a.dtype), a).float().reshape(-1, a.shape[0])
            return z.pow(2).sum(0) * b.float().pow(2).sum(0) * float(module.scaling[adapter]) ** 2

        return energy

    statistics: dict[tuple[str, str], tuple[nn.Module, Statistic]] = {}
    members: dict[str, list[str]] = {}
    full = supernet.module_ranks("max")
    for dim in space:
        if dim.kind == "rank" and len(dim.choices) > 1:
            smallest = space.max_config() | {dim.name: dim.choices[-1]}
            members[dim.name] = [k for k, r in supernet.module_ranks(smallest).items() if r != full[k]]
    for key in {k for keys in members.values() for k in keys}:
        module = supernet.lora_modules[key]
        statistics["rank", key] = (module, adapter_energy(module))
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
            statistics["width", path] = (module, lambda x, n=col_norm: squared_norms(x) * n)
    sums = input_statistics(supernet, statistics, batches, "activation_importance")
    rank_energy = {key: e for (kind, key), e in sums.items() if kind == "rank"}
    width_energy = {path: e for (kind, path), e in sums.items() if kind == "width"}

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
