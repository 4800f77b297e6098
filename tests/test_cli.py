"""The `hf-elastic` command line on a tiny saved Llama: sparsify → train → search → export → push --dry-run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ARCHS, hub_dataset_cache, hub_model_cache, random_llama
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hf_elastic import QuantLinear, get_supernet, load_exported, load_super_network
from hf_elastic.cli import build_parser, main
from hf_elastic.nas import Dimension, SearchSpace
from hf_elastic.search import Evaluation, SearchResult

WORDS = ["the", "a", "good", "bad", "food", "taste", "great", "other", "was", "is", "not", "very", "and", "it"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def save_model_and_data(path, model) -> None:
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    data = path.parent / "data.jsonl"
    g = torch.Generator().manual_seed(0)
    rows = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g)) for _ in range(24)]
    data.write_text("".join(json.dumps({"review": r}) + "\n" for r in rows))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "base"
    save_model_and_data(path, ARCHS["llama"].build())
    return path


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """Hidden size 96 (FFN 192): like SmolLM2's 576, not a multiple of 128 (nor here of 64)."""
    path = tmp_path_factory.mktemp("cli_wide") / "base"
    save_model_and_data(path, random_llama(3 + len(WORDS), 96, 192, pad_token_id=0, eos_token_id=2))
    return path


def test_every_subcommand_has_help(capsys):
    for command in ("sparsify", "quantize", "train", "search", "export", "extract", "push", "demo"):
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
            "5",
            "--population",
            "2",
            "--num-samples",
            "8",
        ]
    )
    result = json.loads((search_dir / "search.json").read_text())
    assert len(result["evaluations"]) == 5 and (search_dir / "search.png").is_file()
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


def test_group_size_defaults_rank_groups_extract_and_inferred_method(wide_model_dir, tmp_path, capsys):
    base, data = str(wide_model_dir), str(wide_model_dir.parent / "data.jsonl")
    main(["quantize", base, str(tmp_path / "int4")])
    assert "group size 32: the largest of 128/64/32 that divides every quantized input size" in capsys.readouterr().out
    assert {m.group_size for m in load_exported(tmp_path / "int4").modules() if isinstance(m, QuantLinear)} == {32}

    super_dir = tmp_path / "super"
    main(["train", base, str(super_dir), "--data", data, "--template", "{review}", "--seq-len", "16", "--max-steps",
          "2", "--batch-size", "4", "--rank-choices", "4", "2", "--target-modules", "q_proj", "v_proj", "up_proj",
          "--rank-groups", "q_proj,v_proj", "up_proj"])  # fmt: skip
    elastic = json.loads((super_dir / "elastic_config.json").read_text())
    assert elastic["rank_groups"] == [["q_proj", "v_proj"], ["up_proj"]]
    with pytest.raises(SystemExit) as exit_:
        main(["train", base, str(tmp_path / "t"), "--data", data, "--rank-groups", "q_proj,,v_proj"])
    assert exit_.value.code == 1  # a usage error: one error line, status 1
    assert "--rank-groups: 'q_proj,,v_proj' is not a comma-separated list of module" in capsys.readouterr().err
    supernet = get_supernet(load_super_network(AutoModelForCausalLM.from_pretrained(base), super_dir))
    assert [d.name for d in supernet.space] == [f"{i}.rank.{g}" for i in (0, 1) for g in ("q_proj+v_proj", "up_proj")]

    sub = tmp_path / "sub"
    chosen = supernet.space.max_config() | {"0.rank.q_proj+v_proj": 2}
    main(["extract", str(super_dir), "--base", base, "--output", str(sub), "--config", json.dumps(chosen)])
    assert json.loads((sub / "elastic_subnet.json").read_text())["config"] == chosen
    assert (sub / "tokenizer.json").is_file() and f"wrote {sub}" in capsys.readouterr().out
    supernet.activate(chosen)
    ids = torch.randint(3, 3 + len(WORDS), (2, 8), generator=torch.Generator().manual_seed(3))
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), sub)
    with torch.no_grad():
        assert (stock(input_ids=ids).logits - supernet.model(input_ids=ids).logits).abs().max() <= 1e-5
    with pytest.raises(SystemExit):
        main(["extract", str(super_dir), "--base", base, "--output", str(sub)])
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err

    out = tmp_path / "merged"
    export = ["export", str(super_dir), "--base", base, "--output", str(out), "--config", "min"]
    if importlib.util.find_spec("openvino") is not None:
        main(export + ["--openvino", "--weight-format", "int4"])
        printed = capsys.readouterr().out
        assert (
            "OpenVINO INT4 group size 32: the largest of 128/64/32 that divides every quantized input size" in printed
        )
        from hf_elastic.export.openvino_ir import ir_weights

        weights = ir_weights(tmp_path / "merged-openvino")
        assert weights["self.model.layers.0.mlp.down_proj.weight"].scales.shape == (96, 6, 1)  # 192 inputs / 32
        assert weights["self.model.layers.0.self_attn.q_proj.weight"].scales.shape == (96, 3, 1)
        card_source = tmp_path / "merged-openvino"
        assert (card_source / "elastic_subnet.json").is_file()
    else:
        main(export)
        card_source = out
    main(
        [
            "push",
            str(card_source),
            "me/tiny",
            "--base-model",
            "me/base",
            "--dry-run",
            "--local-dir",
            str(tmp_path / "c"),
        ]
    )
    assert "| Method | NLS |" in (tmp_path / "c" / "README.md").read_text()  # inferred: NLSConfig without sparsity


