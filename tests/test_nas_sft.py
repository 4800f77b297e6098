"""The sub-network sampler on other trainers: trl's `SFTTrainer` (`NASSFTTrainer`) and `NASTrainerMixin`."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import ARCHS, TRAIN_DEFAULTS, StopAt, args, dataset, fresh, peft_kwargs, record_activations
from datasets import Dataset
from peft import PeftModel, get_peft_model
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

import hf_elastic
from hf_elastic import NASTrainer, NASTrainerMixin, NLSConfig, get_supernet, load_super_network, search_subnetworks
from hf_elastic.nas.trainer import NAS_STATS_NAME
from hf_elastic.search import loss_based_config

pytest.importorskip("trl", reason="the trl extra is not installed (pip install 'hf-elastic[trl]', Python >= 3.11)")
from hf_elastic import NASSFTConfig, NASSFTTrainer  # noqa: E402

LLAMA = ARCHS["llama"]


@pytest.fixture(scope="module")
def llama():
    return LLAMA.build()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: 36 ids, inside the tiny Llama's 96."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *"abcdefghijklmnopqrstuvwxyz .,?!:'"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def prompt_completion(n: int = 16) -> Dataset:
    prompts = ["what is tea?", "say hi:", "two plus two:", "is it cold?"]
    completions = [" a drink.", " hi!", " four.", " yes, very."]
    return Dataset.from_dict(
        {"prompt": [prompts[i % 4] for i in range(n)], "completion": [completions[i % 4] for i in range(n)]}
    )


def nls_model(base):
    torch.manual_seed(0)
    return get_peft_model(fresh(base), NLSConfig(**peft_kwargs(LLAMA, rank_choices=[8, 6, 4])))


def sft_args(tmp_path, **kwargs) -> NASSFTConfig:
    """conftest's `args` on trl's config."""
    return NASSFTConfig(**(TRAIN_DEFAULTS | {"output_dir": str(tmp_path), "max_length": 32} | kwargs))


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_sft_trainer_samples_like_nastrainer(llama, tokenizer, tmp_path):
    nas = NASTrainer(model=nls_model(llama), args=args(tmp_path / "nas", max_steps=4), train_dataset=dataset())
    nas.train()

    run = sft_args(tmp_path / "sft", gradient_accumulation_steps=2, max_steps=4, eval_subnets=["median", "max"])
    data = prompt_completion()
    trainer = NASSFTTrainer(
        model=nls_model(llama),
        args=run,
        train_dataset=data,
        eval_dataset=data.select(range(8)),
        processing_class=tokenizer,
    )
    assert nas.completion_logits_only and not trainer.completion_logits_only  # trl's loss reads every logit
    seen = record_activations(trainer)
    trainer.train()
    del trainer.supernet.activate  # back to the method
    assert trainer.state.global_step == 4
    # one activation per optimizer step (at its start), none per micro-batch, and NASTrainer's sequence
    assert seen == [trainer.sampler.draw(step)[0] for step in range(4)]
    assert trainer.sampler.history == nas.sampler.history and len(set(trainer.sampler.history)) == 4
    assert sum(v["count"] for v in trainer.sampler.stats()["config_losses"].values()) == 4 * 2  # two micro-batches
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all("subnet_params" in h and "mean_token_accuracy" in h for h in logged)

    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == metrics["eval_median_loss"] != metrics["eval_max_loss"]
    assert {"eval_median_entropy", "eval_max_entropy"} <= set(metrics)  # trl's own metrics, per sub-network
    assert metrics["eval_entropy"] == metrics["eval_median_entropy"]

    trainer.save_model(tmp_path / "final")
    stats = json.loads((tmp_path / "final" / NAS_STATS_NAME).read_text())
    assert sum(stats["choice_counts"]["0.rank.self_attn.q_proj"].values()) == 4
    assert stats["history"] == nas.sampler.history
    loaded = adapter_weights(load_super_network(fresh(llama), tmp_path / "final"))
    trained = adapter_weights(trainer.model)
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)

    result = search_subnetworks(
        trainer, strategy="loss_based", progress=False
    )  # the trainer's statistics and eval set
    expected = loss_based_config(trainer.supernet.space, trainer.sampler.stats(), 0.01)
    assert result.by_source("loss_based")[0].config == expected


def test_sft_resume_continues_the_same_sequence(llama, tokenizer, tmp_path):
    def trainer(run):
        return NASSFTTrainer(
            model=nls_model(llama), args=run, train_dataset=prompt_completion(), processing_class=tokenizer
        )

    full = trainer(sft_args(tmp_path / "full"))
    full.train()
    run = sft_args(tmp_path / "part", save_strategy="steps", save_steps=3)
    part = trainer(run)
    part.add_callback(StopAt(3))
    part.train()
    assert part.state.global_step == 3 and (tmp_path / "part" / "checkpoint-3" / NAS_STATS_NAME).is_file()

    resumed = trainer(run)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    assert len(full.sampler.history) == 6
    assert resumed.sampler.history == full.sampler.history
    assert resumed.sampler.choice_counts == full.sampler.choice_counts
    expected, got = adapter_weights(full.model), adapter_weights(resumed.model)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6


def test_sft_sandwich_counts_tokens_once_and_takes_nas_training_arguments(llama, tokenizer, tmp_path):
    def run(**kwargs):
        trainer = NASSFTTrainer(
            model=fresh(llama),
            peft_config=NLSConfig(**peft_kwargs(LLAMA, rank_choices=[8, 6, 4])),  # applied by SFTTrainer
            args=args(tmp_path, max_steps=2, **kwargs),  # NASTrainingArguments, converted to NASSFTConfig
            train_dataset=prompt_completion(),
            processing_class=tokenizer,
        )
        trainer.train()
        return trainer

    sandwich, uniform = run(sampling="sandwich", sandwich_k=1), run()
    assert type(sandwich.args) is NASSFTConfig and sandwich.args.sampling == "sandwich"
    assert isinstance(sandwich.model, PeftModel) and sandwich.supernet is get_supernet(sandwich.model)
    space = sandwich.supernet.space
    assert sandwich.sampler.draw(0)[:2] == [space.max_config(), space.min_config()]
    assert sum(v["count"] for v in sandwich.sampler.stats()["config_losses"].values()) == 2 * 3
    tokens = [[h["num_tokens"] for h in t.state.log_history if "loss" in h] for t in (sandwich, uniform)]
    assert tokens[0] == tokens[1] and tokens[0][-1] > tokens[0][0] > 0  # each micro-batch counted once


def test_sft_inplace_distillation(llama, tokenizer, tmp_path):
    def run(**kwargs):
        trainer = NASSFTTrainer(
            model=fresh(llama),
            peft_config=NLSConfig(**peft_kwargs(LLAMA, rank_choices=[8, 6, 4], init_lora_weights=False)),
            args=sft_args(tmp_path, max_steps=2, sampling="sandwich", sandwich_k=1, optim="sgd", **kwargs),
            train_dataset=prompt_completion(),
            processing_class=tokenizer,
        )
        trainer.train()
        return trainer

    plain, zero, kd = run(), run(distillation="inplace", distillation_alpha=0.0), run(distillation="inplace")
    weights = [adapter_weights(t.model) for t in (plain, zero, kd)]
    difference = [max((weights[0][k] - w[k]).abs().max().item() for k in w) for w in weights[1:]]
    # alpha=0: trl's fused loss up to rounding (SGD, so no Adam sign flips); alpha=0.5: the KL moves the weights
    assert difference[0] <= 1e-5 and difference[1] > 20 * difference[0]
    tokens = [[h["num_tokens"] for h in t.state.log_history if "loss" in h] for t in (plain, kd)]
    assert tokens[0] == tokens[1] and tokens[0][-1] > 0  # counted once per micro-batch either way
    assert sum(v["count"] for v in kd.sampler.stats()["config_losses"].values()) == 2 * 3


def test_mixin_errors(llama, tmp_path, monkeypatch):
    with pytest.raises(
        TypeError, match=r"lists NASTrainerMixin after Trainer.*class Late\(NASTrainerMixin, Trainer\)"
    ):

        class Late(Trainer, NASTrainerMixin):
            pass

    class Alone(NASTrainerMixin):
        pass

    with pytest.raises(TypeError, match=r"Alone needs a transformers.Trainer among its bases, after NASTrainerMixin"):
        Alone(nls_model(llama), args(tmp_path))

    class Rebuilding(Trainer):  # rebuilds args as its own config class, as trl's trainers do
        def __init__(self, model, args, **kwargs):
            super().__init__(model, TrainingArguments(**args.to_dict()), **kwargs)

    class NASRebuilding(NASTrainerMixin, Rebuilding):
        pass

    with pytest.raises(TypeError, match=r"rebuilt `args` as its own config class, which has no 'sampling' field"):
        NASRebuilding(nls_model(llama), args(tmp_path))
    plain = NASRebuilding(nls_model(llama), TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"))
    assert plain.sampling == "uniform" and plain.eval_subnets == ["median"]  # the NASArgumentsMixin defaults

    with pytest.raises(ValueError, match=r"NASSFTConfig.sampling='nope' is unknown"):
        sft_args(tmp_path, sampling="nope")

    monkeypatch.setitem(sys.modules, "trl", None)  # as if trl were not installed
    monkeypatch.delitem(sys.modules, "hf_elastic.nas.sft")
    monkeypatch.delattr(hf_elastic.nas, "sft")
    with pytest.raises(ImportError, match=r"hf_elastic.NASSFTTrainer needs trl .*pip install 'hf-elastic\[trl\]'"):
        hf_elastic.NASSFTTrainer  # noqa: B018
