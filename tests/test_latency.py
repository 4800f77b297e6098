"""The latency model: a per-layer lookup table of width choices, its predictions, validation and use in search."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ARCHS, peft_kwargs
from peft import get_peft_model

from hf_elastic import ElasticLoraConfig, FunctionEvaluator, SearchConfig, get_supernet, search_subnetworks
from hf_elastic.search import LatencyEvaluator, LatencyTable, PredictedLatencyEvaluator, remeasure, spearman

LLAMA = ARCHS["llama"]


@pytest.fixture(scope="module")
def supernet():
    torch.manual_seed(0)
    config = ElasticLoraConfig(
        rank_choices=[8, 4], ffn_width_choices=[1.0, 0.5, 0.25], head_choices=[1.0, 0.5], **peft_kwargs(LLAMA)
    )
    return get_supernet(get_peft_model(LLAMA.build(), config))


@pytest.fixture(scope="module")
def table(supernet):
    return LatencyTable.measure(supernet, batch_size=1, seq_len=16, repeats=3, warmup=1)


def test_table_covers_every_width_choice_and_round_trips(table, tmp_path):
    assert set(table.layers) == {"0.ffn", "1.ffn", "0.heads", "1.heads"}  # ranks do not enter
    assert {k: sorted(t, key=int) for k, t in table.layers.items()} == {
        "0.ffn": ["12", "24", "48"],
        "1.ffn": ["12", "24", "48"],
        "0.heads": ["2", "4"],
        "1.heads": ["2", "4"],
    }
    assert table.constant_ms > 0 and all(v > 0 for t in table.layers.values() for v in t.values())
    table.save(tmp_path / "latency.json")
    assert json.loads((tmp_path / "latency.json").read_text())["format"] == "hf_elastic.LatencyTable"
    loaded = LatencyTable.load(tmp_path / "latency.json")
    assert loaded == table
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=r"not a latency table of version 1.*LatencyTable.measure"):
        LatencyTable.load(tmp_path / "bad.json")


def test_predictions_are_positive_and_shrink_with_the_widths(supernet, table):
    space = supernet.space
    full = space.max_config()
    narrower = [full]
    for name in ("0.ffn", "1.ffn", "0.heads", "1.heads"):
        for choice in space[name].choices[1:]:
            narrower.append(narrower[-1] | {name: choice})
    predictions = [table.predict(c) for c in narrower]
    assert len(narrower) == 1 + 2 + 2 + 1 + 1
    assert all(p > 0 for p in predictions)
    assert all(a >= b for a, b in zip(predictions, predictions[1:], strict=False))
    assert table.predict(full) == pytest.approx(
        table.constant_ms + sum(t[max(t, key=int)] for t in table.layers.values())
    )
    assert table.predict(full | {"0.rank.up_proj+gate_proj": 4}) == table.predict(full)
    with pytest.raises(ValueError, match=r"no time for 0.ffn=30.*LatencyTable.measure"):
        table.predict(full | {"0.ffn": 30})


def test_validate_returns_finite_numbers_in_range(supernet, table):
    report = table.validate(supernet, 4, evaluator=LatencyEvaluator(batch_size=1, seq_len=16, warmup=1, repeats=3))
    assert -1.0 <= report["spearman"] <= 1.0 or math.isnan(report["spearman"])
    assert math.isfinite(report["mean_relative_error"]) and report["mean_relative_error"] >= 0
    assert len(report["predicted"]) == len(report["measured"]) == 4 and min(report["measured"]) > 0


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # ranks (0, 1.5, 1.5, 3) and (0, 1, 3, 2), both of mean 1.5: covariance 2.25 + 0.75 = 3 over sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 4, 3]) == pytest.approx(3 / math.sqrt(4.5 * 5))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_search_uses_the_predictor_and_remeasures_the_front(supernet, table):
    quality = FunctionEvaluator(lambda c: float(c["0.ffn"] + c["1.ffn"] + c["0.heads"]), "accuracy", "maximize")
    predicted = PredictedLatencyEvaluator(table)
    config = SearchConfig(strategy="random", objectives=("accuracy", "latency"), budget=6, seed=0, progress=False)
    result = search_subnetworks(supernet, [quality, predicted], config)
    assert result.objectives == ["accuracy", "latency"] and len(result.evaluations) == 6
    for e in result.evaluations:
        assert e.values["latency"] == table.predict(e.config)
    active = supernet.active_config
    again = remeasure(result, supernet, LatencyEvaluator(batch_size=1, seq_len=16, warmup=0, repeats=1))
    assert [e.key for e in again.evaluations] == [e.key for e in result.front]
    assert again.info["predicted"] == {e.key: e.values["latency"] for e in result.front}
    assert all(e.values["latency"] > 0 for e in again.evaluations) and supernet.active_config == active


def test_remeasure_interleaved_times_the_front_in_turns(supernet, table, monkeypatch):
    quality = FunctionEvaluator(lambda c: float(c["0.ffn"] + c["1.ffn"] + c["0.heads"]), "accuracy", "maximize")
    config = SearchConfig(strategy="random", objectives=("accuracy", "latency"), budget=6, seed=0, progress=False)
    result = search_subnetworks(supernet, [quality, PredictedLatencyEvaluator(table)], config)
    front, active = result.front, supernet.active_config
    timer = LatencyEvaluator(batch_size=1, seq_len=16, warmup=1, repeats=2)
    again = remeasure(result, supernet, timer, interleaved=True)  # sliced copies, held together
    assert [e.key for e in again.evaluations] == [e.key for e in front] and len(front) > 1
    assert all(e.values["latency"] > 0 for e in again.evaluations) and supernet.active_config == active
    order = []
    activate = type(supernet).activate
    monkeypatch.setattr(type(supernet), "activate", lambda self, c: (order.append(c), activate(self, c))[1])
    masked = LatencyEvaluator(batch_size=1, seq_len=16, warmup=1, repeats=2, extract=False)
    remeasure(result, supernet, masked, interleaved=True)
    configs = [e.config for e in front]
    assert order == configs * 3 + [active]  # one warm-up and two timed rounds, each over the whole front in turn
    with pytest.raises(ValueError, match=r"interleaved=True\) times in turns with a LatencyEvaluator only, not Func"):
        remeasure(result, supernet, FunctionEvaluator(lambda c: 1.0, "latency", "minimize"), interleaved=True)
