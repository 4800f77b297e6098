"""In-place and teacher distillation in NASTrainer, and the progressive-shrinking sampler."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, TRAIN_DEFAULTS, StopAt, args, fresh, peft_kwargs
from datasets import Dataset
from peft import get_peft_model

from hf_elastic import ElasticLoraConfig, NASTrainingArguments
from hf_elastic.nas.samplers import progressive_stage
from hf_elastic.nas.trainer import NAS_STATS_NAME, NASTrainer

LLAMA = ARCHS["llama"]


@pytest.fixture(scope="module")
def llama():
    return LLAMA.build()


def completion_dataset(n: int = 16) -> Dataset:
    """Random rows whose first 6 tokens are a prompt (label -100) and last 6 the completion."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (n, 12), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def elastic(**extra) -> ElasticLoraConfig:
    kwargs = {"rank_choices": [8, 4], "ffn_width_choices": [1.0, 0.5], "head_choices": [1.0, 0.5]} | extra
    return ElasticLoraConfig(**peft_kwargs(LLAMA, init_lora_weights=False, **kwargs))


def trainer_for(llama, tmp_path, teacher=None, **kwargs) -> NASTrainer:
    torch.manual_seed(0)
    model = get_peft_model(fresh(llama), elastic())
    return NASTrainer(
        model=model, args=args(tmp_path, **kwargs), train_dataset=completion_dataset(), teacher_model=teacher
    )


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------------- distillation


def test_inplace_with_alpha_zero_trains_like_plain_sandwich(llama, tmp_path):
    plain = trainer_for(llama, tmp_path / "plain", sampling="sandwich", sandwich_k=1, max_steps=3)
    plain.train()
    inplace = trainer_for(
        llama, tmp_path / "kd", sampling="sandwich", sandwich_k=1, max_steps=3, distillation="inplace",
        distillation_alpha=0.0,
    )  # fmt: skip
    inplace.train()
    assert max_difference(adapter_weights(plain.model), adapter_weights(inplace.model)) <= 1e-6
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, inplace)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    recorded = [{k: m for k, (m, n) in t.sampler.config_losses.items()} for t in (plain, inplace)]
    assert recorded[0] == pytest.approx(recorded[1], abs=1e-6)  # the label losses, as before


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_inplace_gradient_of_min_includes_the_kl_to_max(llama, tmp_path):
    alpha, t = 0.7, 2.0
    trainer = trainer_for(
        llama, tmp_path, sampling="sandwich", sandwich_k=0, distillation="inplace", distillation_alpha=alpha,
        distillation_temperature=t,
    )  # fmt: skip
    model, space = trainer.model, trainer.supernet.space
    trainer.sampler.current = [space.max_config(), space.min_config()]
    trainer.current_gradient_accumulation_steps = 1  # set by train(); here one micro-batch is the whole step
    batch = trainer.data_collator([completion_dataset()[i] for i in range(4)])
    model.zero_grad()
    trainer.training_step(model, dict(batch))
    got = grads(model)

    def by_hand(alpha: float) -> dict[str, torch.Tensor]:
        model.zero_grad()
        trainer.supernet.activate(space.max_config())
        out = model(**batch)
        (out.loss / 2).backward()
        target = out.logits.detach()
        trainer.supernet.activate(space.min_config())
        out = model(**batch)
        mask = batch["labels"][:, 1:] != -100
        s, q = out.logits[:, :-1][mask] / t, target[:, :-1][mask] / t
        p = q.softmax(-1)
        kl = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean() * t * t  # mean over the completion tokens
        (((1 - alpha) * out.loss + alpha * kl) / 2).backward()
        return grads(model)

    expected, label_only = by_hand(alpha), by_hand(0.0)
    assert got.keys() == expected.keys() and len(got) > 0
    assert max_difference(got, expected) <= 1e-5
    assert max_difference(got, label_only) > 1e-3  # the KL term is there


