"""model_cards/: the card templates where a reader looks for them, and one card per demo method written from a real
run's JSON by scripts/build_model_cards.py."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData

from hf_elastic.export.model_card import TEMPLATE_PATH, check_model_card

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
cards = pytest.importorskip("build_model_cards")

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.]*\w)")
RUNS_ON_FILE = {m: p for m, p in cards.RUNS.items() if (cards.RESULTS / p).is_file()}


def test_the_card_template_lives_in_the_top_level_model_cards_folder():
    assert TEMPLATE_PATH == ROOT / "model_cards" / "templates" / "hf_elastic_card.md"
    assert TEMPLATE_PATH.is_file() and "{{ card_data }}" in TEMPLATE_PATH.read_text()
    # no copy inside the source package shadows it (setup.py puts one there in wheels only)
    assert not (ROOT / "src" / "hf_elastic" / "export" / "model_cards").exists()
    setup = (ROOT / "setup.py").read_text()
    assert 'PACKAGED_TEMPLATES = ("hf_elastic_card.md",)' in setup
    assert "include model_cards/templates/*.md" in (ROOT / "MANIFEST.in").read_text()


def test_committed_cards_are_what_their_runs_give():
    assert RUNS_ON_FILE, "no demo run on file"
    assert cards.main(["--check"]) == 0
    written = {p.stem for p in (ROOT / "model_cards").glob("*.md")}
    assert written == set(RUNS_ON_FILE), "a card per demo run on file, and no card without its run"


@pytest.mark.parametrize("method", sorted(RUNS_ON_FILE))
def test_card_metadata_validates(method):
    text = (ROOT / "model_cards" / f"{method}.md").read_text()
    data = check_model_card(text)  # the library's offline checks (ModelCard.validate() posts to the Hub)
    card = ModelCard(text)
    assert ModelCardData(**card.data.to_dict()).to_dict() == data
    run = json.loads((cards.RESULTS / RUNS_ON_FILE[method]).read_text())
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert method in data["tags"] and "hf-elastic" in data["tags"]
    (result,) = card.data.eval_results
    assert result.metric_type == "accuracy"
    assert result.metric_value == cards.headline(run)["accuracy"]


def _candidates(value, out: list[float]) -> None:
    """Every number a card may show from `value`: its numeric leaves, those in its strings, and `rows` ratios."""
    if isinstance(value, dict):
        for v in value.values():
            _candidates(v, out)
    elif isinstance(value, list):
        for v in value:
            _candidates(v, out)
    elif isinstance(value, str):
        out.extend(float(n) for n in NUMBER.findall(value))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out.extend((float(value), 100.0 * value))


def _allowed(run: dict) -> list[float]:
    out: list[float] = []
    _candidates(run, out)
    leaves = [v for row in run["rows"].values() for v in row.values() if isinstance(v, (int, float))]
    out += [a / b for a in leaves for b in leaves if b]  # speed-ups: one row's time against another's
    return out


def _matches(shown: str, allowed: list[float]) -> bool:
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    tolerance = 0.5 * 10**-decimals + 1e-9
    return any(abs(c - float(shown)) <= tolerance for c in allowed)


@pytest.mark.parametrize("method", sorted(RUNS_ON_FILE))
def test_every_figure_in_the_card_comes_from_its_run(method):
    run = json.loads((cards.RESULTS / RUNS_ON_FILE[method]).read_text())
    card = ModelCard((ROOT / "model_cards" / f"{method}.md").read_text())
    body = re.sub(r"\]\([^)]*\)", "]", card.text)  # link targets: paths and URLs
    body = body.replace("SmolLM2-135M-Instruct", "")  # the base model's name
    allowed = _allowed(run)
    figures = NUMBER.findall(body)
    assert len(figures) > 30, figures  # the tables are there
    assert [f for f in figures if not _matches(f, allowed)] == []
    assert f"{run['total_seconds']:g}" in body


def test_every_figure_check_catches_an_invented_number():
    run = json.loads((cards.RESULTS / cards.RUNS["lonas"]).read_text())
    allowed = _allowed(run)
    total, speedup = run["total_seconds"], next(iter(run["speedups"].values()))["speedup_batch"]
    accuracy = f"{run['rows']['max (PyTorch)']['accuracy']:.3f}"
    assert _matches(accuracy, allowed) and _matches(f"{total:g}", allowed) and _matches(f"{speedup:.2f}", allowed)
    assert not _matches("0.9137", allowed) and not _matches("4711", allowed)


def _sparse_run(method: str) -> dict:
    """A results file of the shape `run_demo` writes for Shears / SQFT (figures invented, for the card code only)."""
    lonas = json.loads((cards.RESULTS / cards.RUNS["lonas"]).read_text())
    config = lonas["config"] | {"method": method}
    timed = {"latency_ms": 1934.2, "decode_tok_s": 28.81, "size_mb": 513.16}
    rows = {
        "dense (zero-shot)": {"accuracy": 0.725, **timed, "params_m": 134.515008},
        "sparse base (zero-shot)": {"accuracy": 0.58, "sparsity": 0.4999},
        "sub-network (PyTorch)": {"accuracy": 0.79, **timed, "sparsity": 0.5001, "zeros_kept": 1.0},
        "sub-network (OpenVINO INT4)": {"accuracy": 0.69, "latency_ms": 858.4, "decode_tok_s": 59.37, "size_mb": 85.2,
                                        "sparsity": 0.5012},
    }  # fmt: skip
    seconds = {"load model and data": 0.0, "dense baseline": 51.3, "NAS training": 290.2, "search": 212.0}
    return {"config": config, "rows": rows, "best_subnet": {"0.rank.q_proj": 16}, "search": {"evaluated": 13,
            "front": 3}, "seconds": seconds, "total_seconds": 645.3, "hub_folder": "/tmp/x/hub"}  # fmt: skip


@pytest.mark.parametrize("method", ["shears", "sqft", "sqft-qa"])
def test_a_sparse_run_gets_a_card_with_its_figures(tmp_path, method):
    run = _sparse_run(method)
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(run))
    text = str(cards.build_card(method, str(path)))
    data = check_model_card(text)
    assert ModelCard(text).data.eval_results[0].metric_value == 0.69
    assert method.split("-")[0] in data["tags"]
    body = re.sub(r"\]\([^)]*\)", "]", ModelCard(text).text).replace("SmolLM2-135M-Instruct", "")
    body = body.replace(str(path), "")  # the results file's name, here a temporary path
    assert [f for f in NUMBER.findall(body) if not _matches(f, _allowed(run))] == []
    assert "| sub-network (OpenVINO INT4) | – | 0.690 | 0.501 | – | 858 | 59.4 | 85 |" in text
    assert "| sub-network (PyTorch) | – | 0.790 | 0.500 | 100.0% | 1934 | 28.8 | 513 |" in text
    assert "(`sub-network (OpenVINO INT4)`) scores 0.690 against 0.725 for the dense model in PyTorch fp32" in text
    assert "it scores a batch 2.25× and decodes 2.06× as fast, in 85 MB against 513 MB." in text
    assert "| Wanda sparsity of the base | 0.5 |" in text and "FFN width choices" not in text


def test_build_card_refuses_a_run_of_another_method():
    with pytest.raises(ValueError, match=r"amd-epyc-avx512/demo_lonas_ffn5.json is a run of --method lonas, not sqft"):
        cards.build_card("sqft", cards.RUNS["lonas"])


def test_add_run_files_a_run_under_this_machine_with_its_record(tmp_path):
    run = json.loads((cards.RESULTS / cards.RUNS["lonas"]).read_text())
    out = tmp_path / "demo"
    (out / "hub").mkdir(parents=True)
    (out / "demo_results.json").write_text(json.dumps(run))
    (out / "hub" / "README.md").write_text("---\nlicense: apache-2.0\n---\ncard\n")
    target = cards.add_run(out, results=tmp_path / "results")
    common = sys.modules["common"]  # benchmarks/common.py, imported by add_run
    slug = common.machine_slug({"machine": common.cpu_info()})
    assert target == tmp_path / "results" / slug / "demo_lonas.json"
    filed = json.loads(target.read_text())
    assert filed["rows"] == run["rows"] and filed["machine"]["cpu_model"] == common.cpu_info()["cpu_model"]
    assert (target.parent / "demo_lonas_hub_card.md").read_text().endswith("card\n")
    beside = cards.add_run(out, results=tmp_path / "results", name="seed1")
    assert beside == target.with_name("demo_lonas_seed1.json") and target.is_file()
    assert (target.parent / "demo_lonas_seed1_hub_card.md").is_file()
    with pytest.raises(ValueError, match=r"--name 'Seed 1' must be lowercase letters, digits and underscores"):
        cards.add_run(out, results=tmp_path / "results", name="Seed 1")
    run["config"]["quick"] = True
    (out / "demo_results.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match=r"is a --quick or --model-dir run; a card needs a run at the default sizes"):
        cards.add_run(out, results=tmp_path / "results")
    with pytest.raises(FileNotFoundError, match=r"pass the --output folder of a finished demo run"):
        cards.add_run(tmp_path, results=tmp_path / "results")
