"""Subprocess worker for the kill tests: `kill_worker.py MODE KILL_AT OUT`.

Writes a new generation of OUT (which holds an older one) and SIGKILLs itself at a chosen point:
- `dir`: `atomic_directory`; KILL_AT = `write` (inside the block), `swap` (old folder moved away, new not yet in) or
  `cleanup` (new folder in, old copy not yet removed);
- `quantized`: `save_quantized`, KILL_AT as for `dir`.

`NASTrainer.save_model` is killed at every file operation by `test_utils.py` itself (in forked children).
"""

import os
import shutil
import signal
import sys
from pathlib import Path

mode, kill_at, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


real_replace, real_rmtree = os.replace, shutil.rmtree
folder_moves = []


def replace(src, dst):
    name = Path(src).name
    if Path(src).is_dir():
        folder_moves.append(name)
        if kill_at == "swap" and len(folder_moves) == 2:
            die()
    real_replace(src, dst)


def rmtree(path, *args, **kwargs):
    if kill_at == "cleanup" and str(path).endswith(".old"):
        die()
    real_rmtree(path, *args, **kwargs)


os.replace, shutil.rmtree = replace, rmtree

if mode == "dir":
    from hf_elastic.utils import atomic_directory

    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
        if kill_at == "write":
            die()
        (tmp / "b.txt").write_text("new")
elif mode == "quantized":
    import torch
    from conftest import ARCHS

    from hf_elastic import quantize, save_quantized

    model = ARCHS["llama"].build()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    quantize(model, bits=8, group_size=16, show_progress=False)
    if kill_at == "write":
        import hf_elastic.compression.quantization.serialization as serialization

        serialization.atomic_save_safetensors = lambda *a, **k: die()
    save_quantized(model, out)
sys.exit(3)  # not killed: the test asked for a point that was never reached
