"""Training data: files, folders and Hub data sets, and instruction rows with completion-only labels."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import byte_level_bpe, hub_dataset_cache
from datasets import Dataset

from hf_elastic.data import (
    IGNORE_INDEX,
    InstructionFormat,
    completion_collator,
    encode_text,
    load_rows,
    prompts_and_answers,
    tokenize_rows,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["Question: what is two plus two? Answer: four #### 4", "user assistant system hello there"] * 30
    special = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = byte_level_bpe(corpus, 400, special, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def learned_text(tokenizer, row: dict) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])


def test_prompt_completion_learns_only_the_completion(tokenizer) -> None:
    rows = Dataset.from_dict({"prompt": ["Question: what is two plus two?"], "completion": [" Answer: four"]})
    out = tokenize_rows(rows, tokenizer, 64)[0]
    prompt_ids = encode_text(tokenizer, "Question: what is two plus two?")
    completion_ids = tokenizer.encode(" Answer: four", add_special_tokens=False)
    assert out["input_ids"] == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert out["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]
    assert out["attention_mask"] == [1] * len(out["input_ids"])
    everything = tokenize_rows(rows, tokenizer, 64, InstructionFormat(completion_only=False))[0]
    assert everything["labels"] == everything["input_ids"]


def test_messages_learn_every_assistant_turn_and_nothing_else(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "hello"},
        {"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hello"},
    ]
    out = tokenize_rows(Dataset.from_dict({"messages": [messages]}), tokenizer, 256)[0]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert out["input_ids"] == tokenizer.encode(full, add_special_tokens=False)  # one BOS, no EOS appended
    assert learned_text(tokenizer, out) == "four<|im_end|>\nhello<|im_end|>\n"
    assert out["input_ids"].count(tokenizer.bos_token_id) == 1


def test_template_with_response_template(tokenizer) -> None:
    rows = Dataset.from_dict({"q": ["what is two plus two?"], "a": ["four #### 4"]})
    fmt = InstructionFormat(template="Question: {q} Answer:{a}", response_template="Answer:")
    out = tokenize_rows(rows, tokenizer, 64, fmt)[0]
    assert learned_text(tokenizer, out) == "four #### 4</s>"
    prompts, answers = prompts_and_answers(rows, fmt, tokenizer)
    assert prompts == ["Question: what is two plus two? Answer:"] and answers == ["four #### 4"]
    plain = tokenize_rows(rows, tokenizer, 64, InstructionFormat(template="Question: {q} Answer:{a}"))[0]
    assert plain["labels"] == plain["input_ids"]  # no response template: continued pre-training


def test_truncation_drops_rows_without_a_completion_and_caps_positions(tokenizer) -> None:
    rows = Dataset.from_dict({"prompt": ["hello there " * 20, "hello"], "completion": [" four", " four"]})
    with pytest.warns(UserWarning, match="1 of 2 rows have nothing to learn within 8 tokens"):
        out = tokenize_rows(rows, tokenizer, 8)
    assert len(out) == 1 and len(out[0]["input_ids"]) <= 8
    with pytest.warns(UserWarning, match="exceeds the model's 6 positions; rows are cut to 6"):
        capped = tokenize_rows(
            rows.select([0]), tokenizer, 64, max_positions=6, fmt=InstructionFormat(completion_only=False)
        )
    assert len(capped[0]["input_ids"]) == 6


def test_packing_fills_blocks(tokenizer) -> None:
    rows = Dataset.from_dict({"prompt": ["hello there"] * 10, "completion": [" four"] * 10})
    unpacked = tokenize_rows(rows, tokenizer, 64)
    total = sum(len(r) for r in unpacked["input_ids"])
    packed = tokenize_rows(rows, tokenizer, 16, packing=True)
    assert len(packed) == total // 16 and all(len(r) == 16 for r in packed["input_ids"])
    flat = [t for r in unpacked["labels"] for t in r][: 16 * len(packed)]
    assert [t for r in packed["labels"] for t in r] == flat


def test_collator_pads_right(tokenizer) -> None:
    rows = tokenize_rows(
        Dataset.from_dict({"prompt": ["hello", "hello there"], "completion": [" four"] * 2}), tokenizer, 64
    )
    batch = completion_collator(tokenizer, pad_to_multiple_of=8)([rows[0], rows[1]])
    assert batch["input_ids"].shape[1] % 8 == 0
    n = len(rows[0]["input_ids"])
    assert batch["attention_mask"][0, n:].sum() == 0 and (batch["labels"][0, n:] == -100).all()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_files(tmp_path: Path, suffix: str) -> None:
    data = Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"]})
    path = tmp_path / f"rows{suffix}"
    {".jsonl": lambda: data.to_json(path), ".json": lambda: data.to_json(path), ".csv": lambda: data.to_csv(path),
     ".parquet": lambda: data.to_parquet(path)}[suffix]()  # fmt: skip
    rows = load_rows(str(path), limit=2)
    assert rows["prompt"] == ["a", "b"] and rows["completion"] == ["x", "y"]


def test_text_file_and_saved_dataset(tmp_path: Path) -> None:
    (tmp_path / "lines.txt").write_text("first line\n\nsecond line\n")
    assert load_rows(str(tmp_path / "lines.txt"))["text"] == ["first line", "second line"]
    Dataset.from_dict({"text": ["saved"]}).save_to_disk(tmp_path / "saved")
    assert load_rows(str(tmp_path / "saved"))["text"] == ["saved"]


def test_hub_dataset_id_offline_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config

    cache = tmp_path / "datasets"
    splits = {"train": [{"prompt": "q", "completion": "a"}] * 3, "test": [{"prompt": "t", "completion": "b"}]}
    hub_dataset_cache(cache, "acme/tiny-sft", splits)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert len(load_rows("acme/tiny-sft")) == 3
    assert load_rows("acme/tiny-sft", split="test")["prompt"] == ["t"]
    with pytest.raises(ValueError, match=r"--data acme/tiny-sft: .*Pass --split"):
        load_rows("acme/tiny-sft", split="validation")
    with pytest.raises(
        FileNotFoundError, match=r"--eval-data acme/missing is neither a local file or folder nor a Hub"
    ):
        load_rows("acme/missing", option="--eval-data")


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda p: str(p / "none.jsonl"), FileNotFoundError, r"--data .*none.jsonl does not exist"),
        (lambda p: (p / "x.xlsx").write_text("a") and str(p / "x.xlsx"), ValueError, r"use a \.jsonl, .* file"),
        (lambda p: (p / "e.jsonl").write_text("") == 0 and str(p / "e.jsonl"), ValueError, r"holds no rows|could not"),
        (lambda p: (p / "b.jsonl").write_text("{oops\n") and str(p / "b.jsonl"), ValueError, r"could not be read as"),
    ],
    ids=["missing", "suffix", "empty", "broken"],
)
def test_load_errors(tmp_path: Path, make, error, message) -> None:
    with pytest.raises(error, match=message):
        load_rows(make(tmp_path))


def test_format_errors(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"no 'messages', 'prompt'\+'completion' or 'text' column. Pass --template"):
        InstructionFormat().shape(["question", "answer"])
    with pytest.raises(ValueError, match=r"--template uses column 'q'"):
        tokenize_rows(Dataset.from_dict({"x": ["a"]}), tokenizer, 8, InstructionFormat(template="{q}"))
    with pytest.raises(ValueError, match=r"--response-template 'A:' does not occur"):
        rows = Dataset.from_dict({"q": ["a"]})
        tokenize_rows(rows, tokenizer, 8, InstructionFormat(template="{q}", response_template="A:"))
    with pytest.raises(ValueError, match="is not a valid template"):
        InstructionFormat(template="{unclosed")
    plain = byte_level_bpe(["a b"] * 5, 300, ["</s>"], eos_token="</s>")
    with pytest.raises(ValueError, match="has no chat template"):
        tokenize_rows(Dataset.from_dict({"messages": [[{"role": "user", "content": "a"}]]}), plain, 8)
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_rows(Dataset.from_dict({"messages": [[{"role": "user", "content": "a"}]]}), tokenizer, 8)
    with pytest.raises(ValueError, match="Task metrics need a prompt and an answer"):
        prompts_and_answers(Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(ValueError, match="--seq-len must be at least 1"):
        tokenize_rows(Dataset.from_dict({"text": ["a"]}), tokenizer, 0)
