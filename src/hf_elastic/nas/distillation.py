"""The completion tokens of `NASTrainer`'s losses: where a causal LM's logits are needed, and the distillation loss
of a sub-network's logits against a target's there."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

DISTILLATIONS = ("none", "inplace", "teacher")


def completion_only(labels: Any) -> dict[str, torch.Tensor]:
    """`logits_to_keep` (the positions of a `(batch, length)` batch whose next token is a label in some row) and
    `shift_labels` (the label each kept position predicts, -100 for none) for a transformers causal LM; empty unless
    `labels` is a `(batch, length)` tensor.

    Given them, the model computes its LM head and loss at those positions only: the same loss and gradients as over
    every position, without the `(batch, length, vocab)` logits.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return {}
    positions = (labels[:, 1:] != -100).any(0).nonzero().flatten()
    return {"logits_to_keep": positions, "shift_labels": labels[:, positions + 1]}


def completion_logits(
    logits: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """The rows of `logits` that predict a label (labels != -100), shifted by one token for a causal LM; with
    `shift_labels` (the logits were computed at the positions of `completion_only`), those whose label is not -100."""
    if labels is None:
        raise ValueError("Distillation needs `labels` in the batch to find the completion tokens (labels != -100).")
    if shift_labels is not None:
        return logits[shift_labels != -100]
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
        self.keeps_logits = "logits_to_keep" in accepted

    def __call__(self, inputs: dict[str, Any]) -> torch.Tensor:
        feed = {k: v for k, v in inputs.items() if k != "labels" and (self.keys is None or k in self.keys)}
        labels = inputs.get("labels")
        kept = completion_only(labels) if self.keeps_logits else {}
        if kept:
            feed["logits_to_keep"] = kept["logits_to_keep"]
        with torch.no_grad():
            logits = self.model(**feed).logits
        return completion_logits(logits, labels, kept.get("shift_labels")).detach()