def test_inplace_is_exact_under_gradient_accumulation(llama, tmp_path):
    common = {"sampling": "sandwich", "sandwich_k": 1, "max_steps": 1, "distillation": "inplace", "optim": "sgd"}
    whole = trainer_for(llama, tmp_path / "a", per_device_train_batch_size=8, **common)
    before = adapter_weights(whole.model)
    whole.train()
    split = trainer_for(llama, tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2, **common)
    split.train()
    a, b = adapter_weights(whole.model), adapter_weights(split.model)
    step = max_difference(a, before)
    assert step > 1e-4 and max_difference(a, b) <= 1e-4 * step


def test_teacher_runs_one_extra_forward_per_micro_batch(llama, tmp_path):
    teacher = fresh(llama)
    calls = []
    teacher.register_forward_hook(lambda module, args, output: calls.append(torch.is_grad_enabled()))
    kd = trainer_for(
        llama, tmp_path / "kd", teacher, sampling="sandwich", sandwich_k=1, max_steps=2,
        gradient_accumulation_steps=2, distillation="teacher", distillation_alpha=1.0,
    )  # fmt: skip
    kd.train()
    assert calls == [False] * 4  # 2 steps x 2 micro-batches, not x 3 sub-networks, and without gradients
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    plain = trainer_for(
        llama, tmp_path / "plain", sampling="sandwich", sandwich_k=1, max_steps=2, gradient_accumulation_steps=2
    )
    plain.train()
    assert max_difference(adapter_weights(kd.model), adapter_weights(plain.model)) > 1e-4


def completion_batch(n: int = 4) -> dict[str, torch.Tensor]:
    """`completion_dataset` rows with completions of different lengths (2 to 5 tokens), so rows differ in what they
    supervise."""
    rows = completion_dataset(n)[:n]
    labels = torch.tensor(rows["labels"])
    for i in range(n):
        labels[i, : 7 + i % 4] = -100
    return {"input_ids": torch.tensor(rows["input_ids"]), "labels": labels}


CAUSAL = [name for name in ARCHS if name != "bert"]


@pytest.mark.parametrize("distillation", ["none", "inplace", "teacher"])
@pytest.mark.parametrize("arch", CAUSAL)
def test_logits_at_completion_tokens_only_give_the_same_loss_and_gradients(arch, distillation, tmp_path):
    base = ARCHS[arch].build()
    batch, heads, results = completion_batch(), [], {}
    for only in (True, False):
        torch.manual_seed(0)
        config = ElasticLoraConfig(**peft_kwargs(ARCHS[arch], init_lora_weights=False, rank_choices=[8, 4]))
        teacher = fresh(base) if distillation == "teacher" else None
        trainer = NASTrainer(
            model=get_peft_model(fresh(base), config),
            args=args(tmp_path / str(only), sampling="sandwich", sandwich_k=0, distillation=distillation),
            teacher_model=teacher,
        )
        assert trainer.completion_logits_only
        trainer.completion_logits_only = only
        if teacher is not None:
            assert trainer.teacher.keeps_logits
            trainer.teacher.keeps_logits = only
        lengths = []
        for model in [trainer.model.get_base_model()] + ([teacher] if teacher is not None else []):
            head = model.get_output_embeddings()
            heads.append(head.register_forward_hook(lambda m, a, out, seen=lengths: seen.append(out.shape[1])))
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer.training_step(trainer.model, dict(batch))
        results[only] = loss.item(), grads(trainer.model), lengths
        for handle in heads:
            handle.remove()
    (kept, kept_grads, kept_lengths), (full, full_grads, full_lengths) = results[True], results[False]
    assert set(kept_lengths) == {5} and set(full_lengths) == {12}  # positions 6-10 predict a label in some row
    assert kept == pytest.approx(full, abs=1e-6)
    assert kept_grads.keys() == full_grads.keys() and len(kept_grads) > 0
    assert max_difference(kept_grads, full_grads) <= 1e-6


def test_logits_at_every_position_where_the_loss_reads_them(llama, tmp_path):
    assert trainer_for(llama, tmp_path).completion_logits_only
    assert not trainer_for(llama, tmp_path, label_smoothing_factor=0.1).completion_logits_only
    plain = NASTrainer(
        model=get_peft_model(fresh(llama), elastic()),
        args=args(tmp_path),
        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
    )
    assert not plain.completion_logits_only


