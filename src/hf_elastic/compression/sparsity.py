"""Base-model sparsification: Wanda (|W|·‖X‖, Sun et al. 2023) and magnitude pruning, unstructured or N:M.

Every output row of a pruned module gets exactly the target number of zeros (unstructured), or exactly N kept
weights in every group of M consecutive input channels (N:M). Ties are broken by the input channel index (the lower
index is pruned first), so pruning is deterministic. The zeros live in the ordinary weights: `save_pretrained` of the
sparse model writes plain safetensors that stock transformers loads.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..devices import full_tensor
from ..models.arch import weight_out_in
from ..utils import atomic_write_json, rows_by_name, typed_fields
from .calibration import (
    CalibrationData,
    CalibrationSettings,
    SquaredNorm,
    calibration_ids,
    find_target_modules,
    is_linear,
    run_layerwise,
)

SPARSITY_REPORT_NAME = "sparsity_report.json"
_METHODS = ("wanda", "magnitude")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """`"2:4"` gives `(2, 4)` (keep 2 of every 4), `"unstructured"` gives None."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(
            f"SparsityConfig.pattern={pattern!r} is not a sparsity pattern. Use 'unstructured' or 'N:M' "
            "(keep N weights in every M consecutive inputs), e.g. '2:4' or '4:8'."
        )
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(
            f"SparsityConfig.pattern={pattern!r} needs 0 < N < M (N weights kept of every M), got N={n}, M={m}. "
            "Use e.g. '2:4' or '4:8'."
        )
    return n, m


@dataclass
class SparsityConfig(CalibrationSettings):
    """How `sparsify` prunes the linear layers of a model."""

    method: str = field(
        default="wanda",
        metadata={
            "help": "'wanda' scores each weight by |W_ij|·‖X_j‖ (needs calibration data); 'magnitude' by |W_ij|."
        },
    )
    sparsity: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of weights set to zero in every output row, in [0, 1). Defaults to 0.5 for "
            "'unstructured' and to 1 - N/M for an N:M pattern (where it must be left out or equal 1 - N/M)."
        },
    )
    pattern: str = field(
        default="unstructured",
        metadata={
            "help": "'unstructured' (exactly round(sparsity·in_features) zeros per row) or 'N:M': keep the N "
            "highest-scored weights in every group of M consecutive input channels, e.g. '2:4'."
        },
    )
    modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to prune, matched as suffixes of paths inside a transformer layer (e.g. ['q_proj', "
            "'mlp.down_proj']). None prunes every linear/Conv1D layer inside the transformer layers; embeddings "
            "and the LM head are never pruned."
        },
    )

    @typed_fields()
    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"SparsityConfig.method={self.method!r} is not supported. Use one of {list(_METHODS)}.")
        nm = parse_pattern(self.pattern)
        if nm is None:
            if self.sparsity is None:
                self.sparsity = 0.5
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
                raise ValueError(f"SparsityConfig.sparsity must be a number in [0, 1), got {self.sparsity!r}.")
            if not 0 <= self.sparsity < 1:
                raise ValueError(
                    f"SparsityConfig.sparsity={self.sparsity} is outside [0, 1). Pass the fraction of weights to "
                    "remove, e.g. sparsity=0.5."
                )
            self.sparsity = float(self.sparsity)
        else:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"SparsityConfig.sparsity={self.sparsity} contradicts pattern={self.pattern!r}, which removes "
                    f"{implied:g} of the weights. Leave sparsity out with an N:M pattern."
                )
            self.sparsity = implied
            self.pattern = f"{nm[0]}:{nm[1]}"
        self._check_calibration(verb="prune")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


