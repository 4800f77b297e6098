"""Task metrics of the active sub-network: label-word accuracy (classification) and exact match (GSM8K style)."""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..data import InstructionFormat, encode_text, prompts_and_answers
from ..devices import module_device
from ..nas.search_space import SubnetConfig
from ..nas.supernet import SuperNetwork
from .evaluators import Evaluator

GSM8K_ANSWER = r"####\s*(-?[\d,]*\.?\d+)"


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _left_padded(rows: Sequence[list[int]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return {"input_ids": ids, "attention_mask": mask}


def _length_batches(rows: Sequence[list[int]], size: int) -> Iterator[list[int]]:
    """Indices of `rows` in batches of `size`, shortest rows first: rows of like length share a batch, so little
    padding is computed (a third of the tokens on the demo's reviews)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), size):
        yield order[start : start + size]


def _scoring_kwargs(model: Any) -> dict[str, Any]:
    """`use_cache=False` and `logits_to_keep=1` where the (base) model's `forward` takes them; none for optimum-intel's
    OpenVINO models, whose `forward` takes neither."""
    if type(model).__module__.startswith("optimum"):
        return {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes them on
    try:
        params = inspect.signature(base.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return {}
    return {k: v for k, v in {"use_cache": False, "logits_to_keep": 1}.items() if k in params}


class LabelWordEvaluator(Evaluator):
    """Accuracy of the label word with the highest next-token logit after each prompt.

    As a search objective it scores the active sub-network (`supernet.model`); `logits(model)` and `accuracy(model)`
    score any causal LM: a transformers or peft model, a merged or sliced export, or an optimum-intel
    `OVModelForCausalLM`. Prompts are batched by length and left-padded with explicit position ids, so a batch scores
    as the prompts one by one.

    Args:
        prompts: the texts the label word follows.
        labels: the index into `label_words` of each prompt's answer.
        label_words: one word per class; the first token of each is scored (they must differ), so include a leading
            space where the word follows a space (`" positive"`).
        tokenizer: the model's tokenizer.
        batch_size: prompts per forward pass.
    """

    name, direction, scores_merged = "accuracy", "maximize", True

    def __init__(
        self,
        prompts: Sequence[str],
        labels: Sequence[int],
        label_words: Sequence[str],
        tokenizer: Any,
        batch_size: int = 8,
    ) -> None:
        if len(prompts) != len(labels) or not prompts:
            raise ValueError(
                f"LabelWordEvaluator needs as many labels as prompts (>0); got {len(prompts)} and {len(labels)}."
            )
        if len(label_words) < 2:
            raise ValueError(f"LabelWordEvaluator needs at least two label words, got {list(label_words)}.")
        bad = [label for label in labels if not 0 <= label < len(label_words)]
        if bad:
            raise ValueError(f"Labels {sorted(set(bad))[:5]} are outside 0..{len(label_words) - 1} (the label words).")
        if batch_size < 1:
            raise ValueError(f"LabelWordEvaluator batch_size={batch_size} must be at least 1.")
        token_ids = []
        for word in label_words:
            ids = tokenizer.encode(word, add_special_tokens=False)
            if not ids:
                raise ValueError(f"Label word {word!r} has no tokens.")
            token_ids.append(ids[0])
        if len(set(token_ids)) < len(token_ids):
            raise ValueError(f"Label words {list(label_words)} start with the same token; pick words that differ.")
        self.prompts, self.labels, self.tokenizer, self.batch_size = list(prompts), list(labels), tokenizer, batch_size
        self.token_ids = token_ids
        self._rows = [encode_text(tokenizer, p) for p in self.prompts]

    @classmethod
    def from_answers(
        cls, prompts: Sequence[str], answers: Sequence[str], label_words: Sequence[str], tokenizer: Any, **kwargs: Any
    ) -> LabelWordEvaluator:
        """Build it from answer texts, each equal to one of `label_words` (compared without surrounding spaces)."""
        words = [w.strip() for w in label_words]
        labels = []
        for answer in answers:
            if answer.strip() not in words:
                raise ValueError(f"The answer {answer.strip()!r} is none of the label words {list(label_words)}.")
            labels.append(words.index(answer.strip()))
        return cls(prompts, labels, label_words, tokenizer, **kwargs)

    @classmethod
    def from_rows(
        cls, rows: Any, label_words: Sequence[str], tokenizer: Any, fmt: InstructionFormat | None = None, **kwargs: Any
    ) -> LabelWordEvaluator:
        """Build it from data rows: each row's prompt and answer as `fmt` reads them (`data.prompts_and_answers`)."""
        prompts, answers = prompts_and_answers(rows, fmt, tokenizer)
        return cls.from_answers(prompts, answers, label_words, tokenizer, **kwargs)

    @torch.no_grad()
    def logits(self, model: Any) -> torch.Tensor:
        """The label words' next-token logits after each prompt, shape `(len(prompts), len(label_words))`, on CPU."""
        device, extra, pad = module_device(model), _scoring_kwargs(model), _pad_id(self.tokenizer)
        training = getattr(model, "training", None)
        if training is not None:
            model.eval()
        out = torch.empty(len(self._rows), len(self.token_ids))
        try:
            for part in _length_batches(self._rows, self.batch_size):
                batch = _left_padded([self._rows[i] for i in part], pad, device)
                # explicit positions: left padding must not shift them (matches unpadded one-by-one scoring)
                positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                logits = model(**batch, position_ids=positions, **extra).logits[:, -1, self.token_ids]
                out[part] = torch.as_tensor(logits).float().cpu()
        finally:
            if training is not None:
                model.train(training)
        return out

    def split(self) -> list[LabelWordEvaluator]:
        """One evaluator per batch that `logits` runs (the same prompts, padding and order), e.g. to time several
        models batch by batch in turn; their correct answers add up to this evaluator's."""
        parts = []
        for part in _length_batches(self._rows, self.batch_size):
            one = copy.copy(self)
            one.prompts, one.labels = [self.prompts[i] for i in part], [self.labels[i] for i in part]
            one._rows = [self._rows[i] for i in part]
            parts.append(one)
        return parts

    def correct(self, model: Any) -> int:
        """How many prompts' highest-scoring label word is the right one."""
        return int((self.logits(model).argmax(-1) == torch.tensor(self.labels)).sum())

    def accuracy(self, model: Any) -> float:
        """The share of prompts whose highest-scoring label word is the right one."""
        return self.correct(model) / len(self.labels)

    def __call__(self, supernet: SuperNetwork, config: SubnetConfig) -> float:
        return self.accuracy(supernet.model)


def extract_answer(text: str, pattern: str) -> str | None:
    """The first match of `pattern` in `text` (its first group if it has one), without commas and outer spaces."""
    match = re.search(pattern, text)
    if match is None:
        return None
    value = match.group(1) if match.groups() else match.group(0)
    return value.replace(",", "").strip().rstrip(".")


class ExactMatchEvaluator(Evaluator):
    """Share of prompts whose greedy generation contains the reference's final answer (GSM8K-style exact match).

    The answer is extracted from both the generation and the reference with `answer_regex` (default: the number
    after `####`, as GSM8K writes it); a reference without a match is used whole.

    Args:
        prompts: the questions as the model sees them (the chat template already applied, if any).
        references: the reference completions.
        tokenizer: the model's tokenizer.
        answer_regex: a regular expression; its first group (or whole match) is the answer.
        max_new_tokens: generation length.
        batch_size: prompts per `generate` call.
    """

    name, direction, scores_merged = "exact_match", "maximize", True

    def __init__(
        self,
        prompts: Sequence[str],
        references: Sequence[str],
        tokenizer: Any,
        answer_regex: str = GSM8K_ANSWER,
        max_new_tokens: int = 256,
        batch_size: int = 8,
    ) -> None:
        if len(prompts) != len(references) or not prompts:
            raise ValueError(
                f"ExactMatchEvaluator needs as many references as prompts (>0); got {len(prompts)} and "
                f"{len(references)}."
            )
        try:
            re.compile(answer_regex)
        except re.error as err:
            raise ValueError(f"answer_regex={answer_regex!r} is not a regular expression: {err}.") from None
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
        self.prompts, self.tokenizer = list(prompts), tokenizer
        self.answer_regex, self.max_new_tokens, self.batch_size = answer_regex, max_new_tokens, batch_size
        self.answers = [extract_answer(r, answer_regex) or r.strip() for r in references]
        self._rows = [encode_text(tokenizer, p) for p in self.prompts]

    @torch.no_grad()
    def __call__(self, supernet: SuperNetwork, config: SubnetConfig) -> float:
        model = supernet.model
        pad = _pad_id(self.tokenizer)
        correct = 0
        for part in _length_batches(self._rows, self.batch_size):
            batch = _left_padded([self._rows[i] for i in part], pad, module_device(model))
            out = model.generate(
                **batch, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad, num_beams=1
            )
            texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(
                extract_answer(t, self.answer_regex) == self.answers[i] for t, i in zip(texts, part, strict=True)
            )
        return correct / len(self.prompts)
