"""What the demo measures besides accuracy: batch latency, decoding speed, size on disk, sparsity, kept zeros."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..devices import module_device
from ..search.tasks import LabelWordEvaluator


def _median_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `repeats` calls of `run`, after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def latency_ms(model: Any, evaluator: LabelWordEvaluator, repeats: int = 3) -> float:
    """Median time for `model` to score the evaluator's prompts after one untimed run (one batch of 16 in the demo)."""
    return 1000 * _median_seconds(lambda: evaluator.logits(model), repeats)


def interleaved_scoring(models: dict[str, Any], evaluator: LabelWordEvaluator) -> dict[str, dict[str, float]]:
    """Each model's accuracy on the evaluator's prompts and its mean time per batch (`latency_ms`), the models taking
    turns batch by batch (after one untimed batch each): a slow spell of the machine then falls on every model alike,
    so the ratios between them (the speed-ups the goal is judged on) hold from run to run."""
    batches = evaluator.split()
    for model in models.values():
        batches[0].logits(model)
    correct, seconds = dict.fromkeys(models, 0), dict.fromkeys(models, 0.0)
    for batch in batches:
        for name, model in models.items():
            start = time.perf_counter()
            correct[name] += batch.correct(model)
            seconds[name] += time.perf_counter() - start
    rows = len(evaluator.labels)
    return {
        name: {"accuracy": correct[name] / rows, "latency_ms": 1000 * seconds[name] / len(batches)} for name in models
    }


def decode_tokens_per_s(model: Any, tokenizer: Any, new_tokens: int = 32, repeats: int = 3) -> float:
    """Greedy decoding speed for one prompt: median of `repeats` runs after an untimed one."""
    inputs = tokenizer("The best snack I ever bought was", return_tensors="pt").to(module_device(model))
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    return new_tokens / _median_seconds(lambda: model.generate(**inputs, **kwargs), repeats)


def size_mb(folder: Path) -> float:
    """Size on disk of a model folder without its tokenizer files."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "tokenizer" not in f.name) / 2**20


def layer_sparsity(weights: dict[str, dict[str, Any]]) -> float:
    """Zeros among the IR weights inside the transformer layers (the embedding / LM head stay dense)."""
    inside = [w for name, w in weights.items() if ".layers." in name]
    sizes = [torch.Size(w["shape"]).numel() for w in inside]
    return sum(w["sparsity"] * n for w, n in zip(inside, sizes, strict=True)) / max(sum(sizes), 1)


def zeros_kept(base_masks: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    """Fraction of the base model's zeros that are still zero in `model`."""
    from ..compression.sparsity import weight_masks

    after = weight_masks(model)
    kept = sum(int((~after[k] & ~m).sum()) for k, m in base_masks.items())
    return kept / max(sum(int((~m).sum()) for m in base_masks.values()), 1)


COLUMNS = (  # key, header, format
    ("accuracy", "accuracy", ".3f"),
    ("params_m", "params M", ".1f"),
    ("sparsity", "sparsity", ".3f"),
    ("zeros_kept", "zeros kept", ".2%"),
    ("size_mb", "size MB", ".1f"),
    ("latency_ms", "ms/batch", ".0f"),
    ("decode_tok_s", "tok/s", ".1f"),
    ("speedup", "x faster", ".2f"),
)


def print_table(rows: dict[str, dict[str, Any]], seconds: float) -> None:
    """The demo's table; a column shows only when some row has it."""
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows.values())]
    width = max(30, max(len(n) for n in rows) + 2)
    print("\n" + f"{'variant':<{width}}" + "".join(f"{h:>{max(len(h) + 2, 9)}}" for _, h, _ in columns))
    for name, r in rows.items():
        cells = "".join(
            f"{'-' if r.get(k) is None else format(r[k], spec):>{max(len(h) + 2, 9)}}" for k, h, spec in columns
        )
        print(f"{name:<{width}}{cells}")
    print(f"total {seconds:.0f} s")
