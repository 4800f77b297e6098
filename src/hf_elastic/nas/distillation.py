"""Distillation losses of `NASTrainer`: a sub-network's logits against a target's, on the completion tokens."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

DISTILLATIONS = ("none", "inplace", "teacher")


def completion_logits(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The rows of `logits` that predict a label (labels != -100), shifted by one token for a causal LM."""
    if labels is None:
        raise ValueError("Distillation needs `labels` in the batch to find the completion tokens (labels != -100).")
    if logits.dim() == 3 and labels.dim() == 2:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits[labels != -100]


def distillation_kl(student: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`T^2 * KL(softmax(target / T) || softmax(student / T))` summed over the rows (float32)."""
    if target.shape != student.shape:
        raise ValueError(
            f"The target logits at the completion tokens have shape {tuple(target.shape)}, the sub-network's "
            f"{tuple(student.shape)}: a teacher must share the tokenizer and vocabulary of the trained model."
        )
    t = temperature
    student_logp = F.log_softmax(student.float() / t, -1)
    return F.kl_div(student_logp, F.log_softmax(target.float() / t, -1), log_target=True, reduction="sum") * (t * t)


class Teacher:
    """A frozen teacher model: `teacher(inputs)` gives its logits at the completion tokens, without gradients."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str) -> None:
        self.model = model.requires_grad_(False).eval().to(device)
        accepted = inspect.signature(model.forward).parameters
        any_key = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        self.keys = None if any_key else set(accepted) - {"labels"}

    def __call__(self, inputs: dict[str, Any]) -> torch.Tensor:
        feed = {k: v for k, v in inputs.items() if k != "labels" and (self.keys is None or k in self.keys)}
        with torch.no_grad():
            logits = self.model(**feed).logits
        return completion_logits(logits, inputs.get("labels")).detach()
