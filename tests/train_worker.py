"""Subprocess worker for the trainer tests: `train_worker.py OUT MAX_STEPS [KILL_AT]`.

Trains the tiny Llama NLS super-network, saving a checkpoint every 2 steps, and writes each rank's sampled sequence,
first step and adapter weights to OUT/rank<r>.json. With KILL_AT the process SIGKILLs itself at the end of that step;
KILL_AT=resume resumes from the last checkpoint in OUT instead.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from conftest import ARCHS, args, dataset, peft_kwargs
from peft import get_peft_model
from transformers import TrainerCallback

from hf_elastic import NASTrainer, NLSConfig


class KillAt(TrainerCallback):
    def __init__(self, step: int | None) -> None:
        self.step, self.first_step = step, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step if self.first_step is None else self.first_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


out, max_steps = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = get_peft_model(ARCHS["llama"].build(), NLSConfig(**peft_kwargs(ARCHS["llama"], rank_choices=[8, 6, 4])))
run = args(out, max_steps=max_steps, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
trainer = NASTrainer(model=model, args=run, train_dataset=dataset())
mode = sys.argv[3] if len(sys.argv) > 3 else ""
killer = KillAt(int(mode) if mode.isdigit() else None)
trainer.add_callback(killer)
trainer.train(resume_from_checkpoint=mode == "resume" or None)
rank = trainer.args.process_index
weights = {n: p.detach().tolist() for n, p in model.named_parameters() if "lora_" in n}
(out / f"rank{rank}.json").write_text(
    json.dumps(
        {
            "world": trainer.args.world_size,
            "first_step": killer.first_step,
            "history": trainer.sampler.history,
            "weights": weights,
        }
    )
)
