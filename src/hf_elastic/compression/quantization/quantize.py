"""`quantize`: replace the linear layers of a model by `QuantLinear` (RTN or GPTQ), with its config and report."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ...models.arch import weight_out_in
from ...utils import atomic_write_json, config_from_kwargs, rows_by_name, typed_fields
from ..calibration import (
    CalibrationData,
    CalibrationSettings,
    Hessian,
    calibration_ids,
    find_target_modules,
    run_layerwise,
)
from .format import (
    _BITS,
    QUANT_REPORT_NAME,
    QuantLinear,
    _check_bits,
    default_group_size,
    group_size_note,
    resolve_group_size,
)
from .gptq import gptq_quantize, output_error

logger = logging.getLogger(__name__)
_METHODS = ("rtn", "gptq")


@dataclass
class QuantizationConfig(CalibrationSettings):
    """How `quantize` turns the linear layers of a model into `QuantLinear`."""

    bits: int = field(default=4, metadata={"help": "Bits per weight code: 4 or 8.", "choices": _BITS})
    group_size: int | None = field(
        default=None,
        metadata={
            "help": "Consecutive input channels sharing one scale and zero point; must divide the in_features of "
            "every quantized module. -1 uses one group per output row. None (the default) takes the largest of "
            "128/64/32 that divides every quantized module's in_features, e.g. 64 for SmolLM2's hidden size 576."
        },
    )
    symmetric: bool = field(
        default=False,
        metadata={"help": "Symmetric codes around the zero point 2**(bits-1); False fits [min, max] of each group."},
    )
    method: str = field(
        default="rtn",
        metadata={
            "help": "'rtn' (round to nearest) or 'gptq' (Frantar et al., 2022; needs calibration data).",
            "choices": _METHODS,
        },
    )
    damp_percent: float = field(
        default=0.01, metadata={"help": "GPTQ damping added to the Hessian diagonal, as a fraction of its mean."}
    )
    act_order: bool = field(
        default=False,
        metadata={
            "help": "GPTQ: quantize columns in order of decreasing Hessian diagonal; groups keep their scales from "
            "the original weight (static groups)."
        },
    )
    block_size: int = field(default=128, metadata={"help": "GPTQ: columns per lazy-update block."})
    modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to quantize, matched as suffixes of paths inside a transformer layer. None quantizes "
            "every linear/Conv1D layer inside the transformer layers; embeddings and the LM head stay as they are."
        },
    )
    keep_residual: bool = field(
        default=False,
        metadata={
            "help": "Keep each weight's rounding residual (int8, one byte per weight) for QA-SparsePEFT training: "
            "the adapter then trains as through Q(W + delta) on the float weights, so deltas below half a grid step "
            "still move the codes of weights near a rounding boundary. Inference ignores it; merging drops it."
        },
    )

    @typed_fields()
    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or not (self.group_size == -1 or self.group_size > 0)
        ):
            raise ValueError(
                f"QuantizationConfig.group_size={self.group_size!r} is invalid. Use a positive divisor of the input "
                "dimension (e.g. 128), -1 for one group per output row, or None for the default."
            )
        for name in ("symmetric", "act_order", "keep_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantizationConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.method not in _METHODS:
            raise ValueError(
                f"QuantizationConfig.method={self.method!r} is not supported. Use one of {list(_METHODS)}."
            )
        if (
            isinstance(self.damp_percent, bool)
            or not isinstance(self.damp_percent, (int, float))
            or not (0 < self.damp_percent <= 1)
        ):
            raise ValueError(
                f"QuantizationConfig.damp_percent={self.damp_percent!r} is outside (0, 1]. Use e.g. 0.01; raise it "
                "if the Hessian is not positive definite."
            )
        self._check_calibration(("block_size",), verb="quantize")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModuleQuantization:
    name: str
    shape: tuple[int, int]
    bits: int
    group_size: int
    weight_error: float
    output_error: float | None = None


@dataclass
class QuantizationReport:
    """What `quantize` did: settings and, per module, the relative weight error ‖W - Ŵ‖/‖W‖ and (with calibration
    data) the relative output error ‖X(W - Ŵ)ᵀ‖/‖XWᵀ‖ on the calibration inputs of the module."""

    config: QuantizationConfig
    modules: list[ModuleQuantization]
    num_calibration_samples: int = 0
    seconds: float = 0.0

    @property
    def mean_weight_error(self) -> float:
        return sum(m.weight_error for m in self.modules) / max(len(self.modules), 1)

    @property
    def mean_output_error(self) -> float | None:
        errors = [m.output_error for m in self.modules if m.output_error is not None]
        return sum(errors) / len(errors) if errors else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "num_calibration_samples": self.num_calibration_samples,
            "seconds": self.seconds,
            "mean_weight_error": self.mean_weight_error,
            "mean_output_error": self.mean_output_error,
            "modules": rows_by_name(self.modules),
        }

    def save(self, directory: str | Path) -> Path:
        """Write `quantization_report.json` into `directory` (atomically)."""
        path = Path(directory) / QUANT_REPORT_NAME
        atomic_write_json(path, self.to_dict())
        return path

    def __str__(self) -> str:
        width = max([len(m.name) for m in self.modules] + [6])
        c = self.config
        lines = [
            f"{c.method.upper()} INT{c.bits}, group_size={c.group_size}, symmetric={c.symmetric}",
            f"{'module':<{width}}  {'shape':>11}  {'group':>5}  {'W error':>8}  {'out error':>9}",
        ]
        for m in self.modules:
            out = f"{m.output_error:>9.4f}" if m.output_error is not None else f"{'-':>9}"
            lines.append(
                f"{m.name:<{width}}  {m.shape[0]:>5}x{m.shape[1]:<5}  {m.group_size:>5}  {m.weight_error:>8.4f}  {out}"
            )
        mean_out = self.mean_output_error
        lines.append(
            f"{'mean':<{width}}  {'':>11}  {'':>5}  {self.mean_weight_error:>8.4f}  "
            + (f"{mean_out:>9.4f}" if mean_out is not None else f"{'-':>9}")
        )
        return "\n".join(lines)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    norm = weight.float().norm()
    return float((weight.float() - approx).norm() / norm) if norm > 0 else 0.0


def quantize(
    model: nn.Module,
    config: QuantizationConfig | None = None,
    *,
    calibration: CalibrationData = None,
    tokenizer: Any = None,
    show_progress: bool = True,
    **kwargs: Any,
) -> QuantizationReport:
    """Replace the linear layers inside the transformer layers by `QuantLinear`, in place (RTN or GPTQ).

    Args:
        model: a Hugging Face model (any architecture whose layer projections are nn.Linear or Conv1D).
        config: a `QuantizationConfig`; it is not modified (the report holds the resolved copy).
        calibration: calibration data (a `datasets.Dataset`, a list of texts with `tokenizer`, or token id tensors).
            Required for GPTQ, which quantizes layer by layer on the outputs of the already quantized layers. With
            RTN it is optional and only adds the output errors to the report.
        tokenizer: the model's tokenizer, when `calibration` holds text.
        **kwargs: instead of `config`, its fields (`bits=4, group_size=128, method="gptq"`, ...).

    Returns:
        A `QuantizationReport`. Save the model with `save_quantized` and load it back with `load_quantized`.

    Example:

    ```py
    >>> config = QuantizationConfig(bits=4, group_size=128, method="gptq")
    >>> report = quantize(model, config, calibration=texts, tokenizer=tokenizer)
    >>> save_quantized(model, "model-int4")
    ```
    """
    config = config_from_kwargs(QuantizationConfig, config, kwargs, "quantize")
    start = time.perf_counter()
    targets = find_target_modules(model, config.modules, caller="quantize")
    if config.group_size is None:
        in_features = [weight_out_in(m).shape[1] for t in targets for m in t.modules.values()]
        config.group_size = default_group_size(in_features)
        logger.info("quantize: %s.", group_size_note(config.group_size))
    group_sizes = {
        name: resolve_group_size(config.group_size, weight_out_in(module).shape[1], name)
        for target in targets
        for name, module in target.modules.items()
    }
    if config.method == "gptq" and calibration is None:
        raise ValueError(
            "method='gptq' needs calibration data: pass calibration=<a datasets.Dataset or a list of texts> (with "
            "tokenizer=<the model's tokenizer>), or use method='rtn'."
        )
    results: list[ModuleQuantization] = []

    def convert(path: str, module: nn.Module, stat: Hessian | None) -> None:
        weight = weight_out_in(module).detach()
        gs = group_sizes[path]
        if config.method == "gptq":
            codes, scales, zeros, residual = gptq_quantize(
                weight, stat.hessian, config.bits, gs, config.symmetric,
                damp_percent=config.damp_percent, act_order=config.act_order, block_size=config.block_size,
            )  # fmt: skip
            new = QuantLinear.from_linear(
                module, config.bits, gs, config.symmetric, qweight=codes, scales=scales, zeros=zeros,
                residual=residual if config.keep_residual else False,
            )  # fmt: skip
        else:
            new = QuantLinear.from_linear(module, config.bits, gs, config.symmetric, residual=config.keep_residual)
        approx = new.dequantize()
        error = output_error(weight, approx, stat.hessian) if stat is not None else None
        results.append(
            ModuleQuantization(path, tuple(weight.shape), config.bits, gs, _relative_error(weight, approx), error)
        )
        _replace(model, path, new)

    num_used = 0
    if calibration is None:
        for target in targets:
            for path, module in target.modules.items():
                convert(path, module, None)
    else:
        ids = calibration_ids(model, calibration, tokenizer, config.seq_len, config.num_samples)
        num_used = ids.shape[0]

        def make_statistic(path: str, module: nn.Module) -> Hessian:
            weight = weight_out_in(module)
            return Hessian(weight.shape[1], weight.device)

        run_layerwise(
            model, ids, targets, make_statistic, convert, config.batch_size, config.method, show_progress=show_progress
        )
    model.hf_elastic_quantization = config
    return QuantizationReport(config, results, num_used, time.perf_counter() - start)
