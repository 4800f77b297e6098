"""NASTrainer: one sub-network per optimizer step, strategies, statistics, evaluation and exact resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, fresh, peft_kwargs
from datasets import Dataset
from peft import get_peft_model
from transformers import TrainerCallback

from hf_elastic import ElasticLoraConfig, NLSConfig, get_supernet
from hf_elastic.trainer import NAS_STATS_NAME, NASTrainer, NASTrainingArguments, register_sampler

LLAMA = ARCHS["llama"]


@pytest.fixture(scope="module")
def llama():
    return LLAMA.build()


def dataset(n: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (n, 12), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def args(tmp_path, **kwargs) -> NASTrainingArguments:
    defaults = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "max_steps": 6,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 3,
    }
    return NASTrainingArguments(**(defaults | kwargs))


def nls_model(base):
    torch.manual_seed(0)
    return get_peft_model(fresh(base), NLSConfig(**peft_kwargs(LLAMA, rank_choices=[8, 6, 4])))


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_one_subnet_per_optimizer_step_and_stats(llama, tmp_path):
    model = nls_model(llama)
    trainer = NASTrainer(model=model, args=args(tmp_path, gradient_accumulation_steps=2), train_dataset=dataset())
    seen = []
    original = trainer.supernet.activate

    def spy(config):
        seen.append(trainer.supernet.resolve(config))
        return original(config)

    trainer.supernet.activate = spy
    trainer.train()
    steps = trainer.state.global_step
    assert steps == 6 and len(trainer.sampler.history) == 6
    # each optimizer step: activation at step begin, then per micro-batch (2) activate + restore
    # exactly one activation per optimizer step, none per micro-batch
    assert seen == [trainer.sampler.draw(step)[0] for step in range(6)]
    assert len({json.dumps(b, sort_keys=True) for b in seen}) > 1
    trainer.save_model(tmp_path / "final")
    stats = json.loads((tmp_path / "final" / NAS_STATS_NAME).read_text())
    assert sum(stats["choice_counts"]["0.rank.self_attn.q_proj"].values()) == 6
    assert sum(v["count"] for v in stats["config_losses"].values()) == 12
    assert (tmp_path / "final" / "elastic_config.json").is_file()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("subnet_params" in h for h in logged)


def test_sandwich_and_custom_sampler(llama, tmp_path):
    trainer = NASTrainer(
        model=llama.__class__(llama.config),
        args=args(tmp_path, sampling="sandwich", sandwich_k=1, max_steps=2),
        peft_config=ElasticLoraConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4])),
        train_dataset=dataset(),
    )
    trainer.train()
    assert sum(v["count"] for v in trainer.sampler.stats()["config_losses"].values()) == 2 * 3
    space = trainer.supernet.space
    assert trainer.sampler.draw(0)[:2] == [space.max_config(), space.min_config()]

    register_sampler("always_min", lambda space, rng, k: [space.min_config()])
    trainer = NASTrainer(
        model=nls_model(llama), args=args(tmp_path, sampling="always_min", max_steps=2), train_dataset=dataset()
    )
    trainer.train()
    assert set(trainer.sampler.history) == {".".join(["2"] * len(trainer.supernet.space))}


def test_evaluate_names_each_subnet(llama, tmp_path):
    trainer = NASTrainer(
        model=nls_model(llama), args=args(tmp_path, eval_subnets=["median", "max", "min"]), eval_dataset=dataset(8)
    )
    before = trainer.supernet.active_config
    metrics = trainer.evaluate()
    assert {"eval_median_loss", "eval_max_loss", "eval_min_loss", "eval_loss"} <= set(metrics)
    assert metrics["eval_loss"] == metrics["eval_median_loss"]
    assert trainer.supernet.active_config == before


def test_resume_continues_the_same_sequence(llama, tmp_path):
    full = NASTrainer(model=nls_model(llama), args=args(tmp_path / "full"), train_dataset=dataset())
    full.train()

    run = args(tmp_path / "part", save_strategy="steps", save_steps=3)
    part = NASTrainer(model=nls_model(llama), args=run, train_dataset=dataset())
    part.add_callback(_StopAt(3))
    part.train()
    assert part.state.global_step == 3

    resumed = NASTrainer(model=nls_model(llama), args=run, train_dataset=dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    assert resumed.sampler.history == full.sampler.history
    assert resumed.sampler.choice_counts == full.sampler.choice_counts
    expected, got = adapter_weights(full.model), adapter_weights(resumed.model)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_trainer_errors(llama, tmp_path):
    with pytest.raises(ValueError, match=r"sampling='nope' is unknown; use one of \["):
        args(tmp_path, sampling="nope")
    with pytest.raises(ValueError, match=r"eval_subnets=\['best'\] must be a non-empty list"):
        args(tmp_path, eval_subnets=["best"])
    with pytest.raises(ValueError, match=r"sandwich_k=-1 must be >= 0"):
        args(tmp_path, sandwich_k=-1)
    single = get_peft_model(fresh(llama), NLSConfig(**peft_kwargs(LLAMA, target_modules=["q_proj"], rank_choices=[8])))
    with pytest.raises(ValueError, match=r"sampling='sandwich' needs at least two sub-networks"):
        NASTrainer(model=single, args=args(tmp_path, sampling="sandwich"), train_dataset=dataset())

    run = args(tmp_path / "a", save_strategy="steps", save_steps=2, max_steps=2)
    NASTrainer(model=nls_model(llama), args=run, train_dataset=dataset()).train()
    other = get_peft_model(fresh(llama), NLSConfig(**peft_kwargs(LLAMA, rank_choices=[8, 2])))
    trainer = NASTrainer(model=other, args=args(tmp_path / "a", max_steps=4), train_dataset=dataset())
    with pytest.raises(ValueError, match=r"checkpoint was trained with a different search space"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert get_supernet(other) is trainer.supernet


def _run_worker(out, *worker_args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    here = Path(__file__).parent
    cmd = [sys.executable, str(here / "train_worker.py"), str(out), *worker_args]
    if nproc > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1"]
        cmd = [sys.executable, *launcher, "--master_port", str(port), *cmd[1:]]
    env = os.environ | {"PYTHONPATH": f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)


def test_two_processes_sample_the_same_subnets(tmp_path):
    """Two CPU processes (gloo, launched with torchrun as accelerate does) draw the same sub-networks."""
    proc = _run_worker(tmp_path, "3", nproc=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) == 3
    assert len(set(ranks[0]["history"])) > 1
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_resume_after_the_process_is_killed(tmp_path):
    """A run SIGKILLed after step 5 resumes from checkpoint-4 and ends exactly like an uninterrupted run."""
    full = _run_worker(tmp_path / "full", "6")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run_worker(tmp_path / "killed", "6", "5")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "rank0.json").exists()
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = _run_worker(tmp_path / "killed", "6", "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = json.loads((tmp_path / "full" / "rank0.json").read_text())
    got = json.loads((tmp_path / "killed" / "rank0.json").read_text())
    assert got["first_step"] == 4 and expected["first_step"] == 0
    assert got["history"] == expected["history"] and len(got["history"]) == 6
    diff = max(
        (torch.tensor(got["weights"][k]) - torch.tensor(expected["weights"][k])).abs().max().item()
        for k in expected["weights"]
    )
    assert diff <= 1e-6


def test_bf16_autocast_trains_like_fp32(llama, tmp_path):
    runs = {}
    for bf16 in (False, True):
        model = nls_model(llama)
        trainer = NASTrainer(
            model=model, args=args(tmp_path / str(bf16), max_steps=3, bf16=bf16), train_dataset=dataset()
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[bf16] = (trainer.sampler.history, losses, adapter_weights(model))
    assert runs[True][0] == runs[False][0]
    loss_diff = [abs(a - b) for a, b in zip(runs[True][1], runs[False][1], strict=True)]
    assert 0 < max(loss_diff) < 0.05  # autocast really ran in bf16, and stayed close to fp32
    assert all(w.dtype == torch.float32 for w in runs[True][2].values())
    assert max((runs[True][2][k] - runs[False][2][k]).abs().max().item() for k in runs[False][2]) < 0.05


def test_torch_compile_matches_eager(llama, tmp_path):
    runs = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(fresh(llama), ElasticLoraConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4])))
        trainer = NASTrainer(
            model=model,
            args=args(tmp_path / str(compile_), max_steps=2, torch_compile=compile_),
            train_dataset=dataset(),
        )
        trainer.train()
        runs.append((trainer.sampler.history, adapter_weights(model)))
    assert runs[0][0] == runs[1][0] and len(set(runs[0][0])) == 2
    assert max((runs[0][1][k] - runs[1][1][k]).abs().max().item() for k in runs[0][1]) <= 1e-5


def test_gradient_checkpointing_matches_plain_training(llama, tmp_path):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(fresh(llama), ElasticLoraConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4])))
        run = args(tmp_path / str(checkpointing), max_steps=3, gradient_checkpointing=checkpointing)
        trainer = NASTrainer(model=model, args=run, train_dataset=dataset())
        trainer.train()
        results.append((trainer.sampler.history, adapter_weights(model)))
    assert results[0][0] == results[1][0]
    assert max((results[0][1][k] - results[1][1][k]).abs().max().item() for k in results[0][1]) <= 1e-5
