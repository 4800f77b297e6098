"""Bad inputs and failing disks: one clear error naming the file or option, and the old artifact kept."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, byte_level_bpe

from hf_elastic.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rel") / "base"
    ARCHS["llama"].build().save_pretrained(path)
    byte_level_bpe(["good food was great"] * 5, 90, ["</s>"], eos_token="</s>", pad_token="</s>").save_pretrained(path)
    return path


def cli(argv: list[str], capsys) -> str:
    """Run `hf-elastic argv`, which must fail with one `error:` line and status 1; that line."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 1, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err
    return err.strip().splitlines()[-1]


def test_file_size_limit_during_sparsify_is_one_error_line_and_keeps_the_old_folder(model_dir, tmp_path) -> None:
    out = tmp_path / "sparse"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    size = (model_dir / "model.safetensors").stat().st_size

    def limit() -> None:  # the new model.safetensors cannot be written whole; Python ignores SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    argv = ["sparsify", model_dir, out, "--overwrite", "--method", "magnitude", "--sparsity", "0.5"]
    env = os.environ | {"PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "hf_elastic", *map(str, argv)], env=env, capture_output=True, text=True, preexec_fn=limit
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "SafetensorError" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: No room to write model.safetensors (File too large); {out} keeps its previous contents. "
        "Free disk space (or raise the file size limit, `ulimit -f`) and run again."
    )
    assert [p.name for p in tmp_path.iterdir()] == ["sparse"] and (out / "keep.txt").read_text() == "old"
