"""Subprocess worker for the trainer tests: `train_worker.py OUT MAX_STEPS [KILL_AT | resume | fsdp]`.

Trains the tiny Llama NLS super-network, saving a checkpoint every 2 steps, and writes each rank's sampled sequence,
first step and adapter weights to OUT/rank<r>.json. With KILL_AT the process SIGKILLs itself at the end of that step;
KILL_AT=resume resumes from the last checkpoint in OUT instead.

`fsdp` (under `accelerate launch --use_fsdp --fsdp_version 2 ... --fsdp_state_dict_type FULL_STATE_DICT`) trains with
accelerate's FSDP2 code path on CPU, saves the super-adapter to OUT/final and loads it back on every rank.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from conftest import ARCHS, args, dataset, peft_kwargs
from dist_launch import CPUFSDPTrainer
from peft import get_peft_model
from transformers import TrainerCallback

from hf_elastic import NASTrainer, NLSConfig, load_super_network


class KillAt(TrainerCallback):
    def __init__(self, step: int | None) -> None:
        self.step, self.first_step = step, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step if self.first_step is None else self.first_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def lora(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


out, max_steps = Path(sys.argv[1]), int(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else ""
torch.manual_seed(0)
model = get_peft_model(ARCHS["llama"].build(), NLSConfig(**peft_kwargs(ARCHS["llama"], rank_choices=[8, 6, 4])))
run = args(out, max_steps=max_steps, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
trainer = (CPUFSDPTrainer if mode == "fsdp" else NASTrainer)(model=model, args=run, train_dataset=dataset())
killer = KillAt(int(mode) if mode.isdigit() else None)
trainer.add_callback(killer)
trainer.train(resume_from_checkpoint=mode == "resume" or None)
rank = trainer.args.process_index
report = {"world": trainer.args.world_size, "first_step": killer.first_step, "history": trainer.sampler.history}
if mode == "fsdp":
    trainer.save_model(str(out / "final"))  # every rank gathers the full state dict; rank 0 writes it
    params = lora(model)
    report["accelerate_chose"] = trainer.accelerate_chose
    report["wrapped"] = type(trainer.model_wrapped).__name__
    report["shards"] = {n: [list(p.to_local().shape), list(p.shape)] for n, p in params.items()}
    report["weights"] = {n: p.full_tensor().tolist() for n, p in params.items()}
    trainer.accelerator.wait_for_everyone()
    report["loaded"] = {
        n: p.detach().tolist() for n, p in lora(load_super_network(ARCHS["llama"].build(), out / "final")).items()
    }
else:
    report["weights"] = {n: p.detach().tolist() for n, p in lora(model).items()}
(out / f"rank{rank}.json").write_text(json.dumps(report))
