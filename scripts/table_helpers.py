"""What every README table of `scripts/readme_tables.py` reads: result JSON by path, and the cell formats."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from build_model_cards import RESULTS

DASH = "–"
AMD = "amd-epyc-avx512"
UNRECORDED = "unrecorded-cpu"


@cache
def load(path: str) -> dict[str, Any]:
    """A result JSON, by its path under `benchmarks/results/`."""
    file = RESULTS / path
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; a README table reads it (see scripts/readme_tables.py).")
    return json.loads(file.read_text())


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def num(value: float | None, spec: str) -> str:
    return DASH if value is None else format(value, spec)


def pct(fraction: float) -> str:
    return f"{fraction * 100:.0f} %"


def _seed_cell(stats: Mapping[str, float] | None, seeds: int) -> str:
    """Mean (± std over more than one seed); a dash where the entry has no such column (e.g. no head choices)."""
    if stats is None:
        return DASH
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}" if seeds > 1 else f"{stats['mean']:.3f}"


def seed_rows(results: Mapping[str, Any], labels: Mapping[str, str], columns: Sequence[str], base: str,
              gains: Sequence[str]) -> list[list[str]]:  # fmt: skip
    """A row per labelled entry of `results` (runs keyed by seed with their `summary`): the mean ± std of `columns`
    over the seeds, then for each column in `gains` the gain in points over entry `base`, with its standard error (a
    dash where either entry lacks the column)."""
    reference = results[base]["summary"] if base in results else {}
    rows = []
    for key, label in labels.items():
        if key not in results:
            continue
        summary, seeds = results[key]["summary"], len(results[key]["runs"])
        cells = [_seed_cell(summary.get(c), seeds) for c in columns]
        for column in gains:
            ours, ref = summary.get(column), reference.get(column)
            if key == base or ours is None or ref is None:
                cells.append(DASH)
                continue
            sem = 100 * (ours["sem"] ** 2 + ref["sem"] ** 2) ** 0.5
            cells.append(f"{100 * (ours['mean'] - ref['mean']):+.1f}" + (f" (SE {sem:.1f})" if sem else ""))
        rows.append([label, str(seeds), *cells])
    return rows
