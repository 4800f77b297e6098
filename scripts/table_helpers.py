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
               gain_of: str) -> list[list[str]]:  # fmt: skip
    """A row per labelled entry of `results` (runs keyed by seed with their `summary`): the mean ± std of `columns`
    over the seeds, then the gain in points of `gain_of` over entry `base`, with its standard error."""
    reference = results[base]["summary"][gain_of] if base in results else None
    rows = []
    for key, label in labels.items():
        if key not in results:
            continue
        summary, seeds = results[key]["summary"], len(results[key]["runs"])
        cells = [_seed_cell(summary.get(c), seeds) for c in columns]
        gain = "–"
        if key != base and reference is not None:
            value = 100 * (summary[gain_of]["mean"] - reference["mean"])
            sem = 100 * (summary[gain_of]["sem"] ** 2 + reference["sem"] ** 2) ** 0.5
            gain = f"{value:+.1f}" + (f" (SE {sem:.1f})" if sem else "")
        rows.append([label, str(seeds), *cells, gain])
    return rows
