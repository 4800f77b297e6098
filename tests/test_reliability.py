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
        [sys.executable, "-m", "hf_elastic", *map(str, argv)],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "SafetensorError" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: No room to write model.safetensors (File too large); {out} keeps its previous contents. "
        "Free disk space (or raise the file size limit, `ulimit -f`) and run again."
    )
    assert [p.name for p in tmp_path.iterdir()] == ["sparse"] and (out / "keep.txt").read_text() == "old"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_longer_than_the_positions_are_refused_by_the_trainer(tmp_path, arch) -> None:
    from conftest import args, peft_kwargs
    from datasets import Dataset
    from peft import get_peft_model

    from hf_elastic import NASTrainer, NLSConfig

    model = get_peft_model(ARCHS[arch].build(), NLSConfig(**peft_kwargs(ARCHS[arch], rank_choices=[4, 2])))
    rows = [list(range(1, 13))] * 3 + [[5] * 201]
    trainer = NASTrainer(model=model, args=args(tmp_path), train_dataset=Dataset.from_dict({"input_ids": rows}))
    with pytest.raises(ValueError) as error:
        trainer.train()
    assert str(error.value) == (
        "train_dataset row 3 has 201 tokens, more than the model's 64 positions (config.max_position_embeddings / "
        "n_positions). Cut the rows to at most 64 tokens: hf-elastic train --seq-len 64, or tokenize with "
        "truncation=True, max_length=64 (hf_elastic.tokenize_rows cuts them for you)."
    )
    trainer.train_dataset = Dataset.from_dict({"input_ids": [[1, 2], [3, 400, 4]]})
    with pytest.raises(
        ValueError, match=r"train_dataset holds token id 400 \(row 1\), outside the model's vocabulary"
    ):
        trainer.train()
    trainer.train_dataset = [{"input_ids": torch.tensor([1, 2, -1])}]
    with pytest.raises(ValueError, match=r"token id -1 \(row 0\)"):
        trainer.train()
    trainer.train_dataset = Dataset.from_dict({"input_ids": []})
    with pytest.raises(ValueError, match=r"^train_dataset is empty \(0 rows\): nothing to train on"):
        trainer.train()


def test_train_cuts_rows_to_the_positions_of_gpt2_with_a_notice(tmp_path) -> None:
    from test_cli import WORDS, word_tokenizer

    from hf_elastic import load_super_network

    base = tmp_path / "gpt2"
    ARCHS["gpt2"].build().save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(WORDS * 15)}) + "\n" for _ in range(4)))  # 210 tokens
    argv = ["train", base, tmp_path / "super", "--data", data, "--seq-len", "256", "--max-steps", "1"]
    argv += ["--rank-choices", "4", "2", "--target-modules", "c_attn", "--batch-size", "2", "--cpu"]
    with pytest.warns(UserWarning, match=r"^--seq-len 256 exceeds the model's 64 positions; rows are cut to 64\.$"):
        main([str(a) for a in argv])
    assert (tmp_path / "super" / "tokenizer.json").is_file()  # saved in the same commit as the super-adapter
    load_super_network(ARCHS["gpt2"].build(), tmp_path / "super")


NAS_STATS_DAMAGE = {
    "index outside its dimension": (
        {"0.3": {"mean_loss": 1.0, "count": 2}},
        r"config_losses\['0.3'\]: index 3 is outside dimension 'b', which has 2 choices \(indices 0 to 1\)",
    ),
    "non-numeric loss": ({"0.1": {"mean_loss": "low", "count": 2}}, r"\['mean_loss'\] = 'low' is not a number"),
    "negative count": ({"0.1": {"mean_loss": 1.0, "count": -1}}, r"\['count'\] = -1 is not a positive integer"),
    "short key": ({"0": {"mean_loss": 1.0, "count": 1}}, r"the key must be 2 choice indices joined by '.'"),
    "entry not an object": ({"0.1": 1.5}, r'must be \{"mean_loss": <number>, "count": <int>\}, got 1.5'),
    "every loss NaN": ({"0.1": {"mean_loss": float("nan"), "count": 1}}, r"every mean_loss .* is NaN or infinite"),
}


@pytest.mark.parametrize("damage", list(NAS_STATS_DAMAGE))
def test_damaged_nas_stats_names_the_file_and_the_entry(tmp_path, damage) -> None:
    from hf_elastic.nas import Dimension, SearchSpace
    from hf_elastic.search import FunctionEvaluator, search_subnetworks

    space = SearchSpace([Dimension("a", "rank", (8, 4)), Dimension("b", "rank", (8, 4))])
    losses, message = NAS_STATS_DAMAGE[damage]
    path = tmp_path / "nas_stats.json"
    path.write_text(json.dumps({"search_space": space.to_dict(), "config_losses": losses}))
    with pytest.raises(ValueError, match=rf"^{path}.*{message}.*; use the nas_stats.json NASTrainer saved"):
        search_subnetworks(space, FunctionEvaluator(lambda c: 0.0), "loss_based", nas_stats=path, progress=False)


