"""Writers that survive a kill, and readers that name the damaged file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, args, dataset, peft_kwargs
from peft import get_peft_model

from hf_elastic import NASTrainer, NLSConfig, load_quantized, load_super_network, quantize, save_quantized
from hf_elastic.utils import (
    SafetensorsReader,
    atomic_directory,
    check_output_dir,
    load_safetensors,
    read_json,
    write_safetensors,
)

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


def _write_ops(root: str, kill_at: int | None, after: bool, ops: list[str]) -> None:
    """Count (and SIGKILL the process before or after the `kill_at`-th of) the file operations under `root`: writing
    opens, renames, removals, folder creations, torch.save and safetensors writes."""
    import builtins

    import peft.peft_model

    import hf_elastic.utils

    def wrap(module, name, path_arg=0, is_write=lambda *a, **k: True):
        real = getattr(module, name)

        def op(*a, **k):
            target = a[path_arg] if len(a) > path_arg else None
            if (
                not isinstance(target, (str, os.PathLike))
                or not (str(target) + os.sep).startswith(root + os.sep)
                or not is_write(*a, **k)
            ):
                return real(*a, **k)
            ops.append(f"{name} {Path(target).relative_to(root)}")
            mine = len(ops)
            if mine == kill_at and not after:
                os.kill(os.getpid(), 9)
            try:
                return real(*a, **k)
            finally:
                if mine == kill_at and after:
                    os.kill(os.getpid(), 9)

        setattr(module, name, op)

    wrap(
        builtins,
        "open",
        is_write=lambda *a, **k: any(c in (a[1] if len(a) > 1 else k.get("mode", "r")) for c in "wax+"),
    )
    wrap(os, "open", is_write=lambda *a, **k: bool(a[1] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
    for name in ("replace", "rename", "remove", "unlink", "rmdir", "mkdir"):
        wrap(os, name)
    wrap(shutil, "rmtree")
    wrap(torch, "save", path_arg=1)
    wrap(peft.peft_model, "safe_save_file", path_arg=1)
    wrap(hf_elastic.utils, "save_file", path_arg=1)


def _forked(trainer: NASTrainer, out: Path, kill_at: int | None = None, after: bool = False) -> tuple[int, list[str]]:
    """`trainer.save_model(out)` in a forked child with `_write_ops` patched in for the files under `out`'s parent:
    (the child's wait status, the operations it made)."""
    root = out.parent
    count_file = root.parent / f"{root.name}.ops"
    pid = os.fork()
    if pid == 0:
        ops, code = [], 1
        try:
            _write_ops(str(root), kill_at, after, ops)
            trainer.save_model(str(out))
            count_file.write_text("\n".join(ops))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status, count_file.read_text().splitlines() if count_file.is_file() else []


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.is_dir():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["new", "overwrite"])
def test_save_model_killed_at_every_file_operation(
    tmp_path: Path, case: str, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))  # the same save_id in every save
    trainer = adapter_trainer(tmp_path)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_" in name:
                p.fill_(0.5)
    trainer.save_model(str(tmp_path / "old"))  # without a tokenizer; the new saves have one
    old = _snapshot(tmp_path / "old")
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_" in name:
                p.fill_(0.25)
    trainer.processing_class = tiny_tokenizer
    trainer.save_model(str(tmp_path / "new"))
    new = _snapshot(tmp_path / "new")
    assert old != new and set(old) < set(new)

    def prepared(i: int) -> Path:
        out = tmp_path / f"run{i}" / "super"
        out.parent.mkdir()
        if case == "overwrite":
            shutil.copytree(tmp_path / "old", out)
        return out

    out = prepared(0)
    status, ops = _forked(trainer, out)
    assert status == 0 and _snapshot(out) == new
    total = len(ops)
    assert total >= 15, ops  # the save's opens, renames and removals, all reached below
    outcomes = {}
    # before every operation, after each open (an empty or partly written file) and after the last one
    points = [(i, False) for i in range(1, total + 1)]
    points += [(i, True) for i, op in enumerate(ops, 1) if "open" in op or i == total]
    print(f"{case}: {len(points)} kill points over {total} file operations:", *ops, sep="\n  ")
    for n, (i, after) in enumerate(points, start=1):
        out = prepared(n)
        status, _ = _forked(trainer, out, i, after)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9, (i, after, status, ops)
        if case == "new":  # one rename: the folder is complete or absent, with no recovery
            state = _snapshot(out)
            assert state in (None, new), (i, after, sorted(state))
            outcomes[i, after] = "absent" if state is None else "new"
            continue
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            peft_model = load_super_network(ARCHS["llama"].build(), out)  # finishes a committed save first
        state = _snapshot(out)
        assert state in (old, new), (i, after, sorted(set(state) ^ set(old)))
        lora = {float(p.flatten()[0]) for n_, p in peft_model.named_parameters() if "lora_" in n_}
        assert lora == ({0.5} if state == old else {0.25})
        outcomes[i, after] = "old" if state == old else "new"
        assert not (out.parent / ".super.commit").exists()
    kinds = set(outcomes.values())
    assert kinds == ({"absent", "new"} if case == "new" else {"old", "new"}), outcomes
    out = prepared(len(points) + 1)
    _forked(trainer, out, total // 2)
    trainer.save_model(str(out))  # the next save cleans what a killed one left
    assert _snapshot(out) == new and sorted(p.name for p in out.parent.iterdir()) == ["super"]


def test_full_disk_during_save_model_keeps_the_old_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "super"
    trainer = adapter_trainer(tmp_path)
    trainer.save_model(str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import peft.peft_model

    def full(tensors, path, **_kwargs):
        Path(path).write_bytes(b"\0" * 8)  # safetensors creates the file, then a write fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)
    with pytest.raises(OSError, match="No room to write") as error:
        trainer.save_model(str(out))
    assert str(error.value) == (
        f"No room to write adapter_model.safetensors (No space left on device); {out} keeps its previous contents. "
        "Free disk space (or raise the file size limit, `ulimit -f`) and run again."
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "super"]  # the staged files are gone


def test_write_safetensors_writes_the_bytes_of_save_file(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    tensors = {
        "b.weight": torch.randn(5, 3),
        "a": torch.randn(7).to(torch.bfloat16),
        "ids": torch.arange(4),
        "codes": torch.randint(0, 255, (9,), dtype=torch.uint8),
        "scalar": torch.tensor(2.0),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6)[:, ::2],
        "mask": torch.ones(3, dtype=torch.bool),
        "half": torch.randn(3).half(),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", {"format": "pt"})
    write_safetensors(tensors, tmp_path / "new.safetensors", {"format": "pt"})
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    loaded = load_file(tmp_path / "new.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    reader = SafetensorsReader(tmp_path / "new.safetensors")
    assert sorted(reader) == sorted(tensors)
    for name, tensor in tensors.items():
        read = reader[name]
        assert read.dtype == tensor.dtype and torch.equal(read, tensor), name


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
