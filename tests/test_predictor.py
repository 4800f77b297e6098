"""Predictor-guided search: the ridge predictor, and hypervolume against NSGA-II at half the evaluations."""

from __future__ import annotations

import random

import pytest
from conftest import ARCHS, peft_kwargs
from peft import get_peft_model

from hf_elastic import NLSConfig
from hf_elastic.nas.search_space import Dimension, SearchSpace
from hf_elastic.search import FunctionEvaluator, SearchConfig, SubnetSearch, hypervolume_2d, search_subnetworks
from hf_elastic.search.predictor import RidgePredictor

LLAMA = ARCHS["llama"]


def synthetic(n_dims: int = 10, n_choices: int = 4, seed: int = 123):
    """A width-like space: error falls with diminishing returns per dimension (weights differ), cost grows linearly."""
    rng = random.Random(seed)
    dims = [Dimension(f"{i}.ffn", "ffn", tuple(range(1, n_choices + 1))) for i in range(n_dims)]
    space = SearchSpace(dims)
    importance = [rng.uniform(0.1, 1.0) ** 2 for _ in range(n_dims)]
    size = [rng.uniform(0.5, 1.5) for _ in range(n_dims)]

    def error(config):
        additive = sum(w / config[d.name] for w, d in zip(importance, dims, strict=True))
        return additive + 0.2 * (config["0.ffn"] == 1) * (config["1.ffn"] == 1)  # one interaction

    def cost(config):
        return sum(s * config[d.name] for s, d in zip(size, dims, strict=True))

    reference = (error(space.min_config()) * 1.05, cost(space.max_config()) * 1.05)
    return space, error, cost, reference


def test_ridge_predictor_recovers_an_additive_objective():
    space, error, _, _ = synthetic()
    rng = random.Random(0)
    train = [space.sample(rng) for _ in range(200)]
    additive = [error(c) - 0.2 * (c["0.ffn"] == 1) * (c["1.ffn"] == 1) for c in train]
    predictor = RidgePredictor(space, alpha=1e-6).fit(train, additive)
    test = [space.sample(rng) for _ in range(20)]
    expected = [error(c) - 0.2 * (c["0.ffn"] == 1) * (c["1.ffn"] == 1) for c in test]
    assert predictor.predict(test).tolist() == pytest.approx(expected, abs=1e-4)
    assert predictor.features([space.max_config()]).sum() == len(space)  # one-hot: one 1 per dimension
    with pytest.raises(ValueError, match="RidgePredictor.predict was called before fit"):
        RidgePredictor(space).predict(test)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_predictor_matches_nsga2_hypervolume_with_half_the_evaluations(seed):
    space, error, cost, reference = synthetic()
    objectives = [FunctionEvaluator(error, "error"), FunctionEvaluator(cost, "cost")]
    hv = {}
    for strategy, budget, population in (("nsga2", 40, 4), ("predictor", 20, 3)):
        result = search_subnetworks(
            space, objectives, strategy=strategy, budget=budget, population=population, seed=seed,
            predictor_candidates=300, progress=False,
        )  # fmt: skip
        assert len(result.evaluations) == budget
        hv[strategy] = hypervolume_2d([[e.values["error"], e.values["cost"]] for e in result.valid], reference)
    assert hv["predictor"] >= hv["nsga2"] > 0
    info = result.info["predictor"]
    assert info["held_out"] == 20 - 3  # the 3 references make a population: no random round, the rest is predicted
    assert info["rounds"] >= 4 and info["spearman_held_out"] > 0.5
    assert result.info["population"] == 3 and len(result.by_source("predictor")) == 20 - 3


def test_predictor_errors():
    model = get_peft_model(LLAMA.build(), NLSConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4])))
    with pytest.raises(ValueError, match=r"strategy='predictor' predicts the first objective 'score' .* \['latency"):
        SubnetSearch(model, [lambda config: 0.0], SearchConfig(strategy="predictor", objectives=("score", "latency")))
    with pytest.raises(ValueError, match=r"budget=8 leaves 5 evaluations to the predictor after the 3 reference"):
        SearchConfig(strategy="predictor", budget=8, population=6)
    with pytest.raises(ValueError, match=r"predictor_alpha=0.0 must be > 0"):
        SearchConfig(predictor_alpha=0.0)


def test_predictor_on_a_super_network_with_the_params_cost():
    model = get_peft_model(LLAMA.build(), NLSConfig(**peft_kwargs(LLAMA, rank_choices=[8, 6, 4])))
    score = lambda config: sum(config.values())  # noqa: E731  (more rank, lower "loss" would be the real case)
    result = search_subnetworks(model, score, strategy="predictor", budget=10, population=3, predictor_candidates=40,
                                reference_subnets=("max",), progress=False)  # fmt: skip
    assert result.objectives == ["score", "params"] and len(result.evaluations) == 10
    assert len(result.by_source("max")) == 1
    # one reference, so 2 random sub-networks make the first population; the other 7 are predicted
    assert result.info["predictor"]["held_out"] == 10 - 1 - 2