def test_some_nan_losses_are_left_out_with_a_named_warning(tmp_path) -> None:
    from hf_elastic.nas import Dimension, SearchSpace
    from hf_elastic.search import loss_based_config

    space = SearchSpace([Dimension("a", "rank", (8, 4))])
    losses = {"0": {"mean_loss": float("nan"), "count": 5}, "1": {"mean_loss": 2.0, "count": 1}}
    with pytest.warns(UserWarning, match=r"^stats.json: 1 of 2 sub-networks have a NaN or infinite mean_loss \(first"):
        assert loss_based_config(space, {"config_losses": losses}, source="stats.json") == {"a": 4}


def test_resuming_with_larger_rank_choices_names_the_setting(tmp_path) -> None:
    from conftest import args, dataset, peft_kwargs
    from peft import get_peft_model

    from hf_elastic import NASTrainer, NLSConfig

    def trainer(ranks: list[int]) -> NASTrainer:
        model = get_peft_model(ARCHS["llama"].build(), NLSConfig(**peft_kwargs(ARCHS["llama"], rank_choices=ranks)))
        run = args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
        return NASTrainer(model=model, args=run, train_dataset=dataset())

    trainer([4, 2]).train()
    with pytest.raises(ValueError) as error:
        trainer([8, 4]).train(resume_from_checkpoint=True)
    assert str(error.value) == (
        f"Cannot resume from {tmp_path / 'checkpoint-2'}: it was trained with other elastic settings (rank_choices: "
        "checkpoint [4, 2], this run [8, 4]). Resume with the same --rank-choices (NLSConfig/ElasticLoraConfig), or "
        "start a new output folder."
    )
    (tmp_path / "checkpoint-2" / "elastic_config.json").unlink()  # then peft's size mismatch is caught
    with pytest.raises(ValueError, match=r"checkpoint-2: its adapter weights have other shapes than this model's"):
        trainer([8, 4]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_sparsify_of_a_folder_with_random_weights_names_the_file(model_dir, tmp_path, capsys) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(os.urandom(4096))
    line = cli(["sparsify", broken, tmp_path / "out", "--method", "magnitude"], capsys)
    assert line.startswith(f"error: {broken / 'model.safetensors'} (4096 bytes) is not a readable safetensors file (")
    assert line.endswith("; the model folder is damaged: save or download the model again.")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def adapter_dir(model_dir) -> Path:
    from conftest import peft_kwargs
    from peft import get_peft_model

    from hf_elastic import NLSConfig

    path = model_dir.parent / "super"
    config = NLSConfig(**peft_kwargs(ARCHS["llama"], rank_choices=[4, 2]))
    get_peft_model(ARCHS["llama"].build(), config).save_pretrained(path)
    return path


def test_export_openvino_checks_the_exporter_before_writing_and_names_a_half_done_export(
    model_dir, adapter_dir, tmp_path, capsys, monkeypatch
) -> None:
    pytest.importorskip("optimum.exporters.openvino")
    import transformers
    from optimum.exporters.openvino.model_configs import LlamaOpenVINOConfig

    import hf_elastic.export.openvino as openvino

    out = tmp_path / "sub"
    argv = ["export", adapter_dir, "--base", model_dir, "--output", out, "--openvino", "--config", "min"]
    monkeypatch.setattr(LlamaOpenVINOConfig, "MAX_TRANSFORMERS_VERSION", "5.0", raising=False)  # as for Gemma 3
    line = cli(argv, capsys)
    assert line == (
        f"error: --openvino: optimum-intel exports 'llama' with transformers <= 5.0 only; {transformers.__version__} "
        "is installed (pip install 'transformers<=5.0' in an environment for the OpenVINO export). Nothing was "
        "written; export without --openvino, or fix that first."
    )
    assert sorted(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def refuses(*args, **kwargs):
        raise ValueError("The current version of Transformers does not allow for the export of the model.\nMore")

    monkeypatch.setattr(openvino, "export_openvino", refuses)
    line = cli(argv, capsys)
    assert line == (
        "error: The OpenVINO export failed (ValueError: The current version of Transformers does not allow for the "
        f"export of the model.). {out} holds the complete sub-network; {out}-openvino was not written. Fix the cause "
        "and run the same command with --overwrite, or convert the written folder with "
        f"hf_elastic.export_openvino('{out}', '{out}-openvino')."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"] and (out / "config.json").is_file()