def test_distillation_errors(llama, tmp_path):
    with pytest.raises(ValueError, match=r"distillation='inplace' needs the max sub-network .* sampling='uniform'"):
        NASTrainingArguments(output_dir=str(tmp_path), distillation="inplace")
    with pytest.raises(ValueError, match=r"distillation='soft' is unknown; use one of \['none', 'inplace'"):
        NASTrainingArguments(output_dir=str(tmp_path), distillation="soft")
    with pytest.raises(ValueError, match=r"distillation_alpha=1.5 must be in \[0, 1\]"):
        NASTrainingArguments(output_dir=str(tmp_path), distillation_alpha=1.5)
    with pytest.raises(ValueError, match=r"distillation_temperature=0.0 must be > 0"):
        NASTrainingArguments(output_dir=str(tmp_path), distillation_temperature=0.0)
    with pytest.raises(ValueError, match="distillation='teacher' needs the frozen teacher: pass teacher_model"):
        trainer_for(llama, tmp_path, distillation="teacher")
    with pytest.raises(ValueError, match="teacher_model was given but distillation='none'"):
        trainer_for(llama, tmp_path, fresh(llama))


# ---------------------------------------------------------------------------------------------------- progressive


def test_progressive_stage_boundaries():
    stages = [0.25, 0.25, 0.25, 0.25]
    assert [progressive_stage(s / 8, stages) for s in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [progressive_stage(p, [0.0, 0.5, 0.5, 0.0]) for p in (0.0, 0.49, 0.5, 0.99)] == [1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"progressive_stages=\[0.5, 0.6, 0.0, 0.0\] must be four fractions"):
        NASTrainingArguments(output_dir="x", progressive_stages=[0.5, 0.6, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"progressive_stages=\[0.5, 0.5\] must be four fractions"):
        NASTrainingArguments(output_dir="x", progressive_stages=[0.5, 0.5])


def opened_kinds(space, configs) -> set[str]:
    top = space.max_config()
    return {space[name].kind for config in configs for name in config if config[name] != top[name]}


def test_progressive_opens_rank_then_width_then_heads_and_resumes(llama, tmp_path):
    run = {"sampling": "progressive", "sandwich_k": 1, "max_steps": 8, "distillation": "inplace"}
    full = trainer_for(llama, tmp_path / "full", **run)
    full.train()
    space = full.supernet.space
    drawn = [full.sampler.draw(step, 8) for step in range(8)]
    assert drawn[0] == drawn[1] == [space.max_config()]  # stage 0: max only, one forward
    assert [opened_kinds(space, d) for d in drawn[2:]] == [{"rank"}] * 2 + [{"rank", "ffn"}] * 2 + [
        {"rank", "ffn", "heads"}
    ] * 2
    assert all(d[0] == space.max_config() and len(d) == 3 for d in drawn[2:])  # max, min of the open space, 1 random
    full.save_model(str(tmp_path / "final"))
    stats = json.loads((tmp_path / "final" / NAS_STATS_NAME).read_text())
    assert stats["progressive"]["stage_per_step"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert stats["progressive"]["opened"][2] == ["rank", "ffn"]
    assert sum(stats["choice_counts"]["0.heads"].values()) == 2 + 3 * 6
    assert stats["choice_counts"]["0.heads"]["2"] >= 2  # the min of the last stage, once per step

    part_args = run | {"save_strategy": "steps", "save_steps": 3}
    part = trainer_for(llama, tmp_path / "part", **part_args)
    part.add_callback(StopAt(3))
    part.train()
    resumed = trainer_for(llama, tmp_path / "part", **part_args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    assert resumed.sampler.stage_history == full.sampler.stage_history
    assert resumed.sampler.history == full.sampler.history
    assert max_difference(adapter_weights(full.model), adapter_weights(resumed.model)) <= 1e-6


def test_progressive_is_a_demo_and_cli_choice():
    from hf_elastic.demo import DemoConfig

    assert DemoConfig(sampling="progressive").sampling == "progressive"
    assert TRAIN_DEFAULTS["seed"] == 3  # the draws above depend on it
