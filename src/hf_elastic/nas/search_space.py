"""The search space of a super-network: named dimensions, each with integer choices."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

SubnetConfig = dict[str, int]
"""A sub-network: one chosen value (a rank, a channel count or a head count) per dimension name."""

DimensionKind = Literal["rank", "ffn", "heads"]
DIMENSION_KINDS: tuple[str, ...] = get_args(DimensionKind)


@dataclass(frozen=True)
class Dimension:
    """One searchable choice: the LoRA rank of a module group, the FFN width or the head count of a layer."""

    name: str
    kind: DimensionKind
    choices: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"Dimension {self.name!r} has no choices.")
        object.__setattr__(self, "choices", tuple(sorted(set(self.choices), reverse=True)))

    @property
    def median(self) -> int:
        """The Shears/SQFT heuristic: `choices[(n - 1) // 2]` with choices sorted from largest to smallest."""
        return self.choices[(len(self.choices) - 1) // 2]


class SearchSpace:
    """An ordered collection of `Dimension`s. Sub-network configs are plain `{name: value}` dicts."""

    def __init__(self, dimensions: list[Dimension]) -> None:
        names = [d.name for d in dimensions]
        if len(set(names)) != len(names):
            raise ValueError(f"Duplicate dimension names in {names}.")
        self.dimensions: dict[str, Dimension] = {d.name: d for d in dimensions}

    def __len__(self) -> int:
        return len(self.dimensions)

    def __iter__(self) -> Iterator[Dimension]:
        return iter(self.dimensions.values())

    def __getitem__(self, name: str) -> Dimension:
        return self.dimensions[name]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"SearchSpace({len(self)} dimensions, {self.num_configs} sub-networks)"

    @property
    def num_configs(self) -> int:
        return math.prod(len(d.choices) for d in self)

    def max_config(self) -> SubnetConfig:
        return {d.name: d.choices[0] for d in self}

    def min_config(self) -> SubnetConfig:
        return {d.name: d.choices[-1] for d in self}

    def median_config(self) -> SubnetConfig:
        return {d.name: d.median for d in self}

    def uniform_configs(self) -> list[SubnetConfig]:
        """The uniform-width ladder from the max sub-network to the min one: step `i` puts every dimension at the same
        relative position `i / (n - 1)` among its choices (rounded to the nearest one), `n` being the most choices a
        dimension has. With FFN widths 100/75/62.5/50 %, every layer at 100, then 75, 62.5 and 50 %."""
        steps = max((len(d.choices) for d in self), default=1)
        ladder: list[SubnetConfig] = []
        for i in range(steps):
            position = i / (steps - 1) if steps > 1 else 0.0
            config = {d.name: d.choices[round(position * (len(d.choices) - 1))] for d in self}
            if config not in ladder:
                ladder.append(config)
        return ladder

    def fixed(self, kinds: Iterable[str]) -> SearchSpace:
        """This space with the dimensions of `kinds` (e.g. `["rank"]`) held at their largest choice."""
        kinds = set(kinds)
        return SearchSpace([Dimension(d.name, d.kind, d.choices[:1]) if d.kind in kinds else d for d in self])

    def sample(self, rng: random.Random | int | None = None) -> SubnetConfig:
        """A uniformly random sub-network; pass a seed or a `random.Random` for reproducibility."""
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        return {d.name: rng.choice(d.choices) for d in self}

    def validate(self, config: Mapping[str, int]) -> SubnetConfig:
        """Check that `config` names every dimension once with an allowed value; return it as a plain dict."""
        if not isinstance(config, Mapping):
            raise ValueError(f"A sub-network config must be a dict of dimension name to value, got {config!r}.")
        unknown = sorted(set(config) - set(self.dimensions))
        if unknown:
            raise ValueError(f"Sub-network config names unknown dimensions {unknown}; known: {list(self.dimensions)}.")
        missing = [n for n in self.dimensions if n not in config]
        if missing:
            raise ValueError(
                f"Sub-network config misses dimensions {missing}. Start from space.max_config() and change values."
            )
        for name, value in config.items():
            if value not in self.dimensions[name].choices:
                raise ValueError(
                    f"Sub-network config sets {name}={value!r}, which is not among its choices "
                    f"{list(self.dimensions[name].choices)}."
                )
        return {n: int(config[n]) for n in self.dimensions}

    def encode(self, config: Mapping[str, int]) -> list[int]:
        """Choice indices (0 = largest) of a config, in dimension order."""
        config = self.validate(config)
        return [d.choices.index(config[d.name]) for d in self]

    def decode(self, indices: list[int]) -> SubnetConfig:
        if len(indices) != len(self):
            raise ValueError(f"Expected {len(self)} choice indices, got {len(indices)}.")
        return {d.name: d.choices[i] for d, i in zip(self, indices, strict=True)}

    def to_dict(self) -> dict[str, Any]:
        return {"dimensions": [{"name": d.name, "kind": d.kind, "choices": list(d.choices)} for d in self]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        return cls([Dimension(d["name"], d["kind"], tuple(d["choices"])) for d in data["dimensions"]])