def instruction_rows(path, n: int = 24) -> str:
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        words = " ".join(WORDS[j] for j in torch.randint(0, 6, (6,), generator=g))
        rows.append({"prompt": f"the food was {words} it was", "completion": " good" if i % 2 else " bad"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_instruction_data_lonas_widths_and_task_search(model_dir, tmp_path, capsys):
    data = instruction_rows(tmp_path / "sft.jsonl")
    super_dir = tmp_path / "lonas"
    train = ["train", str(model_dir), str(super_dir), "--data", data, "--eval-data", data, "--eval-samples", "8"]
    train += ["--method", "elastic_lora", "--ffn-width-choices", "1.0", "0.5", "--head-choices", "1.0", "0.5"]
    train += ["--reorder", "magnitude", "--rank-choices", "4", "2", "--target-modules", "q_proj", "v_proj"]
    train += ["--max-steps", "4", "--eval-steps", "2", "--batch-size", "4", "--bf16", "--gradient-checkpointing"]
    train += ["--warmup-ratio", "0.25", "--lr-scheduler", "cosine", "--seq-len", "24", "--save-steps", "4"]
    main(train)
    printed = capsys.readouterr().out
    assert all(f"eval_{name}_loss=" in printed for name in ("median", "max", "min"))
    elastic = json.loads((super_dir / "elastic_config.json").read_text())
    assert elastic["ffn_width_choices"] == [1.0, 0.5] and elastic["head_choices"] == [1.0, 0.5]
    assert sorted(elastic["channel_order"]) == ["0.ffn", "0.heads", "1.ffn", "1.heads"]
    state = json.loads((super_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_median_loss" in e] == [2, 4]

    search_dir = tmp_path / "acc"
    search = ["search", str(super_dir), "--base", str(model_dir), "--output", str(search_dir), "--data", data]
    main(search + ["--metric", "accuracy", "--label-words", "bad", "good", "--budget", "5", "--population", "2"])
    result = json.loads((search_dir / "search.json").read_text())
    assert result["objectives"] == ["accuracy", "params"]
    values = [e["values"]["accuracy"] for e in result["evaluations"]]
    assert len(values) == 5 and all(v in {i / 24 for i in range(25)} for v in values)

    out = tmp_path / "sub"
    main(["export", str(super_dir), "--base", str(model_dir), "--output", str(out), "--config",
          str(search_dir / "search.json"), "--select", "best_under:params:0.9"])  # fmt: skip
    chosen = json.loads((out / "elastic_subnet.json").read_text())
    assert chosen["params"] <= 0.9 * chosen["max"]["params"]

    em_dir = tmp_path / "em"
    main(["search", str(super_dir), "--base", str(model_dir), "--output", str(em_dir), "--data", data, "--strategy",
          "median", "--metric", "exact-match", "--answer-regex", "(good|bad)", "--max-new-tokens", "2"])  # fmt: skip
    em = json.loads((em_dir / "search.json").read_text())
    assert em["objectives"][0] == "exact_match" and 0.0 <= em["evaluations"][0]["values"]["exact_match"] <= 1.0


def test_unknown_hub_id_offline_is_one_error_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit):
        main(["sparsify", "acme/absent", str(tmp_path / "x"), "--method", "magnitude", "--sparsity", "0.5"])
    assert capsys.readouterr().err.startswith("error: Could not load 'acme/absent'")


def test_hub_ids_for_model_and_data_offline(tmp_path):
    """The Hub-id code paths, run as a user would: `hf-elastic` in a fresh process with HF_HUB_OFFLINE=1."""
    hub_model_cache(tmp_path / "hub", "acme/tiny-llama", {"main": 1})
    tokenizer_dir = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / f"{1:040x}"
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>").save_pretrained(
        tokenizer_dir
    )
    rows = [{"prompt": "the food was", "completion": " good"}, {"prompt": "it was", "completion": " bad"}] * 4
    hub_dataset_cache(tmp_path / "datasets", "acme/tiny-sft", {"train": rows})
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
                        "HF_DATASETS_CACHE": str(tmp_path / "datasets")}  # fmt: skip
    cli = [sys.executable, "-m", "hf_elastic"]
    sparse = tmp_path / "sparse"
    run = subprocess.run(
        [*cli, "sparsify", "acme/tiny-llama", str(sparse), "--method", "magnitude", "--sparsity", "0.5",
         "--dtype", "float32"], env=env, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads((sparse / "sparsity_report.json").read_text())["sparsity"] == pytest.approx(0.5)
    run = subprocess.run(
        [*cli, "train", "acme/tiny-llama", str(tmp_path / "t"), "--data", "acme/tiny-sft", "--max-steps", "1",
         "--rank-choices", "4", "2", "--target-modules", "q_proj", "--batch-size", "2"], env=env, capture_output=True,
        text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "t" / "adapter_model.safetensors").is_file()


ERRORS = [
    (
        ["sparsify", "{tmp}/nope", "{tmp}/x", "--method", "magnitude", "--sparsity", "0.5"],
        r"nope is neither a model folder nor a Hub model id",
    ),
    (["sparsify", "{model}", "{tmp}/s", "--method", "magnitude", "--sparsity", "1.5"], r"sparsity=1.5"),
    (["export", "{tmp}/plain", "--base", "{model}", "--output", "{tmp}/o"], r"is not an hf_elastic super-adapter"),
    (["export", "{adapter}", "--base", "{model}", "--output", "{adapter}/sub"], r"--output .*/sub overlaps the input"),
    (
        ["export", "{adapter}", "--base", "{model}", "--output", "{full}"],
        r"--output .* exists and is not empty; pass --overwrite",
    ),
    (
        ["sparsify", "{model}", "{model}", "--method", "magnitude", "--sparsity", "0.5"],
        r"output .* overlaps the input",
    ),
    (["quantize", "{model}", "{full}"], r"output .* exists and is not empty; pass --overwrite"),
    (["train", "{model}", "{tmp}/t", "--data", "{data}", "--seq-len", "0"], r"argument --seq-len: 0 must be > 0"),
    (
        ["train", "{model}", "{tmp}/t", "--data", "{data}", "--max-steps", "-1"],
        r"argument --max-steps: -1 must be > 0",
    ),
    (["train", "{model}", "{tmp}/t", "--data", "{data}", "--save-steps", "0"], r"argument --save-steps"),
    (["train", "{model}", "{tmp}/t", "--data", "{data}", "--gradient-accumulation-steps", "0"], r"must be > 0"),
    (["train", "{model}", "{tmp}/t", "--data", "{data}", "--lora-alpha", "0"], r"argument --lora-alpha"),
    (["search", "{adapter}", "--base", "{model}", "--output", "{tmp}/o", "--num-samples", "-1"], r"--num-samples"),
    (["train", "{model}", "{tmp}/t", "--data", "{empty}"], r"holds no rows"),
    (["sparsify", "{broken}", "{tmp}/x", "--sparsity", "0.5"], r"config.json"),
    (
        ["export", "{adapter}", "--base", "{model}", "--output", "{tmp}/o", "--config", "{badsearch}"],
        r"is not a search result written by hf_elastic",
    ),
    (["train", "{model}", "{tmp}/t", "--data", "{data}"], r"columns \['review'\] have no 'messages'.*--template"),
    (
        ["train", "{model}", "{tmp}/t", "--data", "{data}", "--template", "{{review}}", "--bf16", "--fp16"],
        r"--bf16 and --fp16 exclude each other",
    ),
    (
        ["train", "{model}", "{tmp}/t", "--data", "{data}", "--template", "{{review}}", "--ffn-width-choices", "0.5"],
        r"--ffn-width-choices need --method elastic_lora",
    ),
    (
        ["train", "{model}", "{tmp}/t", "--data", "{data}", "--template", "{{review}}", "--eval-steps", "2"],
        r"--eval-steps needs evaluation data",
    ),
    (["train", "{model}", "{tmp}/t", "--data", "{tmp}/none.jsonl"], r"--data .*none.jsonl does not exist"),
    (
        ["train", "{model}", "{tmp}/t", "--data", "{data}", "--template", "{{review}}", "--response-template", "XYZ"],
        r"--response-template 'XYZ' does not occur",
    ),
    (
        [
            "train",
            "{model}",
            "{tmp}/t",
            "--data",
            "{data}",
            "--template",
            "{{review}}",
            "--dtype",
            "float32",
            "--revision",
            "v1",
        ],
        r"--revision v1 applies to Hub ids; .* is a local folder",
    ),
    (
        ["export", "{adapter}", "--base", "{model}", "--output", "{tmp}/o", "--weight-format", "int4"],
        r"--weight-format int4 applies to the OpenVINO IR; add --openvino",
    ),
    (
        ["export", "{adapter}", "--base", "{model}", "--output", "{tmp}/o", "--fp32-embeddings"],
        r"--fp32-embeddings applies to the OpenVINO IR; add --openvino",
    ),
    (
        [
            "export",
            "{adapter}",
            "--base",
            "{model}",
            "--output",
            "{tmp}/o",
            "--openvino",
            "--weight-format",
            "int8",
            "--group-size",
            "32",
        ],
        r"--group-size 32 applies to --weight-format int4 \(got int8\); drop it",
    ),  # fmt: skip
    (
        ["push", "{tmp}", "me/x", "--base-model", "me/base", "--dry-run"],
        r"holds no sub-network artefact",
    ),
    (
        ["export", "{adapter}", "--base", "{model}", "--output", "{tmp}/o", "--config", "{{bad"],
        r"--config '\{bad' is not valid JSON",
    ),
    (
        ["export", "{adapter}", "--base", "{model}", "--output", "{tmp}/o", "--config", "{search}:abc"],
        r"use .*search.json:best or .*:<index of an evaluation>",
    ),
    (
        ["export", "{adapter}", "--base", "{model}", "--output", "{tmp}/o", "--config", "{search}:7"],
        r"has 2 evaluations, numbered 0 to 1",
    ),
    (
        [
            "export",
            "{adapter}",
            "--base",
            "{model}",
            "--output",
            "{tmp}/o",
            "--config",
            "{search}",
            "--select",
            "bad",
        ],
        r"--select 'bad': use 'best' or 'best_under:<cost>:<fraction>'",
    ),
    (
        ["search", "{tmp}", "--base", "{model}", "--output", "{tmp}/o", "--metric", "accuracy"],
        r"is not an hf_elastic super-adapter",
    ),
]


@pytest.mark.parametrize(("argv", "message"), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_clear_errors(model_dir, tmp_path, capsys, argv, message):
    space = SearchSpace([Dimension("r", "rank", (4, 2))])
    rows = enumerate([(4, 10.0), (2, 5.0)])
    evaluations = [Evaluation(i, str(i), {"r": r}, {"loss": 1.0, "params": p}, ["random"]) for i, (r, p) in rows]
    search = SearchResult(space, ["loss", "params"], ["minimize", "minimize"], evaluations, "random").to_json(
        tmp_path / "search.json"
    )
    adapter, full = tmp_path / "super", tmp_path / "full"
    for folder in (adapter, full, tmp_path / "plain"):
        folder.mkdir()
    (adapter / "elastic_config.json").write_text("{}")
    (full / "keep.txt").write_text("do not lose me")
    fields = {"tmp": tmp_path, "model": model_dir, "data": model_dir.parent / "data.jsonl", "search": search}
    fields |= {"adapter": adapter, "full": full, "empty": tmp_path / "empty.jsonl", "broken": tmp_path / "broken"}
    fields["badsearch"] = tmp_path / "bad_search.json"
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "bad_search.json").write_text(json.dumps({"evaluations": [{"config": {}}]}))
    with pytest.raises(SystemExit) as exit_:
        main([a.format(**fields) for a in argv])
    err = capsys.readouterr().err
    assert (full / "keep.txt").read_text() == "do not lose me"
    assert exit_.value.code == 1 and err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err