def prune_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean mask (True = prune) of the lowest scores of each row of an (out, in) score matrix.

    Unstructured: exactly `round(sparsity * in)` entries per row. N:M: the `M - N` lowest of every group of M
    consecutive entries. Ties prune the lower column index first.
    """
    rows, cols = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    if nm is None:
        k = round(sparsity * cols)
        if k:
            order = torch.sort(score, dim=1, stable=True).indices
            mask.scatter_(1, order[:, :k], True)
        return mask
    n, m = nm
    if cols % m:
        raise ValueError(f"N:M sparsity needs M={m} to divide in_features={cols}.")
    groups = score.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices
    return mask.reshape(rows, cols // m, m).scatter_(2, order[..., : m - n], True).reshape(rows, cols)


def nm_valid(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of `m` consecutive input channels of each row of `weight` (out, in) has <= n non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight != 0).reshape(rows, cols // m, m).sum(-1) <= n).all())


def _dense_weight(module: nn.Module) -> torch.Tensor:
    from .quantization.format import QuantLinear

    if isinstance(module, QuantLinear):
        return module.dequantize()
    return full_tensor(weight_out_in(module))


def _is_linear_or_quantized(module: nn.Module) -> bool:
    from .quantization.format import QuantLinear

    return is_linear(module) or isinstance(module, QuantLinear)


@dataclass
class ModuleSparsity:
    name: str
    shape: tuple[int, int]
    zeros: int
    min_row_zeros: int
    max_row_zeros: int
    nm_valid: bool | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel


@dataclass
class SparsityReport:
    """Per-module and total sparsity of the linear layers of a model, with the N:M check when a pattern is set."""

    modules: list[ModuleSparsity]
    pattern: str = "unstructured"
    config: SparsityConfig | None = None
    num_calibration_samples: int = 0
    seconds: float = 0.0

    @property
    def zeros(self) -> int:
        return sum(m.zeros for m in self.modules)

    @property
    def numel(self) -> int:
        return sum(m.numel for m in self.modules)

    @property
    def total_sparsity(self) -> float:
        return self.zeros / max(self.numel, 1)

    @property
    def nm_valid(self) -> bool | None:
        checks = [m.nm_valid for m in self.modules if m.nm_valid is not None]
        return all(checks) if checks else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "sparsity": self.total_sparsity,
            "zeros": self.zeros,
            "numel": self.numel,
            "nm_valid": self.nm_valid,
            "config": asdict(self.config) if self.config is not None else None,
            "num_calibration_samples": self.num_calibration_samples,
            "seconds": self.seconds,
            "modules": rows_by_name(self.modules, "sparsity"),
        }

    def save(self, directory: str | Path) -> Path:
        """Write `sparsity_report.json` into `directory` (atomically), e.g. next to `model.save_pretrained`."""
        path = Path(directory) / SPARSITY_REPORT_NAME
        atomic_write_json(path, self.to_dict())
        return path

    def __str__(self) -> str:
        width = max([len(m.name) for m in self.modules] + [6])
        nm = self.pattern != "unstructured"
        lines = [f"{'module':<{width}}  {'shape':>11}  {'sparsity':>8}  {'zeros/row':>11}" + ("  N:M ok" * nm)]
        for m in self.modules:
            row = (
                f"{m.min_row_zeros}" if m.min_row_zeros == m.max_row_zeros else f"{m.min_row_zeros}-{m.max_row_zeros}"
            )
            line = f"{m.name:<{width}}  {m.shape[0]:>5}x{m.shape[1]:<5}  {m.sparsity:>8.2%}  {row:>11}"
            lines.append(line + (f"  {'yes' if m.nm_valid else 'NO':>6}" if nm else ""))
        lines.append(f"{'total':<{width}}  {'':>11}  {self.total_sparsity:>8.2%}  ({self.zeros} of {self.numel} zero)")
        return "\n".join(lines)


def sparsity_of(model: nn.Module, pattern: str = "unstructured", modules: list[str] | None = None) -> SparsityReport:
    """Measure the sparsity of the linear layers inside the transformer layers (QuantLinear included).

    With an N:M `pattern`, each module is also checked for it (`nm_valid`).
    """
    nm = parse_pattern(pattern)
    targets = find_target_modules(model, modules, _is_linear_or_quantized, caller="sparsity_of")
    stats = []
    for target in targets:
        for name, module in target.modules.items():
            weight = _dense_weight(module).detach()
            row_zeros = (weight == 0).sum(1)
            stats.append(
                ModuleSparsity(
                    name,
                    tuple(weight.shape),
                    int(row_zeros.sum()),
                    int(row_zeros.min()),
                    int(row_zeros.max()),
                    nm_valid(weight, *nm) if nm is not None else None,
                )
            )
    return SparsityReport(stats, pattern=pattern if nm is None else f"{nm[0]}:{nm[1]}")


def weight_masks(model: nn.Module, modules: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Boolean (out, in) masks of the non-zero weights of the linear layers inside the transformer layers.

    `QuantLinear` layers count by their dequantized weights (zero exactly where the code equals the zero point).
    """
    targets = find_target_modules(model, modules, _is_linear_or_quantized, caller="weight_masks")
    return {name: _dense_weight(m).detach() != 0 for t in targets for name, m in t.modules.items()}


