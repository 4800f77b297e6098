"""Distillation losses of `NASTrainer`: a sub-network's logits against a target's, on the completion tokens."""

from __future__ import annotations

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
