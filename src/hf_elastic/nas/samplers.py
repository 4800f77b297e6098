"""Samplers of `NASTrainer`: which sub-networks each optimizer step trains (`SAMPLERS`, `register_sampler`)."""

from __future__ import annotations

import random
from collections.abc import Callable

from .search_space import Dimension, SearchSpace, SubnetConfig

Sampler = Callable[..., list[SubnetConfig]]
PROGRESSIVE_KINDS = ("rank", "ffn", "heads")
"""The order in which `sampling="progressive"` opens the dimensions, after a stage of the max sub-network only."""


def _uniform(space: SearchSpace, rng: random.Random, k: int) -> list[SubnetConfig]:
    return [space.sample(rng)]


def _sandwich(space: SearchSpace, rng: random.Random, k: int) -> list[SubnetConfig]:
    return [space.max_config(), space.min_config(), *(space.sample(rng) for _ in range(k))]


def _max(space: SearchSpace, rng: random.Random, k: int) -> list[SubnetConfig]:
    return [space.max_config()]


def progressive_stage(progress: float, stages: list[float]) -> int:
    """The stage of `sampling="progressive"` at `progress` (fraction of the run done): 0 trains the max sub-network
    only, stage i > 0 has opened the first i kinds of `PROGRESSIVE_KINDS`; `stages` are the stage lengths."""
    end, stage = 0.0, 0
    for length in stages[:-1]:
        end += length
        if progress + 1e-9 < end:
            break
        stage += 1
    return stage


def _progressive(
    space: SearchSpace, rng: random.Random, k: int, *, progress: float = 1.0, stages: list[float] | None = None
) -> list[SubnetConfig]:
    stage = progressive_stage(progress, stages or [0.25] * 4)
    if stage == 0:
        return [space.max_config()]
    opened = PROGRESSIVE_KINDS[:stage]
    sub = SearchSpace([d if d.kind in opened else Dimension(d.name, d.kind, d.choices[:1]) for d in space])
    return _sandwich(sub, rng, k) if sub.num_configs > 1 else [space.max_config()]


SAMPLERS: dict[str, Sampler] = {"uniform": _uniform, "sandwich": _sandwich, "max": _max, "progressive": _progressive}


def register_sampler(name: str, sampler: Sampler) -> None:
    """Make `sampler(space, rng, k) -> [configs]` available as `NASTrainingArguments(sampling=name)`.

    The configs returned for one optimizer step are all trained in that step (losses averaged); `rng` is seeded from
    the training seed and the global step, so every process draws the same sub-networks. A sampler that takes the
    keywords `progress` (fraction of `max_steps` done) and `stages` (`progressive_stages`) gets them, as
    `"progressive"` does. With `distillation="inplace"` the first config of a step must be the max sub-network.
    """
    SAMPLERS[name] = sampler
