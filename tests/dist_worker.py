"""Subprocess worker of `test_distributed.py`: `dist_worker.py OUT {ddp | fsdp}`, under a 2-process launch.

Trains the tiny Llama with a 50 %-sparse INT4 base (round-to-nearest, with its residual) and a QA-SparsePEFT
super-adapter for 3 steps, and writes what each rank saw to OUT/rank<r>.json.

- `ddp`: the bytes that DDP broadcasts in each step (patched `torch.distributed._broadcast_coalesced`), by dtype.
- `fsdp` (under the FSDP2 launch): the shards of the quantized layers, the steps skipped after an inf is planted in
  rank 1's shard of one gradient at step 2, the base checks run again on the sharded model, and what `save_model`
  does with a NaN planted in rank 1's shard of one adapter weight.
"""

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import ARCHS, args, dataset, peft_kwargs
from dist_launch import CPUFSDPTrainer
from peft import get_peft_model
from transformers import TrainerCallback

from hf_elastic import NASTrainer, NLSConfig, QuantizationConfig, QuantLinear, quantize
from hf_elastic.devices import full_tensor, local_tensor
from hf_elastic.nas.supernet import base_fingerprint

PLANT_STEP = 2


class CountBroadcasts(TrainerCallback):
    """Bytes that `_broadcast_coalesced` sends in each training step (DDP's buffer sync before every forward)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, int]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        original = dist._broadcast_coalesced  # DDP calls it through `torch.distributed`, after it was built

        def counting(group, tensors, buffer_size, src=0):
            for t in tensors:
                kind = "float" if t.is_floating_point() else "integer"
                self.steps[-1][kind] = self.steps[-1].get(kind, 0) + t.numel() * t.element_size()
            return original(group, tensors, buffer_size, src)

        dist._broadcast_coalesced = counting

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append({})


class PlantInf(TrainerCallback):
    """Rank 1 writes an inf into its shard of one gradient before the optimizer step `PLANT_STEP`; every rank keeps
    the full adapter weights after each step."""

    def __init__(self, rank: int) -> None:
        self.rank, self.weights = rank, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == PLANT_STEP and self.rank == 1:
            grad = next(p.grad for n, p in model.named_parameters() if "lora_B" in n)
            local_tensor(grad).view(-1)[0] = math.inf

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append({n: full_tensor(p.detach()) for n, p in model.named_parameters() if "lora_" in n})


def sparse_int4_llama() -> torch.nn.Module:
    model = ARCHS["llama"].build()
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
                w = linear.weight
                w[w.abs() <= w.abs().median()] = 0
    quantize(model, QuantizationConfig(bits=4, group_size=16, keep_residual=True))
    return model


out, mode = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
config = NLSConfig(**peft_kwargs(ARCHS["llama"], rank_choices=[8, 6, 4], sparse_adapter=True, quantization_aware=True))
model = get_peft_model(sparse_int4_llama(), config)
run = args(out, max_steps=3, per_device_train_batch_size=2)
trainer = (CPUFSDPTrainer if mode == "fsdp" else NASTrainer)(model=model, args=run, train_dataset=dataset())
rank = trainer.args.process_index
supernet = trainer.supernet
before = {
    "fingerprint": supernet.config.base_fingerprint,
    "sparsity": supernet.config.base_sparsity["sha256"],
    "count": supernet.count("min"),
}
report: dict = {"world": trainer.args.world_size, "before": before}
if mode == "ddp":
    counter = CountBroadcasts()
    trainer.add_callback(counter)
    trainer.train()
    report["broadcast_per_step"] = counter.steps
    report["buffer_bytes"] = sum(b.numel() * b.element_size() for b in model.buffers())
    report["code_bytes"] = sum(
        sum(t.numel() * t.element_size() for t in m.parameters(recurse=False) if not t.is_floating_point())
        for m in model.modules()
        if isinstance(m, QuantLinear)
    )
else:
    planter = PlantInf(rank)
    trainer.callback_handler.callbacks.insert(0, planter)  # before the sampler's check of the step
    trainer.train()
    report["skipped_steps"] = [s["step"] for s in trainer.sampler.skipped_steps]
    first, second = planter.weights[PLANT_STEP - 2], planter.weights[PLANT_STEP - 1]
    report["unchanged_by_skipped_step"] = all(torch.equal(first[n], second[n]) for n in first)
    report["changed_by_other_steps"] = any(not torch.equal(second[n], planter.weights[-1][n]) for n in second)
    report["quant_shards"] = {
        f"{name}.{t}": [list(local_tensor(getattr(m, t)).shape), list(getattr(m, t).shape)]
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
        for t in ("qweight", "scales", "zeros", "residual")
    }
    codes = [m.qweight for m in model.modules() if isinstance(m, QuantLinear)]
    report["code_bytes"] = [sum(local_tensor(c).numel() for c in codes), sum(c.numel() for c in codes)]
    # the base checks, again on the sharded weights
    supernet._costs = None
    supernet._check_base_sparsity()  # raises if the zero pattern read now differs from the recorded one
    report["after"] = {
        "fingerprint": base_fingerprint(supernet.lora_modules),
        "sparsity": supernet.config.base_sparsity["sha256"],
        "count": supernet.count("min"),
    }
    trainer.save_model(str(out / "final"))
    if rank == 1:  # a NaN in rank 1's shard only
        with torch.no_grad():
            local_tensor(next(p for n, p in model.named_parameters() if "lora_A" in n)).view(-1)[0] = math.nan
    try:
        trainer.save_model(str(out / "nan"))
        report["nan_save"] = "saved"
    except FloatingPointError as error:
        report["nan_save"] = str(error)
    dist.barrier()  # no rank is left waiting in the save's gather
(out / f"rank{rank}.json").write_text(json.dumps(report))
