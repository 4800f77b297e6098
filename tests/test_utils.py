"""Writers that survive a kill, and readers that name the damaged file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, args, dataset, peft_kwargs
from peft import get_peft_model

from hf_elastic import NASTrainer, NLSConfig, load_quantized, load_super_network, quantize, save_quantized
from hf_elastic.utils import atomic_directory, check_output_dir, load_safetensors, read_json

WORKER = Path(__file__).parent / "kill_worker.py"


def kill(mode: str, point: str, out: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent)}
    run = subprocess.run([sys.executable, str(WORKER), mode, point, str(out)], env=env, capture_output=True)
    assert run.returncode == -9, run.stderr.decode()[-2000:]


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.mark.parametrize("point", ["write", "swap", "cleanup"])
def test_killed_overwrite_leaves_old_or_new_and_is_recovered(tmp_path: Path, point: str) -> None:
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "b.txt").write_text("old")
    kill("dir", point, out)
    assert hidden(out), "the kill should leave a hidden folder behind"
    with pytest.warns(UserWarning, match="Restored|Removed"):
        check_output_dir(out, overwrite=True)
    assert not hidden(out)
    contents = {p.name: p.read_text() for p in out.iterdir()}
    assert contents in ({"a.txt": "old", "b.txt": "old"}, {"a.txt": "new", "b.txt": "new"})
    assert contents["a.txt"] == ("new" if point == "cleanup" else "old")


def test_temporary_folder_of_a_live_process_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    live = tmp_path / f".out.{os.getppid()}.abcd.tmp"
    live.mkdir()
    check_output_dir(out, overwrite=False)
    assert live.is_dir()


@pytest.mark.parametrize("point", ["write", "swap", "cleanup"])
def test_killed_save_quantized_loads_old_or_new(tmp_path: Path, point: str) -> None:
    model = ARCHS["llama"].build()
    quantize(model, bits=4, group_size=16, show_progress=False)
    out = save_quantized(model, tmp_path / "int")
    kill("quantized", point, out)
    with pytest.warns(UserWarning):
        check_output_dir(out, overwrite=True)
    bits = {m.bits for m in load_quantized(out).modules() if hasattr(m, "qweight")}
    assert bits == ({8} if point == "cleanup" else {4})


def adapter_trainer(tmp_path: Path) -> NASTrainer:
    model = get_peft_model(ARCHS["llama"].build(), NLSConfig(**peft_kwargs(ARCHS["llama"], rank_choices=[8, 4])))
    return NASTrainer(model=model, args=args(tmp_path / "run"), train_dataset=dataset())


@pytest.mark.parametrize("point", ["staging", "config"])
def test_killed_save_model_never_loads_a_mix(tmp_path: Path, point: str) -> None:
    out = tmp_path / "super"
    adapter_trainer(tmp_path).save_model(str(out))
    before = (out / "adapter_model.safetensors").read_bytes()
    kill("adapter", point, out)
    if point == "staging":  # nothing was moved: the old super-adapter is intact and loads
        assert (out / "adapter_model.safetensors").read_bytes() == before
        load_super_network(ARCHS["llama"].build(), out)
    else:  # new weights beside the old elastic_config.json: detected, not loaded silently
        with pytest.raises(ValueError, match="come from different saves"):
            load_super_network(ARCHS["llama"].build(), out)


def test_full_disk_during_save_model_keeps_the_old_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "super"
    trainer = adapter_trainer(tmp_path)
    trainer.save_model(str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import peft.peft_model

    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_model(str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_readers_name_the_damaged_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON .*; fix it"):
        read_json(tmp_path / "bad.json", "fix it")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"list.json holds a JSON list, not an object"):
        read_json(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError, match=r"none.json does not exist"):
        read_json(tmp_path / "none.json")
    for name, data in {"empty.safetensors": b"", "junk.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{}"}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name} \(\d+ bytes\) is not a readable safetensors file"):
            load_safetensors(tmp_path / name)


def test_nas_stats_is_strict_json(tmp_path: Path) -> None:
    trainer = adapter_trainer(tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "super"))
    stats = json.loads((tmp_path / "super" / "nas_stats.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert stats["save_id"] == json.loads((tmp_path / "super" / "elastic_config.json").read_text())["save_id"]
    assert torch.isfinite(torch.tensor([v["mean_loss"] for v in stats["config_losses"].values()])).all()
