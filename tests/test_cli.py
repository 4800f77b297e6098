"""The `hf-elastic` command line on a tiny saved Llama: sparsify → train → search → export → push --dry-run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hf_elastic import QuantLinear, load_exported
from hf_elastic.cli import build_parser, main

WORDS = ["the", "a", "good", "bad", "food", "taste", "great", "other", "was", "is", "not", "very", "and", "it"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "base"
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )
    ARCHS["llama"].build().save_pretrained(path)
    tokenizer.save_pretrained(path)
    data = path.parent / "data.jsonl"
    g = torch.Generator().manual_seed(0)
    rows = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g)) for _ in range(24)]
    data.write_text("".join(json.dumps({"review": r}) + "\n" for r in rows))
    return path


def test_every_subcommand_has_help(capsys):
    for command in ("sparsify", "quantize", "train", "search", "export", "push", "demo"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([command, "--help"])
        assert exit_.value.code == 0
        assert "usage: hf-elastic " + command in capsys.readouterr().out


def test_pipeline(model_dir, tmp_path, capsys):
    data = str(model_dir.parent / "data.jsonl")
    sparse = tmp_path / "sparse"
    main(
        [
            "sparsify",
            str(model_dir),
            str(sparse),
            "--sparsity",
            "0.5",
            "--calibration",
            data,
            "--template",
            "{review}",
            "--seq-len",
            "16",
            "--num-samples",
            "8",
        ]
    )
    report = json.loads((sparse / "sparsity_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5)
    int4 = tmp_path / "int4"
    main(["quantize", str(sparse), str(int4), "--group-size", "16", "--keep-residual"])
    quantized = load_exported(int4)
    layer = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.bits == 4 and layer.group_size == 16
    assert layer.residual is not None and layer.residual.dtype == torch.int8
    assert torch.equal(
        layer.dequantize() == 0,
        AutoModelForCausalLM.from_pretrained(sparse).model.layers[0].self_attn.q_proj.weight == 0,
    )
    super_dir = tmp_path / "super"
    main(
        [
            "train",
            str(sparse),
            str(super_dir),
            "--data",
            data,
            "--template",
            "{review}",
            "--seq-len",
            "16",
            "--rank-choices",
            "4",
            "2",
            "--target-modules",
            "q_proj",
            "v_proj",
            "--sparse-adapter",
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--save-steps",
            "2",
        ]
    )
    stats = json.loads((super_dir / "nas_stats.json").read_text())
    assert len(stats["history"]) == 3 and (super_dir / "checkpoint-2").is_dir()
    search_dir = tmp_path / "search"
    main(
        [
            "search",
            str(super_dir),
            "--base",
            str(sparse),
            "--output",
            str(search_dir),
            "--data",
            data,
            "--template",
            "{review}",
            "--seq-len",
            "16",
            "--budget",
            "4",
            "--population",
            "2",
            "--num-samples",
            "8",
        ]
    )
    result = json.loads((search_dir / "search.json").read_text())
    assert len(result["evaluations"]) >= 4 and (search_dir / "search.png").is_file()
    out = tmp_path / "sub"
    main(
        [
            "export",
            str(super_dir),
            "--base",
            str(sparse),
            "--output",
            str(out),
            "--config",
            f"{search_dir / 'search.json'}:best",
        ]
    )
    merged = AutoModelForCausalLM.from_pretrained(out)
    sparse_model = AutoModelForCausalLM.from_pretrained(sparse)
    for name in ("q_proj", "v_proj"):
        got = getattr(merged.model.layers[0].self_attn, name).weight
        base = getattr(sparse_model.model.layers[0].self_attn, name).weight
        assert torch.equal(got == 0, base == 0) and not torch.equal(got, base)
    main(
        [
            "push",
            str(out),
            "me/tiny-sub",
            "--dry-run",
            "--local-dir",
            str(tmp_path / "card"),
            "--method",
            "shears",
            "--base-model",
            "me/tiny-base",
        ]
    )
    card = (tmp_path / "card" / "README.md").read_text()
    assert "hf-elastic" in card and "shears" in card.lower()
    assert "wrote" in capsys.readouterr().out


def test_clear_errors(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="is not a model folder"):
        main(["sparsify", str(tmp_path / "nope"), str(tmp_path / "x"), "--method", "magnitude", "--sparsity", "0.5"])
    with pytest.raises(SystemExit, match="is not an hf_elastic super-adapter"):
        main(["export", str(tmp_path), "--base", str(model_dir), "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"--template uses column 'text', but .* has \['review'\]"):
        main(["train", str(model_dir), str(tmp_path / "t"), "--data", str(model_dir.parent / "data.jsonl")])
    with pytest.raises(SystemExit) as exit_:
        main(["sparsify", str(model_dir), str(tmp_path / "s"), "--method", "magnitude", "--sparsity", "1.5"])
    assert exit_.value.code == 1 and "sparsity=1.5" in capsys.readouterr().err
