"""Two gloo processes on CPU with an INT4 base: what DDP sends each step, and FSDP2's agreement between ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_launch import DDP_LAUNCH, FSDP_LAUNCH, run_worker

from hf_elastic import QuantLinear, load_exported, sparsity_of

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"


def _ranks(out: Path, script: str, mode: str, launcher: list[str], pythonpath: str | None = None) -> list[dict]:
    proc = run_worker(script, out, mode, launcher=launcher, pythonpath=pythonpath)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_broadcasts_no_int4_codes(tmp_path):
    """DDP syncs buffers before every forward; the codes, scales, zero points and residual are frozen parameters, so
    only the rotary table (8 float32 numbers) goes out per step, where it was 35,552 bytes as buffers."""
    ranks = _ranks(tmp_path, "dist_worker.py", "ddp", DDP_LAUNCH)
    for rank in ranks:
        assert rank["world"] == 2 and len(rank["broadcast_per_step"]) == 3
        assert rank["code_bytes"] == 15360 * 2 + 960  # codes, residual and zero points of 15,360 INT4 weights
        assert rank["broadcast_per_step"] == [{"float": rank["buffer_bytes"]}] * 3
        assert rank["buffer_bytes"] == 32


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory) -> list[dict]:
    return _ranks(tmp_path_factory.mktemp("fsdp"), "dist_worker.py", "fsdp", FSDP_LAUNCH)


def test_fsdp2_shards_int4_codes_with_their_layer(fsdp_ranks):
    for rank in fsdp_ranks:
        assert len(rank["quant_shards"]) == 14 * 4  # qweight, scales, zeros, residual of 14 layers
        for name, (local, full) in rank["quant_shards"].items():
            assert local[0] * 2 == full[0] and local[1:] == full[1:], name
        assert rank["code_bytes"] == [7680, 15360]


def test_fsdp2_ranks_skip_a_step_that_is_not_finite_on_one_shard(fsdp_ranks):
    """An inf planted in rank 1's shard of one gradient at step 2: both ranks skip step 2 (one all-reduced flag)."""
    for rank in fsdp_ranks:
        assert rank["skipped_steps"] == [2]
        assert rank["unchanged_by_skipped_step"] and rank["changed_by_other_steps"]


def test_fsdp2_save_with_a_nan_on_one_shard_raises_on_every_rank(fsdp_ranks):
    """A NaN in rank 1's shard only: both ranks refuse the save, and both reach the barrier after it."""
    for rank in fsdp_ranks:
        message = rank["nan_save"]
        assert message.startswith("Refusing to save to ") and message.endswith("to find the step.")
        assert (
            "1 adapter tensors hold NaN or inf (first: base_model.model.model.layers.0.self_attn.q_proj.lora_A"
            in message
        )


def test_fsdp2_base_checks_read_sharded_weights(fsdp_ranks):
    """Fingerprint, zero pattern and compression costs computed again on the sharded model equal the ones before."""
    for rank in fsdp_ranks:
        assert rank["after"] == rank["before"]
        assert rank["before"]["count"]["nonzero_params"] < rank["before"]["count"]["base_params"]


@pytest.mark.filterwarnings("ignore:The calibration data gave")
def test_recipe_exports_after_an_fsdp2_run(tmp_path):
    """sqft_qa_sparsepeft.py --tiny under FSDP2: rank 0 compresses and saves the base, both ranks train on sharded
    INT4 codes, and rank 0 exports from the saved super-adapter on the reloaded base while rank 1 exits."""
    ranks = _ranks(tmp_path, "recipe_worker.py", "sqft_qa_sparsepeft", FSDP_LAUNCH, str(RECIPES))
    assert [r["wrapped"] for r in ranks] == ["FSDPPeftModelForCausalLM"] * 2
    for rank in ranks:
        assert len(rank["codes"]) == 14 and all(local[0] * 2 == full[0] for local, full in rank["codes"])
    first, second = (r["summary"] for r in ranks)
    assert "export" not in second and second["train_loss"] > 0
    assert first["base_sparsity"] == pytest.approx(0.5) and first["base_bits"] == 4
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["export"] == first["export"] == str(run / "merged")
    model = load_exported(run / "merged")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.bits == 4 and m.residual is None for m in layers)
    assert sparsity_of(model).total_sparsity == pytest.approx(0.5, abs=1e-6)
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point())