@torch.no_grad()
def _prune_module(module: nn.Module, score: torch.Tensor, config: SparsityConfig) -> None:
    weight = weight_out_in(module)
    mask = prune_mask(score, config.sparsity, config.nm)
    weight.masked_fill_(mask, 0)


def sparsify(
    model: nn.Module,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    *,
    calibration: CalibrationData = None,
    tokenizer: Any = None,
    seq_len: int | None = None,
    num_samples: int = 128,
    batch_size: int = 8,
    modules: list[str] | None = None,
    show_progress: bool = True,
) -> SparsityReport:
    """Prune the linear layers of a transformer model in place (Wanda or magnitude; unstructured or N:M).

    Args:
        model: a Hugging Face model (any architecture whose layer projections are nn.Linear or Conv1D).
        method, sparsity, pattern, seq_len, num_samples, batch_size, modules: see `SparsityConfig`.
        calibration: calibration data for Wanda (a `datasets.Dataset`, a list of texts with `tokenizer`, or token id
            tensors); each layer is calibrated on the outputs of the already pruned layers before it.
        tokenizer: the model's tokenizer, when `calibration` holds text.

    Returns:
        A `SparsityReport`; `report.save(directory)` writes `sparsity_report.json` next to `model.save_pretrained`.

    Example:

    ```py
    >>> report = sparsify(model, "wanda", sparsity=0.5, calibration=texts, tokenizer=tokenizer, seq_len=512)
    >>> print(report)
    >>> model.save_pretrained("sparse"); report.save("sparse")
    ```
    """
    config = SparsityConfig(
        method=method,
        sparsity=sparsity,
        pattern=pattern,
        seq_len=seq_len,
        num_samples=num_samples,
        batch_size=batch_size,
        modules=modules,
    )
    start = time.perf_counter()
    targets = find_target_modules(model, config.modules, caller="sparsify")
    nm = config.nm
    if nm is not None:
        for target in targets:
            for name, module in target.modules.items():
                cols = weight_out_in(module).shape[1]
                if cols % nm[1]:
                    raise ValueError(
                        f"SparsityConfig.pattern={config.pattern!r}: M={nm[1]} does not divide in_features={cols} "
                        f"of {name}. Use an M that divides every input dimension (e.g. 4 or 8), or leave {name} "
                        "out with modules=[...]."
                    )
    num_samples_used = 0
    if config.method == "magnitude":
        if calibration is not None:
            warnings.warn("method='magnitude' does not use calibration data; ignoring it.", stacklevel=2)
        for target in targets:
            for module in target.modules.values():
                _prune_module(module, weight_out_in(module).detach().abs().float(), config)
    else:
        if calibration is None:
            raise ValueError(
                "method='wanda' needs calibration data: pass calibration=<a datasets.Dataset or a list of texts> "
                "(with tokenizer=<the model's tokenizer>), or use method='magnitude'."
            )
        ids = calibration_ids(model, calibration, tokenizer, config.seq_len, config.num_samples)
        num_samples_used = ids.shape[0]

        def make_statistic(path: str, module: nn.Module) -> SquaredNorm:
            weight = weight_out_in(module)
            return SquaredNorm(weight.shape[1], weight.device)

        def transform(path: str, module: nn.Module, stat: SquaredNorm) -> None:
            score = weight_out_in(module).detach().abs().float() * stat.norm[None, :]
            _prune_module(module, score, config)

        run_layerwise(
            model, ids, targets, make_statistic, transform, config.batch_size, "wanda", show_progress=show_progress
        )
    report = sparsity_of(model, config.pattern, config.modules)
    report.config = config
    report.num_calibration_samples = num_samples_used
    report.seconds = time.perf_counter() - start
    return report
