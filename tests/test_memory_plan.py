"""The memory planner (`hf_elastic.nas.memory`, `hf-elastic plan`) and calibration windows after packing."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hf_elastic.compression.calibration import prepare_calibration
from hf_elastic.nas.memory import (
    METHODS,
    RECIPES,
    STAGES,
    GiB,
    MethodSettings,
    format_plan,
    model_shape,
    parse_memory,
    plan_memory,
    usable_memory,
)

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA3 = FIXTURES / "llama-3-8b"


@pytest.fixture(scope="module")
def llama3():
    return model_shape(LLAMA3 / "config.json")


def test_shape_of_llama3_8b_from_config_json(llama3):
    assert (llama3.hidden, llama3.layers, llama3.intermediate, llama3.vocab) == (4096, 32, 14336, 128256)
    assert (llama3.heads, llama3.kv_heads, llama3.head_dim) == (32, 8, 128)
    assert llama3.params == 8_030_261_248  # Meta-Llama-3-8B's parameter count
    assert {n.rsplit(".", 1)[-1] for n, *_ in llama3.linears} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip


def test_plan_prints_every_stage_and_train_fits_80gb(llama3):
    for method in METHODS:
        plan = plan_memory(llama3, method, seq_len=512, gpu_memory="80GB")
        text = plan.table()
        expected = {"train", "search", "export", "openvino"}
        expected |= {"sparsify"} if method != "lonas" else set()
        expected |= {"quantize"} if method == "sqft-qa" else set()
        assert [s.stage for s in plan.stages] == [s for s in STAGES if s in expected]
        for stage in expected:
            assert f"\n{stage} " in text
        chosen = plan.chosen
        assert chosen is not None and chosen.fits, method
        assert chosen.device <= usable_memory(80 * GiB)
        assert chosen.micro_batch * chosen.accumulation == RECIPES[method].effective_batch
        assert str(plan) == text == format_plan(plan)


def test_relations_that_must_hold(llama3):
    lonas = plan_memory(llama3, "lonas", seq_len=512)
    by_setting = {(o.micro_batch, o.checkpointing): o.device for o in lonas.train_options}
    for micro in (1, 2, 4, 8, 16):
        assert by_setting[micro, True] < by_setting[micro, False]  # checkpointing lowers activations
    assert by_setting[1, False] < by_setting[2, False] < by_setting[16, False]
    # a bf16 model: 2 bytes per weight (15 GiB); INT4 codes without the residual: about half of that
    qa = plan_memory(llama3, "sqft-qa", seq_len=512)
    no_residual = MethodSettings("int4", 0.5, 4, sparse_adapter=True)
    int4 = plan_memory(llama3, no_residual, seq_len=512)
    assert 14.9 * GiB < lonas.weights < 15.0 * GiB and 0.1 * GiB < lonas.adapters < 0.5 * GiB
    assert int4.weights < 0.6 * lonas.weights  # 1 byte per code + scales and zero points per group of 128
    assert qa.weights > lonas.weights  # QA-SparsePEFT also keeps the int8 rounding residual: 2.04 bytes per weight
    assert qa.stage("quantize").device > qa.stage("sparsify").device  # float and INT4 layers coexist
    # the QA layer saves codes, gate and mask per weight: more than SparsePEFT's mask at the same micro-batch
    sqft = plan_memory(llama3, "sqft", seq_len=512)
    pick = {p: {(o.micro_batch, o.checkpointing): o.device for o in p.train_options} for p in (qa, sqft)}
    assert pick[qa][1, False] > pick[sqft][1, False] - 2 * GiB
    # longer rows need more; more GPUs split the effective batch
    assert plan_memory(llama3, "sqft", seq_len=1024).stage("search").device > sqft.stage("search").device
    # an extracted copy at full width: q, k, v adapted; gate, up, down sliced (6.44e9 weights in bf16)
    assert "+12.0 GiB to score extracted copies" in lonas.stage("search").note
    assert "extracted" not in sqft.stage("search").note  # ranks alone: nothing to slice, never extracted
    two = plan_memory(llama3, "sqft", seq_len=512, gpus=2)
    assert max(o.micro_batch * o.accumulation for o in two.train_options) == 8


def test_smaller_gpus_choose_smaller_settings(llama3):
    big = plan_memory(llama3, "sqft-qa", gpu_memory="80GB").chosen
    small = plan_memory(llama3, "sqft-qa", gpu_memory="48GB").chosen
    assert small is not None and small.device <= usable_memory(48 * GiB) < big.device or small == big


def test_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="method='lora' is unknown"):
        plan_memory(LLAMA3, "lora")
    with pytest.raises(ValueError, match="seq_len=0 must be a positive integer"):
        plan_memory(LLAMA3, "sqft", seq_len=0)
    with pytest.raises(FileNotFoundError, match="No config.json"):
        plan_memory(tmp_path / "nothing" / "here", "sqft")
    with pytest.raises(ValueError, match="gpu_memory='lots'"):
        parse_memory("lots")
    assert parse_memory("24GB") == parse_memory("24 GiB") == 24 * GiB == parse_memory(24)


def test_cli_plan_prints_the_table(capsys):
    from hf_elastic.cli.plan import add_plan_parser

    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", str(LLAMA3), "--method", "sqft-qa", "--gpu-memory", "48GB"])
    args.func(args)
    out = capsys.readouterr().out
    assert out.startswith(f"{LLAMA3}: sqft-qa, bfloat16, seq_len 512")
    assert "quantize" in out and "48.0 GiB" in out


def test_plan_matches_measured_training_peak_on_a_tiny_model():
    """Live tensor bytes of a training step (float32, CPU) within 15 % of the plan, with and without checkpointing."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_elastic import get_supernet, sparsify

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = pytest.importorskip("bench_memory_model")
    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # fmt: skip
    for method in ("lonas", "sqft"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        if RECIPES[method].sparsity:
            sparsify(model, "magnitude", 0.5, show_progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft = get_peft_model(model, bench.peft_config(method, "llama"))
        get_supernet(peft).activate("max")
        ids = torch.randint(0, config.vocab_size, (2, 64))
        settings = MethodSettings(**{**RECIPES[method].__dict__, "batch_size": 2, "accumulation": 1})
        plan = plan_memory(config, settings, seq_len=64, dtype="float32")
        tracker = bench.TensorMemory()
        tracker.track_module(peft)
        optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad])
        with tracker:
            for checkpointing in (False, True):
                if checkpointing:
                    peft.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
                for step in range(2):
                    if step:
                        tracker.reset()
                    peft(input_ids=ids, labels=ids).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                predicted = next(o.device for o in plan.train_options if o.checkpointing == checkpointing)
                assert abs(predicted - tracker.peak) / tracker.peak <= 0.15, (method, checkpointing, predicted)


