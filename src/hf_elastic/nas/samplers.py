"""Samplers of `NASTrainer`: which sub-networks each optimizer step trains (`SAMPLERS`, `register_sampler`), and
`SubnetSampler`, the callback that draws them and records what each choice was trained on."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import random
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..devices import any_rank, local_tensor
from .search_space import Dimension, SearchSpace, SubnetConfig
from .supernet import SuperNetwork

logger = logging.getLogger(__name__)

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


def space_fingerprint(space: SearchSpace) -> str:
    return hashlib.sha256(json.dumps(space.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class SubnetSampler(TrainerCallback, ExportableState):
    """Draws the sub-networks of each optimizer step and records how often each choice was trained.

    The draw for step `s` depends only on `(seed, s)`, so distributed ranks agree and a resumed run continues the
    same sequence; the statistics travel in checkpoints through `ExportableState`. Losses and the finiteness of each
    step stay on the device until a logging, saving or evaluation step reads them all at once (one host sync).
    """

    def __init__(
        self,
        supernet: SuperNetwork,
        sampling: str,
        seed: int,
        sandwich_k: int = 2,
        on_nonfinite: str = "skip",
        stages: list[float] | None = None,
    ) -> None:
        self.supernet, self.sampling, self.seed, self.sandwich_k = supernet, sampling, seed, sandwich_k
        self.on_nonfinite = on_nonfinite
        self.stages = list(stages or [0.25] * 4)
        parameters = inspect.signature(SAMPLERS[sampling]).parameters
        self.scheduled = "progress" in parameters  # the draw depends on the fraction of the run done
        self._extra = {"stages": self.stages} if "stages" in parameters else {}
        self.stage_history: list[int] = []  # progressive: the stage of every step
        self.skipped_steps: list[dict[str, Any]] = []
        self.fingerprint = space_fingerprint(supernet.space)
        self.current: list[SubnetConfig] = [supernet.space.max_config()]
        self.choice_counts: dict[str, dict[str, int]] = {d.name: {} for d in supernet.space}
        self.config_losses: dict[str, list[float]] = {}
        self.history: list[str] = []
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._pending_steps: list[tuple[int, list[str], torch.Tensor]] = []
        self._undo: tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None = None

    def progress(self, step: int, max_steps: int | None) -> float:
        """The fraction of the run done before `step` (0 when the length of the run is unknown)."""
        return step / max_steps if max_steps and max_steps > 0 else 0.0

    def draw(self, step: int, max_steps: int | None = None) -> list[SubnetConfig]:
        rng = random.Random(f"{self.seed}:{step}")
        extra = self._extra | ({"progress": self.progress(step, max_steps)} if self.scheduled else {})
        return SAMPLERS[self.sampling](self.supernet.space, rng, self.sandwich_k, **extra)

    def key(self, config: SubnetConfig) -> str:
        """Compact form of a config: its choice indices (0 = largest) joined by '.'."""
        return ".".join(map(str, self.supernet.space.encode(config)))

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = self.draw(state.global_step, state.max_steps)
        if self.sampling == "progressive":
            progress = self.progress(state.global_step, state.max_steps)
            self.stage_history.append(progressive_stage(progress, self.stages))
        for config in self.current:
            for name, value in config.items():
                counts = self.choice_counts[name]
                counts[str(value)] = counts.get(str(value), 0) + 1
        self.history.append(self.key(self.current[0]))
        self.supernet.activate(self.current[0])

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if not saved:
            return
        saved = saved[0] if isinstance(saved, list) else saved
        if saved["args"]["fingerprint"] != self.fingerprint:
            raise ValueError(
                "The checkpoint was trained with a different search space "
                f"(fingerprint {saved['args']['fingerprint']}, this model {self.fingerprint}). "
                "Resume with the same NLSConfig/ElasticLoraConfig and model."
            )
        for name in ("choice_counts", "config_losses", "history", "skipped_steps", "stage_history"):
            if name in saved["attributes"]:
                setattr(self, name, saved["attributes"][name])

    def record_loss(self, config: SubnetConfig, loss: float | torch.Tensor) -> None:
        """Add a training loss of `config` to its running mean; a tensor is read at the end of the optimizer step,
        so that recording it does not wait for the accelerator in the middle of a step."""
        if isinstance(loss, torch.Tensor):
            self._pending.append((self.key(config), loss.detach().float().reshape(())))
        else:
            self._add_loss(self.key(config), loss)

    def _add_loss(self, key: str, loss: float) -> None:
        if not math.isfinite(loss):
            return  # reported by on_pre_optimizer_step, which also drops the step's update
        mean_count = self.config_losses.setdefault(key, [0.0, 0])
        mean_count[1] += 1
        mean_count[0] += (loss - mean_count[0]) / mean_count[1]

    def flush(self) -> None:
        """Fold the losses recorded as tensors into the running means and report the skipped steps, with one
        device-to-host copy."""
        if not self._pending and not self._pending_steps:
            return
        losses = [loss for _, loss in self._pending] + [finite.float() for *_, finite in self._pending_steps]
        values = torch.stack([v.to(losses[0].device) for v in losses]).tolist()
        for (key, _), loss in zip(self._pending, values, strict=False):
            self._add_loss(key, loss)
        for (step, keys, _), finite in zip(self._pending_steps, values[len(self._pending) :], strict=True):
            if not finite:
                self.skipped_steps.append({"step": step, "subnets": keys})
                logger.warning(
                    "Skipped the update of step %d, sub-network %s (choice indices, 0 = largest): its loss or "
                    "gradients are not finite.",
                    step,
                    " + ".join(keys),
                )
        self._pending, self._pending_steps = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Drop the update of a step whose gradients are not finite (or raise, with `on_nonfinite='stop'`).

        With 'skip' nothing waits for the device: non-finite gradients are zeroed, and after the optimizer step the
        trainable parameters and the optimizer's tensors beside them are put back where the step was not finite (a
        step counter that the optimizer keeps on the host still counts it).
        """
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None] if model else []
        if not params:
            return
        finite = torch.stack([torch.isfinite(local_tensor(p.grad)).all() for p in params]).all()
        if any(hasattr(p.grad, "to_local") for p in params):  # FSDP2 shards: every rank must skip the same steps
            finite = ~any_rank(~finite, args.device)
        keys = [self.key(c) for c in self.current]
        if self.on_nonfinite == "stop":
            if bool(finite):
                return
            where = f"step {state.global_step + 1}, sub-network {' + '.join(keys)} (choice indices, 0 = largest)"
            raise FloatingPointError(
                f"Non-finite loss or gradient at {where}. Check the data and the learning rate, or pass "
                "on_nonfinite='skip' to skip such steps."
            )
        saved, current = [], []
        for p in params:
            local_tensor(p.grad).masked_fill_(~finite, 0)
            state_of = getattr(optimizer, "state", {}).get(p, {}) if optimizer is not None else {}
            tensors = [local_tensor(t) for t in (p, *state_of.values()) if torch.is_tensor(t) and t.device == p.device]
            current += tensors
            saved += [t.detach().clone() for t in tensors]
        self._undo = (finite, current, saved)
        self._pending_steps.append((state.global_step + 1, keys, finite))

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._undo is None:
            return
        finite, current, saved = self._undo
        self._undo = None
        with torch.no_grad():
            for now, before in zip(current, saved, strict=True):
                now.copy_(torch.where(finite, now, before))

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()

    def stats(self) -> dict[str, Any]:
        self.flush()
        return {
            "sampling": self.sampling,
            "seed": self.seed,
            "search_space": self.supernet.space.to_dict(),
            "choice_counts": self.choice_counts,
            "config_losses": {k: {"mean_loss": m, "count": n} for k, (m, n) in self.config_losses.items()},
            "history": self.history,
            "skipped_steps": self.skipped_steps,
        } | self._stage_stats()

    def _stage_stats(self) -> dict[str, Any]:
        if self.sampling != "progressive":
            return {}
        opened = [["max"], *(list(PROGRESSIVE_KINDS[:i]) for i in range(1, 4))]
        return {"progressive": {"stages": self.stages, "opened": opened, "stage_per_step": self.stage_history}}

    def state(self) -> dict[str, Any]:
        self.flush()
        return {
            "args": {"sampling": self.sampling, "seed": self.seed, "fingerprint": self.fingerprint},
            "attributes": {
                "choice_counts": self.choice_counts,
                "config_losses": self.config_losses,
                "history": self.history,
                "skipped_steps": self.skipped_steps,
                "stage_history": self.stage_history,
            },
        }
