"""`NASSFTTrainer`: trl's `SFTTrainer` with the sub-network sampler of `NASTrainer` (`pip install hf-elastic[trl]`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from .trainer import NASArgumentsMixin, NASTrainerMixin


@dataclass
class NASSFTConfig(NASArgumentsMixin, SFTConfig):
    """trl's `SFTConfig` plus the super-network settings of `NASTrainingArguments` (`sampling`, `sandwich_k`,
    `eval_subnets`)."""


class NASSFTTrainer(NASTrainerMixin, SFTTrainer):
    """trl's `SFTTrainer` training an `NLSConfig`/`ElasticLoraConfig` super-network, one sub-network per step.

    Takes what `SFTTrainer` takes (a model or model id, `peft_config`, text, prompt/completion or conversational
    datasets); the sub-networks drawn for a seed are the ones `NASTrainer` draws. `args` may be a `NASSFTConfig`, an
    `SFTConfig` (NAS defaults) or `TrainingArguments`/`NASTrainingArguments` (converted to `NASSFTConfig`).
    """

    def __init__(self, model: Any, args: TrainingArguments | None = None, *rest: Any, **kwargs: Any) -> None:
        if isinstance(args, TrainingArguments) and not isinstance(args, SFTConfig):
            args = NASSFTConfig(**(args.to_dict() | {"hub_token": args.hub_token}))  # as SFTTrainer does
        super().__init__(model, args, *rest, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # SFTTrainer counts a micro-batch's tokens in each compute_loss call; a sandwich step calls it once per config.
        # With distillation the loss comes from Trainer.compute_loss (it needs the logits), which counts none.
        configs, tokens = len(self.sampler.current), self._total_train_tokens
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.distillation != "none":
            mask = inputs.get("attention_mask")
            count = mask.sum() if mask is not None else torch.tensor(inputs["position_ids"].size(1))
            self._total_train_tokens = tokens + int(self.accelerator.gather_for_metrics(count).sum().item())
        elif configs > 1:
            self._total_train_tokens = tokens + (self._total_train_tokens - tokens) // configs
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return loss