# ---------------------------------------------------------------------- --num-samples counts windows


def test_num_samples_counts_windows_after_packing():
    rows = [list(range(i * 10, i * 10 + 10)) for i in range(20)]  # 20 rows of 10 tokens
    ids = prepare_calibration(rows, seq_len=16, num_samples=4)
    assert ids.shape == (4, 16)  # 4 windows from 7 rows, not 4 rows (40 tokens: 2 windows)
    assert ids[1].tolist() == list(range(16, 32))


def test_too_few_rows_say_how_many_windows(recwarn):
    rows = [list(range(10))] * 5  # 50 tokens
    with pytest.warns(UserWarning, match=r"Calibrating on 3 windows of 16 tokens: all 5 rows hold 50 tokens, fewer "):
        assert prepare_calibration(rows, seq_len=16, num_samples=8).shape == (3, 16)
    with pytest.warns(UserWarning, match=r"one window of 10 tokens \(< seq_len=16\)"):
        assert prepare_calibration([list(range(10))], seq_len=16, num_samples=2).shape == (1, 10)


def test_cli_calibration_reads_rows_until_the_windows_are_full(tmp_path):
    from hf_elastic.cli.inputs import calibration_texts

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(50)))
    args = argparse.Namespace(
        calibration=str(data), split="train", num_samples=2, data_config=None, data_revision=None,
        template=None, response_template=None, text_column="text",
    )  # fmt: skip
    texts = calibration_texts(args, tokenizer=None)
    assert not isinstance(texts, list)  # lazy: packing stops reading when the windows are full
    assert list(texts)[:3] == ["row 0", "row 1", "row 2"] and len(list(calibration_texts(args, None))) == 50
