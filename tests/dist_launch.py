"""Two gloo processes for the distributed tests: accelerate's launch commands, a worker runner and
`CPUFSDPTrainer`, which trains on accelerate's FSDP2 path on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from hf_elastic import NASTrainer

ACCELERATE_LAUNCH = ["-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", "0"]
# accelerate 1.15 runs `--cpu` scripts once (only mpirun starts more); `--multi_gpu` picks its torchrun launcher,
# and the workers' `use_cpu=True` makes them a MULTI_CPU (gloo) group.
DDP_LAUNCH = [*ACCELERATE_LAUNCH, "--multi_gpu"]
FSDP_LAUNCH = [
    *ACCELERATE_LAUNCH,
    "--use_fsdp",
    "--fsdp_version=2",
    "--fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap=LlamaDecoderLayer",
    "--fsdp_state_dict_type=FULL_STATE_DICT",
]


def run_worker(
    script: str, out, *worker_args: str, launcher: list[str] | None = None, pythonpath: str | None = None
) -> subprocess.CompletedProcess:
    """Run `tests/<script>` (under `launcher`, if given) with OUT and `worker_args`; `pythonpath` goes first on the
    path (e.g. examples/recipes)."""
    here = Path(__file__).parent
    cmd = [sys.executable, *(launcher or []), str(here / script), str(out), *worker_args]
    path = os.pathsep.join(p for p in (pythonpath, str(here), os.environ.get("PYTHONPATH", "")) if p)
    env = os.environ | {
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(Path(out) / "hf_home"),  # no accelerate default_config.yaml
    }
    return subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)


class CPUFSDPTrainer(NASTrainer):
    """`NASTrainer` on accelerate's FSDP2 path with gloo.

    accelerate 1.15 keeps the FSDP plugin only for GPU-like distributed types (`AcceleratorState.__init__`), so on CPU
    `accelerate launch --use_fsdp` trains with DDP. This lifts that gate; the plugin reads launch's FSDP_* variables.
    Test-only: it relies on accelerate's shared-state internals.
    """

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.accelerate_chose = self.accelerator.distributed_type.value
        self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        for state in (PartialState(), self.accelerator.state):  # AcceleratorState() copies PartialState's fields
            state.distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True
