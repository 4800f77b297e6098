"""Worker for the 2-process test: trains a few steps and writes each rank's sampled sequence and adapter weights."""

import json
import sys
from pathlib import Path

import torch
from conftest import ARCHS, peft_kwargs
from peft import get_peft_model
from test_trainer import args, dataset

from hf_elastic import NLSConfig
from hf_elastic.trainer import NASTrainer

out = Path(sys.argv[1])
torch.manual_seed(0)
model = get_peft_model(ARCHS["llama"].build(), NLSConfig(**peft_kwargs(ARCHS["llama"], rank_choices=[8, 6, 4])))
trainer = NASTrainer(model=model, args=args(out, max_steps=3, per_device_train_batch_size=2), train_dataset=dataset())
trainer.train()
rank = trainer.args.process_index
weights = {n: p.detach().tolist() for n, p in model.named_parameters() if "lora_" in n}
(out / f"rank{rank}.json").write_text(
    json.dumps({"world": trainer.args.world_size, "history": trainer.sampler.history, "weights": weights})
)
