"""Search results: every evaluated sub-network, the Pareto front, and their JSON, CSV and plot."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..nas.search_space import SearchSpace, SubnetConfig
from ..utils import atomic_open, atomic_write_json, read_json
from .heuristics import HEURISTICS


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
        """The inverse of `to_dict`; a `ValueError` (or `KeyError`) names what is missing or malformed."""
        for name in ("objectives", "directions", "evaluations"):
            if not isinstance(data[name], list):
                raise ValueError(f"{name!r} must be a list, got {data[name]!r}")
        result = cls(
            space=SearchSpace.from_dict(data["search_space"]),
            objectives=list(data["objectives"]),
            directions=list(data["directions"]),
            evaluations=[Evaluation.from_dict(e) for e in data["evaluations"]],
            strategy=data["strategy"],
            seed=data.get("seed"),
            info=dict(data.get("info") or {}),
        )
        objectives, directions = result.objectives, result.directions
        if not objectives or not all(isinstance(o, str) for o in objectives) or len(set(objectives)) < len(objectives):
            raise ValueError(f"'objectives' must be distinct names, got {objectives!r}")
        if len(directions) != len(objectives) or not set(directions) <= {"minimize", "maximize"}:
            raise ValueError(f"'directions' must be 'minimize'/'maximize' per objective, got {directions!r}")
        names = {d.name for d in result.space}
        for e in result.evaluations:
            if set(e.values) != set(objectives) or set(e.config) != names or not isinstance(e.key, str):
                raise ValueError(f"evaluation {e.index} has other objectives or dimensions than the result")
            for dim in result.space:
                if e.config[dim.name] not in dim.choices:
                    raise ValueError(f"evaluation {e.index}: {dim.name}={e.config[dim.name]!r} is not a choice")
        return result

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON (atomically); NaN values are written as null."""
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SearchResult:
        """Read a result written by `to_json`; a damaged file gives a `ValueError` naming it."""
        fix = "run the search again (hf-elastic search, or search_subnetworks(..., output_dir=...))"
        data = read_json(path, fix)
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            raise ValueError(f"{path} is not a search result written by hf_elastic ({error!r}); {fix}.") from None

    def to_csv(self, path: str | os.PathLike) -> Path:
        """One row per evaluation: index, sources, key, the objectives, pareto, then one column per dimension."""
        path = Path(path)
        front = {e.key for e in self.front}
        dims = [d.name for d in self.space]
        with atomic_open(path, "w", newline="") as f:
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
        with atomic_open(path, "wb") as f:
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
