"""The papers' recipes in `examples/recipes/` run end to end in their offline `--tiny` mode."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from hf_elastic import QuantLinear, load_exported, sparsity_of

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"


@pytest.fixture(scope="module", autouse=True)
def recipes_on_path():
    sys.path.insert(0, str(RECIPES))
    yield
    sys.path.remove(str(RECIPES))


@pytest.mark.filterwarnings("ignore:The calibration data gave")
@pytest.mark.parametrize(
    ("script", "recipe"),
    [
        ("lonas", "LONAS"),
        ("shears", "SHEARS"),
        ("sqft_sparsepeft", "SQFT_SPARSEPEFT"),
        ("sqft_qa_sparsepeft", "SQFT_QA_SPARSEPEFT"),
    ],  # fmt: skip
)
def test_recipe_tiny_mode(tmp_path: Path, script: str, recipe: str) -> None:
    module = importlib.import_module(script)
    settings = getattr(module, recipe)
    summary = importlib.import_module("recipe").run(settings, ["--tiny", "--output-dir", str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text())["recipe"] == settings.name
    assert 0.0 <= summary["heuristic"]["exact_match"] <= 1.0 and summary["train_loss"] > 0
    assert (tmp_path / "super-adapter" / "elastic_config.json").is_file()
    if settings.base_sparsity:
        assert summary["base_sparsity"] == pytest.approx(settings.base_sparsity)
    export = Path(summary["export"])
    if export.name == "heuristic-adapter":
        assert (export / "adapter_config.json").is_file()
        return
    model = load_exported(export)
    if settings.base_bits:
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert layers and all(m.bits == settings.base_bits for m in layers)
    if settings.sparse_adapter:
        assert sparsity_of(model).total_sparsity == pytest.approx(settings.base_sparsity, abs=1e-6)
    if settings.recipe.ffn_width_choices:
        ffn = model.model.layers[0].mlp.up_proj.out_features
        assert ffn == int(128 * sorted(settings.recipe.ffn_width_choices, reverse=True)[2])  # the median width
    assert all(torch.isfinite(p).all() for p in model.parameters())
