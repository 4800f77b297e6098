"""Tiny random models of every architecture in the test matrix, built from configs (no Hub access)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainerCallback,
)

from hf_elastic import ElasticLoraConfig, NASTrainingArguments, NLSConfig, quantize
from hf_elastic.data import FINE_FOODS_ANSWERS, FINE_FOODS_FORMAT
from hf_elastic.models import find_width_layers, weight_out_in

VOCAB = 96
_DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@dataclass
class Arch:
    name: str
    targets: list[str]
    rank_groups: list[list[str]]
    uniform_heads_loadable: bool

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        if self.name == "llama":
            model = LlamaForCausalLM(LlamaConfig(**_DECODER))
        elif self.name == "mistral":
            model = MistralForCausalLM(MistralConfig(**_DECODER, sliding_window=None))
        elif self.name == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**_DECODER))
        elif self.name == "phi3":
            model = Phi3ForCausalLM(Phi3Config(**_DECODER, pad_token_id=0))
        elif self.name == "gpt2":
            model = GPT2LMHeadModel(
                GPT2Config(
                    vocab_size=VOCAB,
                    n_embd=32,
                    n_layer=2,
                    n_head=4,
                    n_inner=48,
                    n_positions=64,
                    resid_pdrop=0.0,
                    embd_pdrop=0.0,
                    attn_pdrop=0.0,
                )
            )
        else:
            model = BertForSequenceClassification(
                BertConfig(
                    vocab_size=VOCAB,
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=48,
                    max_position_embeddings=64,
                    num_labels=2,
                    hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0,
                )
            )
        return model.eval()

    def batch(self, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, VOCAB, (2, 10), generator=g)
        if self.name == "bert":
            return {"input_ids": ids, "labels": torch.tensor([0, 1])}
        return {"input_ids": ids, "labels": ids}

    def heads_fraction(self) -> list[float]:
        return [1.0, 0.5]


ARCHS = {
    "llama": Arch(
        "llama",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        [["q_proj", "k_proj", "v_proj"], ["up_proj", "gate_proj"], ["down_proj"]],
        True,
    ),
    "mistral": Arch(
        "mistral", ["q_proj", "v_proj", "up_proj", "down_proj"], [["q_proj", "v_proj"], ["up_proj"]], True
    ),
    "qwen2": Arch(
        "qwen2", ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], [["q_proj", "k_proj", "v_proj"]], True
    ),
    "phi3": Arch("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], [["qkv_proj"], ["gate_up_proj"]], True),
    "gpt2": Arch("gpt2", ["c_attn", "c_proj", "c_fc"], [["attn.c_attn", "attn.c_proj"], ["mlp.c_fc"]], False),
    "bert": Arch("bert", ["query", "value", "dense"], [["query", "value"], ["intermediate.dense"]], False),
}


@dataclass
class RankOnlyArch:
    """An architecture beside the main matrix, tested in `test_architectures.py` (its own sizes: FFN of 64)."""

    name: str
    targets: list[str]
    layers_path: str

    def build(self) -> torch.nn.Module:
        from transformers import (
            Gemma3ForCausalLM,
            Gemma3TextConfig,
            GPTNeoXConfig,
            GPTNeoXForCausalLM,
            OPTConfig,
            OPTForCausalLM,
        )

        torch.manual_seed(0)
        common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
        common["max_position_embeddings"] = 64
        if self.name == "gemma3":
            config = Gemma3TextConfig(
                **common, intermediate_size=64, num_key_value_heads=2, head_dim=8, sliding_window=16
            )
            model = Gemma3ForCausalLM(config)
        elif self.name == "gpt_neox":
            model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, intermediate_size=64))
        else:
            model = OPTForCausalLM(OPTConfig(**common, ffn_dim=64, word_embed_proj_dim=32, dropout=0.0))
        return model.eval()

    def batch(self, seed: int = 0) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "labels": ids}


RANK_ONLY_ARCHS = {
    "gemma3": RankOnlyArch("gemma3", ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], "model.layers"),
    "gpt_neox": RankOnlyArch("gpt_neox", ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"], "gpt_neox.layers"),
    "opt": RankOnlyArch("opt", ["q_proj", "v_proj", "out_proj", "fc1", "fc2"], "model.decoder.layers"),
}


@pytest.fixture(params=list(ARCHS), scope="module")
def arch(request) -> Arch:
    return ARCHS[request.param]


@pytest.fixture(scope="module")
def base(arch: Arch) -> torch.nn.Module:
    return arch.build()


def peft_kwargs(arch: Arch, **extra: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"target_modules": arch.targets, "lora_alpha": 16, "lora_dropout": 0.0}
    if arch.name == "gpt2":
        kwargs["fan_in_fan_out"] = True
    return kwargs | extra


def fresh(base: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(base)


def byte_level_bpe(
    corpus: list[str], vocab_size: int, special_tokens: list[str], **named_tokens: str
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the GPT-2/Llama-3 kind) trained offline on `corpus`."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **named_tokens)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Trained on a few fine-food prompts, so the label words become single tokens."""
    template, (negative, positive) = FINE_FOODS_FORMAT.template, FINE_FOODS_ANSWERS
    corpus = [template.format(text="This tea is great, I love it.", answer=positive)] * 20 + [
        template.format(text="Stale and bland. Not worth the money.", answer=negative)
    ] * 20
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return byte_level_bpe(corpus, 1000, special, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token=special[0])


