"""Sub-network search: evaluators, heuristics, random and NSGA-II search, results, entry points and bad input."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import sys
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import ARCHS, fresh, llama_for, peft_kwargs
from datasets import Dataset
from peft import get_peft_model

from hf_elastic import (
    CountEvaluator,
    Dimension,
    ElasticLoraConfig,
    Evaluator,
    FunctionEvaluator,
    LatencyEvaluator,
    LMEvalEvaluator,
    LossEvaluator,
    MetricEvaluator,
    NASTrainer,
    NASTrainingArguments,
    NLSConfig,
    PerplexityEvaluator,
    SearchSpace,
    get_supernet,
)
from hf_elastic.data import encode_text
from hf_elastic.devices import free_memory
from hf_elastic.search import (
    STRATEGIES,
    ExactMatchEvaluator,
    LabelWordEvaluator,
    SearchConfig,
    SearchResult,
    activation_importance,
    extract_answer,
    hypervolume_2d,
    loss_based_config,
    pareto_front,
    search_subnetworks,
)
from hf_elastic.search.scoring import extraction_bytes, scores_extracted

LLAMA = ARCHS["llama"]
QUIET = {"progress": False}


@pytest.fixture(scope="module")
def llama():
    return LLAMA.build()


@pytest.fixture(scope="module")
def batches():
    return [LLAMA.batch(i) for i in range(2)]


def elastic_model(base, init_lora_weights: bool = False):
    torch.manual_seed(0)
    config = ElasticLoraConfig(
        **peft_kwargs(LLAMA, rank_choices=[8, 6, 4], rank_groups=LLAMA.rank_groups),
        init_lora_weights=init_lora_weights,
        ffn_width_choices=[1.0, 0.75, 0.5],
        head_choices=[1.0, 0.5],
    )
    return get_peft_model(fresh(base), config)


def nls_model(base):
    torch.manual_seed(0)
    groups = LLAMA.rank_groups
    config = NLSConfig(
        **peft_kwargs(LLAMA, rank_choices=[8, 6, 4], rank_groups=groups, init_lora_weights=False),
        nls_target_modules=[m for g in groups for m in g],
    )
    return get_peft_model(fresh(base), config)


@pytest.fixture(scope="module")
def supernet(llama):
    return get_supernet(elastic_model(llama))


def synthetic_space(n: int = 8, choices=(16, 12, 8, 4)) -> SearchSpace:
    return SearchSpace([Dimension(f"{i}.rank.x", "rank", tuple(choices)) for i in range(n)])


def dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_returns_valid_configs(supernet, batches, strategy):
    stats = {"config_losses": {".".join(["0"] * len(supernet.space)): {"mean_loss": 1.0, "count": 1}}}
    result = search_subnetworks(
        supernet,
        LossEvaluator(batches),
        strategy,
        budget=6,
        population=3,
        seed=1,
        nas_stats=stats,
        reference_subnets=(),
        **QUIET,
    )
    assert result.objectives == ["loss", "params"] and result.directions == ["minimize", "minimize"]
    expected = {"nsga2": 6, "random": 6, "predictor": 6, "uniform": len(supernet.space.uniform_configs())}.get(
        strategy, 1
    )
    assert len(result.evaluations) == expected
    for e in result.evaluations:
        assert supernet.space.validate(e.config) == e.config
        assert e.sources == [strategy]
        assert e.values["params"] == supernet.count(e.config)["params"]
        assert math.isfinite(e.values["loss"]) and e.values["loss"] > 0
    if strategy in ("max", "min", "median"):
        assert result.evaluations[0].config == getattr(supernet.space, f"{strategy}_config")()
    if strategy == "uniform":
        assert [e.config for e in result.evaluations] == supernet.space.uniform_configs()
    assert supernet.active_config == supernet.space.max_config()  # restored


def test_losses_match_direct_forward(supernet, batches):
    result = search_subnetworks(
        supernet, LossEvaluator(batches), "random", budget=3, seed=0, reference_subnets=(), **QUIET
    )
    for e in result.evaluations:
        supernet.activate(e.config)
        with torch.no_grad():
            direct = sum(supernet.model(**b).loss.item() for b in batches) / len(batches)
        assert e.values["loss"] == pytest.approx(direct, rel=1e-6)
    supernet.activate("max")


def test_nsga2_front_is_non_dominated_and_reproducible():
    space = synthetic_space()

    def loss(config):  # small sub-networks are worse, with some structure per dimension
        idx = space.encode(config)
        return sum((i + 1) ** 2 * (k % 3 + 1) for k, i in enumerate(idx)) / 10

    def size(config):
        return float(sum(config.values()))

    evaluators = [FunctionEvaluator(loss, "loss"), FunctionEvaluator(size, "params")]
    run = [search_subnetworks(space, evaluators, budget=60, population=12, seed=seed, **QUIET) for seed in (0, 0, 1)]
    first, again, other = run
    assert [(e.key, e.values) for e in first.evaluations] == [(e.key, e.values) for e in again.evaluations]
    assert [e.key for e in first.evaluations] != [e.key for e in other.evaluations]
    assert len(first.evaluations) == 60 and len(first.by_source("nsga2")) == 60 - 3  # the budget holds the references

    front = first.front
    vec = {e.key: [e.values["loss"], e.values["params"]] for e in first.evaluations}
    assert len(front) >= 3
    for f in front:
        assert not any(dominates(vec[e.key], vec[f.key]) for e in first.evaluations)
    front_keys = {f.key for f in front}
    for e in first.evaluations:
        if e.key not in front_keys:
            assert any(dominates(vec[f], vec[e.key]) for f in front_keys)
    assert space.max_config() in [f.config for f in front]  # lowest loss
    assert space.min_config() in [f.config for f in front]  # fewest params


def test_nsga2_finds_a_known_optimum_that_random_misses():
    space = synthetic_space()
    target = [1, 3, 0, 2, 1, 0, 3, 2]

    def dist(config):
        return float(sum(abs(i - t) for i, t in zip(space.encode(config), target, strict=True)))

    kwargs = {"budget": 200, "population": 20, "seed": 0, "reference_subnets": (), **QUIET}
    best = search_subnetworks(space, FunctionEvaluator(dist, "dist"), "nsga2", **kwargs).best()
    assert best.values["dist"] == 0.0
    assert space.encode(best.config) == target
    assert search_subnetworks(space, FunctionEvaluator(dist, "dist"), "random", **kwargs).best().values["dist"] > 0


def test_evaluator_is_called_once_per_distinct_config():
    space = synthetic_space(2, (8, 4, 2))  # 9 sub-networks
    calls: list[tuple] = []

    def score(config):
        calls.append(tuple(config.values()))
        return float(sum(config.values()))

    result = search_subnetworks(space, FunctionEvaluator(score), budget=20, population=4, seed=0, **QUIET)
    assert len(calls) == len(set(calls)) == len(result.evaluations) == 9  # space exhausted, nothing evaluated twice
    assert result.info["cache_hits"] > 0 and result.info["trials"] > 9 - 3
    assert {e.key for e in result.evaluations} == {f"{a}.{b}" for a in range(3) for b in range(3)}
    max_record = next(e for e in result.evaluations if e.key == "0.0")
    assert max_record.sources[0] == "max"  # evaluated as reference first; later proposals hit the cache
    calls.clear()
    result = search_subnetworks(space, FunctionEvaluator(score), "random", budget=4, seed=0, **QUIET)
    assert len(calls) == 4 == len(result.evaluations)  # 3 references + 1 random: the budget includes the references
    assert [e.sources[0] for e in result.evaluations] == ["max", "min", "median", "random"]


def test_budget_counts_the_reference_subnetworks():
    space = synthetic_space(4, (8, 4, 2))  # 81 sub-networks
    calls = []

    def score(config):
        calls.append(config)
        return float(sum(config.values()))

    result = search_subnetworks(space, FunctionEvaluator(score), budget=7, population=4, seed=0, **QUIET)
    assert len(calls) == len(result.evaluations) == 7
    assert [e.sources[0] for e in result.evaluations[:3]] == ["max", "min", "median"]
    assert len(result.by_source("nsga2")) == 4


def test_uniform_ladder_steps_every_dimension_together():
    space = SearchSpace(
        [Dimension("0.ffn", "ffn", (1536, 1152, 960, 768)), Dimension("0.rank.x", "rank", (16, 12, 8)),
         Dimension("1.heads", "heads", (9, 6)), Dimension("1.rank.x", "rank", (16,))]
    )  # fmt: skip
    ladder = space.uniform_configs()
    assert [list(c.values()) for c in ladder] == [
        [1536, 16, 9, 16],
        [1152, 12, 9, 16],
        [960, 12, 6, 16],
        [768, 8, 6, 16],
    ]
    assert ladder[0] == space.max_config() and ladder[-1] == space.min_config()
    assert synthetic_space(3, (8, 4)).uniform_configs() == [{f"{i}.rank.x": c for i in range(3)} for c in (8, 4)]
    fixed = SearchSpace([Dimension("a", "rank", (8,))])
    assert fixed.uniform_configs() == [{"a": 8}]


def test_uniform_reference_adds_the_ladder_once():
    space = synthetic_space(4, (16, 12, 8, 4))  # ladder: max, 12 (the median), 8, min
    calls = []

    def score(config):
        calls.append(config)
        return float(sum(config.values()))

    refs = ("max", "min", "median", "uniform")
    result = search_subnetworks(space, FunctionEvaluator(score), "random", budget=6, reference_subnets=refs, **QUIET)
    assert len(calls) == 6 == len(result.evaluations)  # 4 distinct references (max, min and median are rungs) + 2
    sources = [["max", "uniform"], ["min", "uniform"], ["median", "uniform"], ["uniform"]]
    assert [e.sources for e in result.evaluations[:4]] == sources
    assert result.evaluations[3].config == {f"{i}.rank.x": 8 for i in range(4)}
    assert len(result.by_source("random")) == 2


# ---------------------------------------------------------------------------------------------------- heuristics
def test_loss_based_picks_smallest_choice_within_tolerance():
    space = SearchSpace([Dimension("a", "rank", (8, 4)), Dimension("b", "rank", (8, 4))])
    stats = {
        "search_space": space.to_dict(),
        "config_losses": {
            "0.0": {"mean_loss": 1.0, "count": 3},
            "0.1": {"mean_loss": 2.0, "count": 1},
            "1.0": {"mean_loss": 1.01, "count": 1},
            "1.1": {"mean_loss": 2.01, "count": 3},
        },
    }
    # count-weighted marginals: a=8: (3 * 1 + 2) / 4 = 1.25, a=4: (1.01 + 3 * 2.01) / 4 = 1.76,
    # b=8: (3 * 1 + 1.01) / 4 = 1.0025, b=4: (2 + 3 * 2.01) / 4 = 2.0075 (unweighted, a=4 would be within 1 %)
    assert loss_based_config(space, stats, tolerance=0.01) == {"a": 8, "b": 8}
    assert loss_based_config(space, stats, tolerance=0.5) == {"a": 4, "b": 8}  # 1.76 <= 1.25 * 1.5
    assert loss_based_config(space, stats, tolerance=2.0) == {"a": 4, "b": 4}
    result = search_subnetworks(space, FunctionEvaluator(lambda c: 0.0), "loss_based", nas_stats=stats, **QUIET)
    assert result.by_source("loss_based")[0].config == {"a": 8, "b": 8}

    other = SearchSpace([Dimension("a", "rank", (8, 2)), Dimension("b", "rank", (8, 4))])
    with pytest.raises(ValueError, match="different search space"):
        loss_based_config(other, stats)
    with pytest.raises(ValueError, match="needs training statistics"):
        search_subnetworks(space, FunctionEvaluator(lambda c: 0.0), "loss_based", **QUIET)


def test_activation_importance_measures_rank_slices(llama, batches):
    model = nls_model(llama)
    sn = get_supernet(model)
    qkv, down, up = "0.rank.q_proj+k_proj+v_proj", "0.rank.down_proj", "0.rank.up_proj+gate_proj"
    with torch.no_grad():
        for name, module in sn.lora_modules.items():
            b = module.lora_B["default"].weight
            if name.startswith("model.layers.0.") and name.endswith(("q_proj", "k_proj", "v_proj")):
                b[:, 4:] = 0  # components 4..7 add nothing: rank 4 keeps everything
            if name.endswith("layers.0.mlp.down_proj"):
                b[:, 6:] = 0
                b[:, 4:6] *= 50  # rank 4 loses almost everything, rank 6 keeps everything
    inputs = {}
    target = sn.lora_modules["model.layers.0.mlp.up_proj"]
    handle = target.register_forward_hook(lambda m, a, o: inputs.setdefault("x", []).append(a[0].detach()))
    fractions = activation_importance(sn, batches)
    handle.remove()
    assert fractions[qkv] == {8: 1.0, 6: pytest.approx(1.0), 4: pytest.approx(1.0)}
    assert fractions[down][6] == pytest.approx(1.0) and fractions[down][4] < 0.01

    # independent computation for one group member: energy_j = ||B_j||^2 * sum_t (A_j x_t)^2
    def energies(module, xs):
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        z = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) @ a.T
        return z.pow(2).sum(0) * b.pow(2).sum(0) * module.scaling["default"] ** 2

    gate = sn.lora_modules["model.layers.0.mlp.gate_proj"]
    e = energies(target, inputs["x"]) + energies(gate, inputs["x"])
    assert fractions[up][6] == pytest.approx((e[:6].sum() / e.sum()).item(), rel=1e-4)
    assert fractions[up][4] == pytest.approx((e[:4].sum() / e.sum()).item(), rel=1e-4)

    result = search_subnetworks(sn, LossEvaluator(batches), "activation_based", activation_threshold=0.9, **QUIET)
    config = result.by_source("activation_based")[0].config
    assert config[qkv] == 4 and config[down] == 6
    for name, by_choice in fractions.items():  # every other dimension: smallest choice that keeps >= 90 %
        assert config[name] == min(c for c, f in by_choice.items() if f >= 0.9 - 1e-9)
    assert sn.active_config == sn.space.max_config()


def test_activation_based_width_uses_kept_channels(llama, batches):
    model = elastic_model(llama, init_lora_weights=True)  # B = 0: adapters add no energy
    sn = get_supernet(model)
    layer0 = "base_model.model.model.layers.0"
    with torch.no_grad():
        model.get_submodule(f"{layer0}.mlp.down_proj").base_layer.weight[:, 24:] = 0
        model.get_submodule(f"{layer0}.self_attn.o_proj").base_layer.weight[:, 16:] = 0  # key/value group 1
    fractions = activation_importance(sn, batches)
    assert fractions["0.ffn"][24] == pytest.approx(1.0) and fractions["0.heads"][2] == pytest.approx(1.0)
    assert fractions["1.ffn"][24] < 0.9 and fractions["1.heads"][2] < 0.9
    assert fractions["0.rank.down_proj"] == {8: 1.0, 6: 1.0, 4: 1.0}
    config = (
        search_subnetworks(sn, LossEvaluator(batches), "activation_based", **QUIET)
        .by_source("activation_based")[0]
        .config
    )
    assert config["0.ffn"] == 24 and config["0.heads"] == 2 and config["1.heads"] == 4
    assert config["0.rank.down_proj"] == 4  # no energy: the smallest rank

    # with trained adapters the down projection's energy uses the merged weight W + scaling * B @ A
    sn = get_supernet(elastic_model(llama))
    down = sn.model.get_submodule(f"{layer0}.mlp.down_proj")
    inputs = []
    handle = down.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, 48)))
    fractions = activation_importance(sn, batches)
    handle.remove()
    merged = (
        down.base_layer.weight
        + down.scaling["default"] * down.lora_B["default"].weight @ down.lora_A["default"].weight
    )
    e = torch.cat(inputs).pow(2).sum(0) * merged.detach().pow(2).sum(0)
    assert fractions["0.ffn"][36] == pytest.approx((e[:36].sum() / e.sum()).item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------------- results
def fully_enumerated_result(tmp_path=None) -> tuple[SearchResult, SearchSpace]:
    space = synthetic_space(3, (8, 4, 2))  # 27 sub-networks, a budget of 40 covers them all

    def loss(config):
        return sum(1.0 / v for v in config.values()) + 0.01 * config["0.rank.x"]

    evaluators = [FunctionEvaluator(loss, "loss"), FunctionEvaluator(lambda c: float(sum(c.values())), "params")]
    return search_subnetworks(space, evaluators, "random", budget=40, seed=0, **QUIET), space


def test_best_under_and_pareto_helpers():
    result, space = fully_enumerated_result()
    assert len(result.evaluations) == 27
    under = [e for e in result.evaluations if e.values["params"] <= 14]
    expected = min(under, key=lambda e: e.values["loss"])
    assert result.best_under("loss", "params", 14).key == expected.key
    assert result.reference_value("params") == 24
    relative = result.best_under("loss", "params", 0.5, relative=True)  # params <= 12
    assert relative.values["params"] <= 12
    assert relative.values["loss"] == min(e.values["loss"] for e in result.evaluations if e.values["params"] <= 12)
    assert result.best("params").config == space.min_config()
    with pytest.raises(ValueError, match=r"No evaluated sub-network has params <= 5; the smallest params seen is 6"):
        result.best_under("loss", "params", 5)
    with pytest.raises(ValueError, match="Unknown objective 'latency'"):
        result.best_under("loss", "latency", 5)

    assert pareto_front([[1, 3], [2, 2], [3, 1], [3, 3], [float("nan"), 0]], ["minimize"] * 2) == [0, 1, 2]
    assert pareto_front([[2, 3], [1, 2]], ["maximize", "minimize"]) == [0, 1]
    assert pareto_front([[1, 3], [2, 2]], ["maximize", "minimize"]) == [1]
    assert pareto_front([[1, 3], [2, 3]], ["maximize", "maximize"]) == [1]
    assert pareto_front([[1, 1], [1, 1], [0, 2]], ["minimize"] * 2) == [0, 1, 2]  # ties are all kept
    rng = torch.Generator().manual_seed(0)
    points = torch.randint(0, 20, (200, 3), generator=rng).tolist()
    brute = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    assert pareto_front(points, ["minimize"] * 3) == brute and 0 < len(brute) < 200
    assert hypervolume_2d([[1, 3], [2, 2], [3, 1], [3, 3], [5, 0]], [4, 4]) == pytest.approx(6.0)
    raw = [[e.values["loss"], e.values["params"]] for e in result.evaluations]
    assert result.hypervolume([3.0, 30.0]) == pytest.approx(hypervolume_2d(raw, [3.0, 30.0]))
    assert hypervolume_2d(raw, [3.0, 30.0]) > 0
    assert hypervolume_2d([], [4, 4]) == 0.0


def test_json_round_trip_csv_and_plot(tmp_path):
    result, space = fully_enumerated_result()
    path = result.to_json(tmp_path / "r" / "search.json")
    data = json.loads(path.read_text())
    assert data["objectives"] == ["loss", "params"] and len(data["evaluations"]) == 27
    assert sum(e["pareto"] for e in data["evaluations"]) == len(result.front)
    loaded = SearchResult.from_json(path)
    assert loaded.space == space and loaded.info == result.info
    assert [(e.key, e.values, e.sources, e.config) for e in loaded.evaluations] == [
        (e.key, e.values, e.sources, e.config) for e in result.evaluations
    ]
    assert [e.key for e in loaded.front] == [e.key for e in result.front]

    rows = list(csv.reader(result.to_csv(tmp_path / "search.csv").open()))
    assert rows[0] == ["index", "sources", "key", "loss", "params", "pareto", "0.rank.x", "1.rank.x", "2.rank.x"]
    assert len(rows) == 28
    first = result.evaluations[0]
    assert float(rows[1][3]) == first.values["loss"] and rows[1][6:] == [str(v) for v in first.config.values()]
    assert sum(int(r[5]) for r in rows[1:]) == len(result.front)

    png = result.plot(tmp_path / "front.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_nan_objective_is_recorded_but_kept_off_the_front(tmp_path):
    space = synthetic_space(4, (8, 4, 2))
    calls = []

    def flaky(config):
        calls.append(config)
        return math.nan if config["0.rank.x"] == 4 else float(sum(config.values()))

    evaluators = [FunctionEvaluator(flaky, "loss"), FunctionEvaluator(lambda c: -float(c["1.rank.x"]), "neg")]
    with pytest.warns(UserWarning, match="non-finite"):
        result = search_subnetworks(space, evaluators, budget=30, population=6, seed=0, output_dir=tmp_path, **QUIET)
    bad = [e for e in result.evaluations if not e.valid]
    assert bad and all(math.isnan(e.values["loss"]) for e in bad)
    assert len(result.evaluations) == 30 == len(calls)
    assert all(e.valid for e in result.front) and result.front
    assert result.best().valid
    loaded = SearchResult.from_json(tmp_path / "search.json")
    assert sum(math.isnan(e.values["loss"]) for e in loaded.evaluations) == len(bad)
    assert "null" in (tmp_path / "search.json").read_text()
    assert {p.name for p in tmp_path.iterdir()} == {"search.json", "search.csv", "search.png"}


# ---------------------------------------------------------------------------------------------------- evaluators
def test_loss_perplexity_dataset_and_counts(supernet, batches):
    rows = [{k: v[i].tolist() for k, v in b.items()} for b in batches for i in range(2)]
    data = Dataset.from_list([r | {"text": "ignored"} for r in rows])
    config = supernet.space.median_config()
    supernet.activate(config)
    loss = LossEvaluator(batches)(supernet, config)
    assert LossEvaluator(data, batch_size=2)(supernet, config) == pytest.approx(loss, rel=1e-6)
    assert LossEvaluator(data, batch_size=2, max_batches=1)(supernet, config) == pytest.approx(
        LossEvaluator(batches[:1])(supernet, config), rel=1e-6
    )
    assert PerplexityEvaluator(batches)(supernet, config) == pytest.approx(math.exp(loss), rel=1e-6)
    for key in ("params", "macs", "adapter_params", "base_params"):
        assert CountEvaluator(key)(supernet, config) == supernet.count(config)[key]
    supernet.activate("max")
    with pytest.raises(ValueError, match="one-shot iterator"):
        LossEvaluator(iter(batches))
    with pytest.raises(ValueError, match="CountEvaluator key='flops'"):
        CountEvaluator("flops")


def test_metric_evaluator_with_evaluate_metric_and_callable(supernet):
    import datasets
    import evaluate

    class ExactMatch(evaluate.Metric):  # evaluate.load needs the Hub; a local Metric subclass works offline
        def _info(self):
            features = datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            )
            return evaluate.MetricInfo(description="", citation="", inputs_description="", features=features)

        def _compute(self, predictions, references):
            return {"accuracy": sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)}

    g = torch.Generator().manual_seed(1)
    data = [
        {"input_ids": torch.randint(1, 96, (4, 6), generator=g), "targets": torch.randint(1, 96, (4,), generator=g)}
    ]

    def predict(model, batch):
        return model(input_ids=batch["input_ids"]).logits[:, -1].argmax(-1)

    supernet.activate("max")
    with torch.no_grad():
        preds = predict(supernet.model, data[0])
    data[0]["targets"][:2] = preds[:2]  # two of four right (unless a random target matches)
    expected = (preds == data[0]["targets"]).float().mean().item()
    assert expected >= 0.5
    config = supernet.space.max_config()
    for metric in (None, ExactMatch(), lambda p, r: {"acc": sum(a == b for a, b in zip(p, r, strict=True)) / len(r)}):
        evaluator = MetricEvaluator(data, predict, metric, references_key="targets", metric_key=None)
        if callable(metric) and not hasattr(metric, "compute"):
            evaluator.metric_key = "acc"
        assert evaluator(supernet, config) == pytest.approx(expected)
        assert evaluator.direction == "maximize"
    with pytest.raises(ValueError, match="has no 'labels'"):
        MetricEvaluator(data, predict)(supernet, config)


def test_latency_evaluator_times_warmup_plus_repeats(supernet):
    calls = []
    handle = supernet.model.register_forward_hook(lambda *a: calls.append(1))
    value = LatencyEvaluator(seq_len=16, warmup=2, repeats=3, extract=False)(supernet, supernet.active_config)
    handle.remove()
    assert len(calls) == 5 and 0 < value < 10_000
    sliced = LatencyEvaluator(seq_len=16, warmup=1, repeats=2)
    assert not sliced.needs_model and 0 < sliced(supernet, supernet.space.min_config()) < 10_000
    with pytest.raises(ValueError, match="repeats >= 1"):
        LatencyEvaluator(repeats=0)


def test_progress_bar_shows_the_current_best(capsys):
    space = synthetic_space(3, (8, 4, 2))
    search_subnetworks(
        space, FunctionEvaluator(lambda c: float(sum(c.values())), "loss"), "random", budget=5, progress=True
    )
    err = capsys.readouterr().err
    assert "search (random)" in err and "best loss=6" in err  # the min config (2 + 2 + 2) is a reference


def test_lm_eval_adapter_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    with pytest.raises(ImportError, match="pip install lm-eval"):
        LMEvalEvaluator(["arc_easy"], tokenizer=None)


LM_EVAL_ROWS = [
    {"question": "This tea is great, I love it.", "choices": ["great", "stale"], "answer": 0},
    {"question": "Stale and bland.", "choices": ["great", "stale"], "answer": 1},
    {"question": "Not worth the money.", "choices": ["love", "bland"], "answer": 1},
    {"question": "I love it.", "choices": ["tea", "money"], "answer": 0},
    {"question": "The tea is stale.", "choices": ["bland", "great"], "answer": 0},
    {"question": "Great money.", "choices": ["worth", "not"], "answer": 1},
]
LM_EVAL_TASK = """task: hf_elastic_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _choice_accuracy(model: torch.nn.Module, tokenizer) -> float:
    """lm-eval's multiple-choice accuracy, computed by hand: the choice with the highest sum of token log-probs of
    " " + choice after the question (continuation tokens = tokens of the whole text after those of the question)."""
    correct = 0
    for row in LM_EVAL_ROWS:
        context = tokenizer(row["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in row["choices"]:
            whole = tokenizer(row["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
    return correct / len(LM_EVAL_ROWS)


def test_lm_eval_runs_a_local_yaml_task_through_include_path(tmp_path, tiny_tokenizer, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")  # nothing left in ~/.cache
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LM_EVAL_ROWS))
    (tasks / "tiny_choice.yaml").write_text(LM_EVAL_TASK.format(rows=tasks / "rows.jsonl"))
    model = get_peft_model(
        llama_for(tiny_tokenizer),
        NLSConfig(rank_choices=[4, 2], target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    sn = get_supernet(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in sn.lora_modules.values():
            module.lora_B["default"].weight.normal_(std=2.0)  # with this seed the two sub-networks score differently
    evaluator = LMEvalEvaluator(["hf_elastic_tiny_choice"], tiny_tokenizer, include_path=tasks)
    scores = {}
    for name in ("max", "min"):
        sn.activate(name)
        scores[name] = evaluator(sn, sn.active_config)
        assert scores[name] == _choice_accuracy(model, tiny_tokenizer), name
    assert scores == {"max": 2 / 6, "min": 3 / 6}
    with pytest.raises(FileNotFoundError, match=r"include_path .* is not a folder of task YAML files"):
        LMEvalEvaluator(["hf_elastic_tiny_choice"], tiny_tokenizer, include_path=tmp_path / "absent")


def test_custom_evaluator_subclass_sees_active_subnet(supernet):
    modes = []

    class ActiveRank(Evaluator):
        name = "rank"

        def __call__(self, supernet, config):
            modes.append(supernet.model.training)
            return float(supernet.active_config["0.rank.down_proj"])

    supernet.model.train()
    supernet.activate("min")
    result = search_subnetworks(supernet, ActiveRank(), "random", budget=5, seed=3, **QUIET)
    assert all(e.values["rank"] == e.config["0.rank.down_proj"] for e in result.evaluations)
    assert modes == [False] * 5  # evaluated in eval mode ...
    assert supernet.model.training and supernet.active_config == supernet.space.min_config()  # ... then restored
    supernet.model.eval()
    supernet.activate("max")


def test_score_extracted_scores_the_sliced_copy_with_the_same_values(supernet, batches):
    widths = []

    class FfnWidth(Evaluator):  # reads only the model, as scores_merged promises
        name, scores_merged = "ffn_width", True

        def __call__(self, supernet, config):
            up = next(m for n, m in supernet.model.named_modules() if n.endswith("layers.0.mlp.up_proj"))
            widths.append(up.out_features)
            return float(widths[-1])

    common = {"strategy": "random", "budget": 4, "seed": 2, "reference_subnets": ("max", "min"), "progress": False}
    evaluators = [LossEvaluator(batches), FfnWidth()]
    masked = search_subnetworks(
        supernet, evaluators, SearchConfig(objectives=("loss", "ffn_width"), score_extracted=False, **common)
    )
    masked_widths, widths[:] = list(widths), []
    extracted = search_subnetworks(
        supernet, evaluators, SearchConfig(objectives=("loss", "ffn_width"), score_extracted=True, **common)
    )
    assert [e.config for e in masked.evaluations] == [e.config for e in extracted.evaluations]
    for a, b in zip(masked.evaluations, extracted.evaluations, strict=True):
        assert b.values["loss"] == pytest.approx(a.values["loss"], abs=1e-5)
    full = supernet.space.max_config()["0.ffn"]
    assert masked_widths == [full] * 4  # the masked super-network keeps every channel ...
    assert widths == [e.config["0.ffn"] for e in extracted.evaluations] and min(widths) < full  # ... the copy not
    assert supernet.active_config == supernet.space.max_config()
    assert (masked.info["score_extracted"], extracted.info["score_extracted"]) == (False, True)


def test_extraction_bytes_bounds_what_an_extracted_copy_adds(supernet):
    def tensors(model):
        return itertools.chain(model.parameters(), model.buffers())

    shared = {t.untyped_storage().data_ptr() for t in tensors(supernet.model)}
    bound = extraction_bytes(supernet)
    for name in ("max", "median", "min"):
        model = supernet.extract_model(name, share_weights=True)
        added = sum(
            t.numel() * t.element_size() for t in tensors(model) if t.untyped_storage().data_ptr() not in shared
        )
        assert 0 < added <= bound, name
    base = supernet.base
    total = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "lora_" not in n)
    assert bound < total  # the embeddings, norms and LM head are shared, never counted


def test_score_extracted_auto_follows_the_free_memory(supernet, monkeypatch):
    import hf_elastic.search.scoring as scoring

    space = supernet.space
    assert scores_extracted(supernet, space, True) and not scores_extracted(supernet, space, False)
    need = extraction_bytes(supernet)
    monkeypatch.setattr(scoring, "free_memory", lambda device: 2 * need)
    assert scores_extracted(supernet, space, "auto")
    monkeypatch.setattr(scoring, "free_memory", lambda device: 2 * need - 1)
    assert not scores_extracted(supernet, space, "auto")
    monkeypatch.setattr(scoring, "free_memory", lambda device: None)  # a device whose free memory is unknown
    assert not scores_extracted(supernet, space, "auto")
    assert free_memory("cpu") > 0
    monkeypatch.setattr(scoring, "free_memory", lambda device: 2 * need)
    assert not scores_extracted(supernet, space.fixed(["ffn", "heads"]), "auto")  # ranks alone: nothing to slice


def test_score_extracted_takes_a_bool_or_auto():
    with pytest.raises(ValueError, match=r"SearchConfig.score_extracted='yes' must be of type"):
        SearchConfig(score_extracted="yes")


# ---------------------------------------------------------------------------------------------------- entry points
def test_search_from_saved_directory(llama, batches, tmp_path):
    model = nls_model(llama)
    model.save_pretrained(tmp_path)
    sn = get_supernet(model)
    key = ".".join(["0"] * len(sn.space))
    (tmp_path / "nas_stats.json").write_text(json.dumps({"config_losses": {key: {"mean_loss": 2.0, "count": 1}}}))
    result = search_subnetworks(tmp_path, LossEvaluator(batches), "loss_based", base_model=fresh(llama), **QUIET)
    assert result.by_source("loss_based")[0].config == sn.space.max_config()  # only the max config has data
    assert len(result.evaluations) == 3  # max (also loss_based), min, median
    for e in result.evaluations:
        sn.activate(e.config)
        assert e.values["loss"] == pytest.approx(LossEvaluator(batches)(sn, e.config), rel=1e-6)
        assert e.values["params"] == sn.count(e.config)["params"]
    with pytest.raises(ValueError, match="needs the base model"):
        search_subnetworks(tmp_path, LossEvaluator(batches), **QUIET)


def test_search_from_trainer_uses_eval_set_and_stats(llama, tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (8, 12), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = NASTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        eval_subnets=["max", "min"],
    )
    trainer = NASTrainer(model=nls_model(llama), args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    result = search_subnetworks(trainer, strategy="loss_based", **QUIET)
    assert result.objectives == ["loss", "params"]
    sn = trainer.supernet
    for name in ("max", "min"):  # the mean of the model's own batch losses over the trainer's eval batches
        sn.activate(name)
        with torch.no_grad():
            losses = [sn.model(**b).loss.item() for b in trainer.get_eval_dataloader()]
        assert len(losses) == 2
        assert result.by_source(name)[0].values["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    expected = loss_based_config(trainer.supernet.space, trainer.sampler.stats(), 0.01)
    assert result.by_source("loss_based")[0].config == expected
    act = search_subnetworks(
        trainer, strategy="activation_based", reference_subnets=(), **QUIET
    )  # calibrates on the eval set
    assert len(act.evaluations) == 1


@pytest.mark.parametrize("strategy", ["nsga2", "predictor", "random"])
def test_fixed_kinds_hold_ranks_at_max_and_search_the_widths(supernet, strategy):
    params = CountEvaluator("params")
    config = SearchConfig(strategy=strategy, objectives=("params", "macs"), budget=12, population=4, **QUIET)
    result = search_subnetworks(supernet, [params], dataclasses.replace(config, fixed_kinds=("rank",)))
    ranks = [d for d in supernet.space if d.kind == "rank"]
    assert len(result.evaluations) == 12
    assert all(e.config[d.name] == d.choices[0] for e in result.evaluations for d in ranks)
    widths = {tuple(e.config[d.name] for d in supernet.space if d.kind != "rank") for e in result.evaluations}
    assert len(widths) == 12  # the budget went to distinct widths
    assert result.by_source("min")[0].config == supernet.space.min_config() | {d.name: d.choices[0] for d in ranks}
    assert [len(d.choices) for d in result.space if d.kind == "rank"] == [1] * len(ranks)
    unfixed = search_subnetworks(supernet, [params], config)
    assert any(e.config[d.name] != d.choices[0] for e in unfixed.evaluations for d in ranks)


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors(supernet, batches):
    score = FunctionEvaluator(lambda c: 1.0)
    with pytest.raises(ValueError, match="no dimensions"):
        search_subnetworks(SearchSpace([]), score, **QUIET)
    with pytest.raises(ValueError, match="single choice"):
        search_subnetworks(SearchSpace([Dimension("a", "rank", (4,)), Dimension("b", "rank", (8,))]), score, **QUIET)
    one_width = SearchSpace([Dimension("a.rank", "rank", (8, 4)), Dimension("b.ffn", "ffn", (16,))])
    with pytest.raises(
        ValueError, match=r"single choice.*or fix fewer kinds than SearchConfig.fixed_kinds=\['rank'\]"
    ):
        search_subnetworks(one_width, score, fixed_kinds=("rank",), **QUIET)
    with pytest.raises(
        ValueError, match=r"fixed_kinds=\('width',\) names an unknown kind.*\['rank', 'ffn', 'heads'\]"
    ):
        SearchConfig(fixed_kinds=("width",))
    with pytest.raises(ValueError, match=r"budget=10 leaves 7 evaluations to NSGA-II.*at least 23.*reference_subnets"):
        search_subnetworks(supernet, LossEvaluator(batches), budget=10, population=20)
    with pytest.raises(ValueError, match=r"budget=2 is smaller than the 3 reference sub-networks"):
        SearchConfig(strategy="random", budget=2)
    with pytest.raises(ValueError, match=r"strategy='greedy' is unknown"):
        search_subnetworks(supernet, LossEvaluator(batches), "greedy")
    with pytest.raises(ValueError, match=r"Unknown objective 'accuracy'.*name='accuracy'"):
        search_subnetworks(supernet, LossEvaluator(batches), objectives=("accuracy", "params"), **QUIET)
    with pytest.raises(ValueError, match=r"Evaluators \['loss'\] are not in objectives"):
        search_subnetworks(supernet, LossEvaluator(batches), objectives=("params",), **QUIET)
    with pytest.raises(ValueError, match="needs a super-network"):
        search_subnetworks(synthetic_space(2), score, objectives=("score", "params"), **QUIET)
    with pytest.raises(ValueError, match="needs calibration batches"):
        search_subnetworks(supernet, CountEvaluator("macs"), "activation_based", **QUIET)
    with pytest.raises(ValueError, match=r"SearchConfig.budget=0 must be a positive integer"):
        SearchConfig(budget=0)
    with pytest.raises(ValueError, match=r"SearchConfig.reference_subnets holds \['best'\]"):
        SearchConfig(reference_subnets=("max", "best"))
    with pytest.raises(ValueError, match="repeats a name"):
        SearchConfig(objectives=("loss", "loss"))
    assert SearchConfig(strategy="random", budget=3, population=20).budget == 3  # population only binds NSGA-II
    assert SearchConfig(budget=4, population=4, reference_subnets=()).budget == 4


def test_label_word_accuracy_matches_unpadded_scoring(tiny_tokenizer) -> None:
    model = llama_for(tiny_tokenizer).eval()
    prompts = ["Review: This tea is great\nSentiment:", "Review: Stale\nSentiment:", "Review: I love it\nSentiment:"]
    words = [" negative", " positive"]
    ids = [tiny_tokenizer.encode(w, add_special_tokens=False)[0] for w in words]
    with torch.no_grad():
        rows = [torch.tensor([encode_text(tiny_tokenizer, p)]) for p in prompts]
        predicted = [int(model(row).logits[0, -1, ids].argmax()) for row in rows]
    labels = [1, 0, 0]
    expected = sum(p == g for p, g in zip(predicted, labels, strict=True)) / 3
    evaluator = LabelWordEvaluator(prompts, labels, words, tiny_tokenizer, batch_size=2)
    assert evaluator(SimpleNamespace(model=model), {}) == expected
    by_answer = LabelWordEvaluator.from_answers(prompts, ["positive", "negative", "negative"], words, tiny_tokenizer)
    assert by_answer.labels == labels
    with pytest.raises(ValueError, match=r"The answer 'maybe' is none of the label words"):
        LabelWordEvaluator.from_answers(prompts[:1], ["maybe"], words, tiny_tokenizer)
    with pytest.raises(ValueError, match="start with the same token"):
        LabelWordEvaluator(prompts[:1], [0], [" positive", " positive!"], tiny_tokenizer)
    with pytest.raises(ValueError, match=r"Labels \[2\] are outside 0..1"):
        LabelWordEvaluator(prompts[:1], [2], words, tiny_tokenizer)


def test_label_word_logits_batched_match_one_by_one_on_any_model(tiny_tokenizer) -> None:
    from datasets import Dataset

    from hf_elastic.data import FINE_FOODS_ANSWERS, FINE_FOODS_FORMAT

    model = llama_for(tiny_tokenizer).train()
    texts = ["Great.", "Not worth the money, stale and bland and old.", "I love it, tea is great."]
    rows = Dataset.from_dict({"text": texts, "answer": [" positive", " negative", " positive"]})
    evaluator = LabelWordEvaluator.from_rows(rows, FINE_FOODS_ANSWERS, tiny_tokenizer, FINE_FOODS_FORMAT, batch_size=2)
    assert evaluator.prompts[0] == "Review: Great.\nSentiment:" and evaluator.labels == [1, 0, 1]
    batched = evaluator.logits(model)  # batched by length (rows 0 and 2, then 1), returned in the prompts' order
    assert batched.shape == (3, 2) and model.training  # scored in eval mode, the mode restored
    single = LabelWordEvaluator(evaluator.prompts, evaluator.labels, FINE_FOODS_ANSWERS, tiny_tokenizer, batch_size=1)
    torch.testing.assert_close(batched, single.logits(model), atol=1e-4, rtol=1e-4)
    expected = sum(int(i) == g for i, g in zip(batched.argmax(-1), evaluator.labels, strict=True)) / 3
    assert evaluator.accuracy(model) == expected == evaluator(SimpleNamespace(model=model), {})
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        LabelWordEvaluator(evaluator.prompts, evaluator.labels, FINE_FOODS_ANSWERS, tiny_tokenizer, batch_size=0)


def test_label_word_split_and_interleaved_scoring_add_up_to_the_whole(tiny_tokenizer) -> None:
    from hf_elastic.demo.measure import interleaved_scoring

    prompts = [f"Review: {'tea ' * n}is great\nSentiment:" for n in (5, 1, 3, 8, 2)]
    evaluator = LabelWordEvaluator(prompts, [1, 0, 1, 0, 0], [" negative", " positive"], tiny_tokenizer, batch_size=2)
    parts = evaluator.split()
    assert [len(p.labels) for p in parts] == [2, 2, 1]
    assert sorted(q for p in parts for q in p.prompts) == sorted(prompts)
    assert [len(r) for p in parts for r in p._rows] == sorted(len(r) for r in evaluator._rows)  # shortest first
    models = {"a": llama_for(tiny_tokenizer).eval(), "b": llama_for(tiny_tokenizer, intermediate_size=64).eval()}
    for model in models.values():
        assert sum(p.correct(model) for p in parts) == evaluator.correct(model)
        whole = evaluator.logits(model)
        for part in parts:
            rows = [evaluator.prompts.index(q) for q in part.prompts]
            torch.testing.assert_close(part.logits(model), whole[rows])
    figures = interleaved_scoring(models, evaluator)
    for name, model in models.items():
        assert figures[name]["accuracy"] == evaluator.accuracy(model) and figures[name]["latency_ms"] > 0


class _Scripted(torch.nn.Module):
    """`generate` appends each prompt's fixed text, to test the answer matching exactly."""

    def __init__(self, tokenizer, outputs: dict[str, str]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.outputs = tokenizer, outputs

    def generate(self, input_ids, attention_mask, **kwargs):
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        rows = [self.tokenizer.encode(self.outputs[p.strip()], add_special_tokens=False) for p in prompts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return torch.cat([input_ids, torch.tensor([r + [pad] * (width - len(r)) for r in rows])], dim=1)


def test_exact_match_extracts_final_answers(tiny_tokenizer) -> None:
    assert extract_answer("so 1,234 apples. #### 1,234.", r"####\s*(-?[\d,]*\.?\d+)") == "1234"
    assert extract_answer("no answer here", r"####\s*(\d+)") is None
    references = ["12 + 30 = 42 #### 42", "#### 7", "plain"]
    prompts = ["a longer question one", "q2", "q3"]  # batched by length: q2 and q3 first
    outputs = dict(zip(prompts, ["I think #### 42", "#### 8", "plain"], strict=True))
    evaluator = ExactMatchEvaluator(prompts, references, tiny_tokenizer, batch_size=2, max_new_tokens=4)
    assert evaluator.answers == ["42", "7", "plain"]
    score = evaluator(SimpleNamespace(model=_Scripted(tiny_tokenizer, outputs)), {})
    assert score == pytest.approx(1 / 3)  # "plain" has no #### in the generation either, so only 42 matches
    with pytest.raises(ValueError, match="is not a regular expression"):
        ExactMatchEvaluator(["q"], ["a"], tiny_tokenizer, answer_regex="(")
