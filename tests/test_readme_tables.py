"""scripts/readme_tables.py: the README's result tables are what their JSON gives."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
tables = pytest.importorskip("readme_tables")
cards = pytest.importorskip("build_model_cards")
helpers = pytest.importorskip("table_helpers")


def test_readme_tables_match_their_json(capsys):
    assert tables.main(["--check"]) == 0
    assert f"{len(tables.TABLES)} README tables match their JSON" in capsys.readouterr().out


def test_a_hand_edited_figure_is_caught_and_rewritten(tmp_path, capsys):
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    assert "| peft LoRA r=32 | 221.8 | 1.000 | 898 | 1.000 |" in text
    readme.write_text(text.replace("| peft LoRA r=32 | 221.8 |", "| peft LoRA r=32 | 210.0 |"))
    assert tables.main(["--check", "--readme", str(readme)]) == 1
    assert "stale README tables (run scripts/readme_tables.py): nls_step" in capsys.readouterr().err
    assert tables.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == text


def test_markers_must_match_the_tables():
    text = (ROOT / "README.md").read_text()
    with pytest.raises(ValueError, match=r"marks tables \['nope'\] that scripts/readme_tables.py does not know"):
        tables.render(text + "\n<!-- table:nope -->\n| a |\n<!-- /table:nope -->\n")
    dropped = text.replace("<!-- table:peers -->\n", "").replace("<!-- /table:peers -->\n", "")
    with pytest.raises(ValueError, match=r"lacks the markers of tables \['peers'\]"):
        tables.render(dropped)


def test_demo_runs_table_has_a_row_per_run_on_file():
    rows = tables.demo_runs().splitlines()[2:]
    on_file = [m for m, p in cards.RUNS.items() if (helpers.RESULTS / p).is_file()]
    assert [r.split(" | ")[0].strip("| `") for r in rows] == on_file
    run = helpers.load(cards.RUNS["lonas"])
    lonas, latency = cards.headline(run), {name: row.get("latency_ms") for name, row in run["rows"].items()}
    assert lonas["name"] == "smallest useful (OpenVINO INT8)" and lonas["reference"] == "max (OpenVINO INT8)"
    assert lonas["speedup"] == pytest.approx(latency["max (OpenVINO INT8)"] / latency[lonas["name"]])


def test_seed_rows_give_a_gain_per_column_and_a_dash_where_a_width_is_missing():
    def entry(**means):
        return {
            "runs": {"0": {}, "1": {}},
            "summary": {k: {"mean": m, "std": 0.01, "sem": 0.03} for k, m in means.items()},
        }

    results = {"base": entry(a=0.60, b=0.50), "new": entry(a=0.65, b=0.49), "old": entry(b=0.55)}
    rows = helpers.seed_rows(results, {"base": "B", "new": "N", "old": "O"}, ("a", "b"), "base", ("a", "b"))
    assert rows == [
        ["B", "2", "0.600 ± 0.010", "0.500 ± 0.010", "–", "–"],
        ["N", "2", "0.650 ± 0.010", "0.490 ± 0.010", "+5.0 (SE 4.2)", "-1.0 (SE 4.2)"],
        ["O", "2", "–", "0.550 ± 0.010", "–", "+5.0 (SE 4.2)"],
    ]