def random_llama(
    vocab_size: int, hidden_size: int = 32, intermediate_size: int = 48, seed: int = 0, **token_ids: int
) -> LlamaForCausalLM:
    """A seeded two-layer random Llama with 4 attention heads and 2 key/value heads."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **token_ids,
    )
    return LlamaForCausalLM(config)


def llama_for(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int = 32, intermediate_size: int = 48
) -> LlamaForCausalLM:
    """`random_llama` with the vocabulary and special tokens of `tokenizer`."""
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    return random_llama(len(tokenizer), hidden_size, intermediate_size, **ids)


def pruned(base: torch.nn.Module) -> torch.nn.Module:
    """A copy of `base` with half of every row of every linear layer inside the transformer layers set to zero."""
    model = fresh(base)
    _, layers = find_width_layers(model)
    with torch.no_grad():
        for layer in layers:
            for module in layer.module.modules():
                if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                    w = weight_out_in(module)
                    drop = w.abs().argsort(dim=1)[:, : w.shape[1] // 2]
                    w.scatter_(1, drop, 0.0)
    return model


def quantized(base: torch.nn.Module, bits: int = 4, keep_residual: bool = True) -> torch.nn.Module:
    model = pruned(base)
    quantize(model, bits=bits, group_size=16, keep_residual=keep_residual, show_progress=False)
    return model


def qa_config(arch, grouped: bool, **extra) -> NLSConfig:
    kwargs = peft_kwargs(
        arch, **({"sparse_adapter": True, "quantization_aware": True, "init_lora_weights": False} | extra)
    )
    kwargs.pop("fan_in_fan_out", None)  # a quantized Conv1D is stored as (out, in)
    if arch.name == "bert":
        kwargs["exclude_modules"] = ["pooler.dense"]  # quantize() leaves modules outside the encoder layers alone
    if grouped:
        return NLSConfig(rank_choices=[8, 4, 2], rank_groups=arch.rank_groups, **kwargs)
    return NLSConfig(rank_choices=[8, 6, 4], **kwargs)


METHODS = ["nls", "nls_grouped", "elastic"]


def make_config(method: str, arch: Arch, **extra) -> NLSConfig:
    kwargs = peft_kwargs(arch, **extra)
    if method == "nls":
        return NLSConfig(rank_choices=[8, 6, 4], **kwargs)
    if method == "nls_grouped":
        return NLSConfig(
            rank_choices=[8, 4, 2],
            rank_groups=arch.rank_groups,
            nls_target_modules=[m for g in arch.rank_groups for m in g],
            **kwargs,
        )
    return ElasticLoraConfig(
        rank_choices=[8, 4], ffn_width_choices=[1.0, 0.75, 0.5], head_choices=[1.0, 0.5], **kwargs
    )


def subnets(sn) -> list[dict[str, int]]:
    return [
        sn.space.max_config(),
        sn.space.min_config(),
        sn.space.median_config(),
        sn.space.sample(1),
        sn.space.sample(2),
    ]


def train_steps(model, arch, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        model(**arch.batch(step)).loss.backward()
        opt.step()
    model.eval()


def dataset(n: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (n, 12), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


TRAIN_DEFAULTS = {
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


def args(tmp_path, **kwargs) -> NASTrainingArguments:
    return NASTrainingArguments(**(TRAIN_DEFAULTS | {"output_dir": str(tmp_path)} | kwargs))


def hub_model_cache(cache: Path, repo_id: str, revisions: dict[str, int]) -> dict[str, torch.nn.Module]:
    """Lay out the Hub cache (`models--org--name/snapshots/<sha>`, `refs/<name>`) with one random Llama per ref."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    tokenizer = byte_level_bpe(["hello there"] * 5, 300, ["</s>"], eos_token="</s>")
    models = {}
    for ref, seed in revisions.items():
        sha = f"{seed:040x}"
        model = ARCHS["llama"].build()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(seed)
        model.save_pretrained(repo / "snapshots" / sha)
        tokenizer.save_pretrained(repo / "snapshots" / sha)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
        models[ref] = model
    return models


def hub_dataset_cache(cache: Path, repo_id: str, splits: dict[str, list[dict]]) -> None:
    """Lay out `datasets`' own cache as if `repo_id` had been downloaded once, for offline loading."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    name = repo_id.split("/")[-1]
    raw = cache.parent / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (raw / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = DataFilesDict.from_patterns({s: [str(raw / f"{s}.jsonl")] for s in splits})
    builder = Json(cache_dir=str(cache.parent / "build"), dataset_name=name, data_files=files)
    builder.download_and_prepare()
    target = cache / repo_id.replace("/", "___") / "default" / "0.0.0" / ("0" * 16)
    target.mkdir(parents=True)
    for file in Path(builder.cache_dir).iterdir():
        if file.suffix in (".arrow", ".json"):
            (target / file.name).write_bytes(file.read_bytes())


def record_activations(trainer) -> list[dict[str, int]]:
    """Every config the trainer's super-network activates from now on (resolved), in order."""
    seen: list[dict[str, int]] = []
    original = trainer.supernet.activate

    def spy(config):
        seen.append(trainer.supernet.resolve(config))
        return original(config)

    trainer.supernet.activate = spy
    return seen


class StopAt(TrainerCallback):
    """Stops training after `step` optimizer steps (a run cut short, to test resuming)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
