"""Subprocess worker of `test_distributed.py`: `recipe_worker.py OUT SCRIPT` runs a paper's recipe in `--tiny` mode
with `CPUFSDPTrainer` (accelerate's FSDP2 path on CPU) in place of `NASTrainer`, and writes each rank's summary and
what its trainer held to OUT/rank<r>.json. Run it under the 2-process FSDP2 launch, with examples/recipes on the
path."""

import importlib
import json
import os
import sys
from pathlib import Path

import recipe
from dist_launch import CPUFSDPTrainer

from hf_elastic import QuantLinear
from hf_elastic.devices import local_tensor

held: dict = {}


class RecordingTrainer(CPUFSDPTrainer):
    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        held["wrapped"] = type(self.model_wrapped).__name__
        codes = [m.qweight for m in self.model.modules() if isinstance(m, QuantLinear)]
        held["codes"] = [[list(local_tensor(c).shape), list(c.shape)] for c in codes]
        return result


out, script = Path(sys.argv[1]), sys.argv[2]
recipe.NASTrainer = RecordingTrainer
module = importlib.import_module(script)
method = next(value for name, value in vars(module).items() if name.isupper() and hasattr(value, "recipe"))
summary = recipe.run(method, ["--tiny", "--output-dir", str(out / "run")])
(out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"summary": summary, **held}, default=str))
