"""Training and evaluation data: local files or Hub data sets, and instruction rows tokenized trl-style.

Rows come in one of four shapes, told apart by their columns (as trl's `SFTTrainer` does):

- `messages`: a list of `{"role", "content"}` turns, rendered with the tokenizer's chat template; every assistant turn
  is learned, the rest is context;
- `prompt` and `completion`: the completion is learned, the prompt is context;
- any columns plus a `template` such as `"Question: {question}\\nAnswer: {answer}"`, split into prompt and completion
  at the first `response_template` (e.g. `"Answer:"`);
- `text` (or a `template` without `response_template`): every token is learned (continued pre-training).

Tokens that are not learned get the label -100, so the loss covers the completion only (`completion_only=True`).
"""

from __future__ import annotations

import bisect
import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_rows(
    source: str,
    *,
    config: str | None = None,
    split: str = "train",
    revision: str | None = None,
    limit: int | None = None,
    option: str = "--data",
) -> Any:
    """Load a `datasets.Dataset` from a local file (.jsonl/.json/.csv/.parquet/.txt), a local folder or a Hub id.

    Args:
        source: a file, a folder of data files, a folder written by `Dataset.save_to_disk`, or a Hub data set id such
            as `"openai/gsm8k"` (offline, the `datasets` cache is used).
        config: the Hub data set's configuration (e.g. `"main"` for GSM8K).
        split: the split to read; local files have one split, `"train"`.
        revision: a branch, tag or commit of a Hub data set.
        limit: keep the first `limit` rows.
        option: the option name used in error messages (`--data`, `--eval-data`, ...).
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(source)
    if limit is not None and limit < 1:
        raise ValueError(f"{option}: the row limit must be at least 1, got {limit}.")
    if path.is_file():
        kind = DATA_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise ValueError(
                f"{option} {source}: use a {', '.join(DATA_SUFFIXES)} file, a folder or a Hub data set id."
            )
        if path.stat().st_size == 0:
            raise ValueError(f"{option} {source} is an empty file: it holds no rows.")
        try:
            rows = load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for unreadable files
            raise ValueError(f"{option} {source} could not be read as {kind}: {err}") from None
        if kind == "text":
            rows = rows.filter(lambda row: bool(row["text"].strip()))
    elif path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        rows = load_from_disk(str(path))
        if isinstance(rows, DatasetDict):
            rows = _pick_split(rows, split, source, option)
    elif not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"{option} {source} does not exist.")
    else:  # a folder of data files, or a Hub id
        rows = _hub_or_folder(source, config, split, revision, option)
    if not isinstance(rows, Dataset):
        raise ValueError(f"{option} {source} did not give a table of rows (got {type(rows).__name__}).")
    if len(rows) == 0:
        raise ValueError(f"{option} {source} (split {split!r}) holds no rows.")
    return rows.select(range(min(limit, len(rows)))) if limit else rows


def _pick_split(rows: Any, split: str, source: str, option: str) -> Any:
    if split not in rows:
        raise ValueError(f"{option} {source} has no split {split!r}; it has {sorted(rows)}. Pass --split <name>.")
    return rows[split]


def _hub_or_folder(source: str, config: str | None, split: str, revision: str | None, option: str) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(source, config, split=split, revision=revision)
    except ValueError as err:
        if "split" in str(err).lower() and "unknown" in str(err).lower() or "should be one of" in str(err):
            raise ValueError(f"{option} {source}: {err} Pass --split <name>.") from None
        if "config" in str(err).lower():
            raise ValueError(f"{option} {source}: {err} Pass --data-config <name>.") from None
        raise ValueError(f"{option} {source}: {err}") from None
    except (ConnectionError, FileNotFoundError, OSError) as err:
        raise FileNotFoundError(
            f"{option} {source} is neither a local file or folder nor a Hub data set that can be reached or is cached "
            f"({type(err).__name__}: {err}). Check the path or id; offline, load it once with network first."
        ) from None


@dataclass
class InstructionFormat:
    """How rows become token ids and labels; see the module docstring for the four row shapes.

    Args:
        template: a `str.format` template over the row's columns, e.g. `"Q: {question}\\nA: {answer}"`.
        response_template: the text after which the completion starts (inside `template`'s output).
        completion_only: learn only the completion (labels -100 on the prompt); False learns every token.
        text_column: the column of plain text rows.
    """

    template: str | None = None
    response_template: str | None = None
    completion_only: bool = True
    text_column: str = "text"

    def __post_init__(self) -> None:
        if self.response_template is not None and not self.response_template:
            raise ValueError("InstructionFormat.response_template='' is empty; pass the text before the answer.")
        if self.template is not None:
            try:
                self.template.format_map(_Probe())
            except (ValueError, IndexError) as err:
                raise ValueError(
                    f"InstructionFormat.template={self.template!r} is not a valid template: {err}."
                ) from None

    def shape(self, columns: Sequence[str]) -> str:
        """The row shape for these columns: 'messages', 'prompt_completion', 'template' or 'text'."""
        if self.template is not None:
            return "template"
        if "messages" in columns:
            return "messages"
        if "prompt" in columns and "completion" in columns:
            return "prompt_completion"
        if self.text_column in columns:
            return "text"
        raise ValueError(
            f"Rows with columns {list(columns)} have no 'messages', 'prompt'+'completion' or {self.text_column!r} "
            "column. Pass --template '<text with {column} fields>' (and --response-template) to say how a row reads."
        )

    def segments(self, row: Mapping[str, Any], shape: str, tokenizer: Any) -> list[tuple[str, bool]]:
        """The row as text pieces, each with whether it is learned."""
        learn_all = not self.completion_only
        if shape == "text":
            return [(str(row[self.text_column]), True)]
        if shape == "prompt_completion":
            return [(str(row["prompt"]), learn_all), (str(row["completion"]), True)]
        if shape == "template":
            try:
                text = self.template.format(**row)
            except KeyError as err:
                raise ValueError(f"--template uses column {err}, but the rows have {sorted(row)}.") from None
            if self.response_template is None:
                return [(text, True)]
            cut = text.find(self.response_template)
            if cut < 0:
                raise ValueError(
                    f"--response-template {self.response_template!r} does not occur in the row {text[:80]!r}. "
                    "Use text that --template puts right before every answer."
                )
            cut += len(self.response_template)
            return [(text[:cut], learn_all), (text[cut:], True)]
        return _chat_segments(row["messages"], tokenizer, learn_all)


class _Probe(dict):
    def __missing__(self, key: str) -> str:
        return ""


def _chat_segments(messages: Any, tokenizer: Any, learn_all: bool) -> list[tuple[str, bool]]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The rows have a 'messages' column, but the tokenizer has no chat template. Use a chat model's tokenizer, "
            "or pass --template/--response-template."
        )
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) and "role" in m for m in messages):
        raise ValueError(f"'messages' must be a list of {{'role', 'content'}} turns, got {str(messages)[:80]!r}.")

    def render(turns: list, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                "The chat template does not render each conversation prefix as a prefix of the next, so the "
                "assistant turns cannot be located. Pass --template/--response-template instead."
            )
        segments += [(prompt[len(done) :], learn_all), (full[len(prompt) :], True)]
        done = full
    if not segments:
        raise ValueError("A 'messages' row has no assistant turn to learn.")
    tail = render(messages, False)[len(done) :]
    return segments + ([(tail, learn_all)] if tail else [])


def special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer adds in front of a text (a BOS token, or nothing)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with the tokenizer's special prefix (BOS), unless the text already starts with it."""
    prefix = special_prefix(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids if prefix and ids[: len(prefix)] == prefix else prefix + ids


def prompts_and_answers(rows: Any, fmt: InstructionFormat | None = None, tokenizer: Any = None) -> tuple[list, list]:
    """Each row's prompt (everything before its last learned piece) and answer (that piece), for task metrics."""
    fmt = fmt or InstructionFormat()
    shape = fmt.shape(rows.column_names)
    if shape == "text":
        raise ValueError(
            "Task metrics need a prompt and an answer per row: use 'prompt'/'completion' or 'messages' columns, or "
            "--template with --response-template."
        )
    prompts, answers = [], []
    for row in rows:
        segments = fmt.segments(row, shape, tokenizer)
        last = max(i for i, (_, learned) in enumerate(segments) if learned)
        prompts.append("".join(text for text, _ in segments[:last]))
        answers.append(segments[last][0])
    return prompts, answers


def tokenize_rows(
    rows: Any,
    tokenizer: Any,
    seq_len: int,
    fmt: InstructionFormat | None = None,
    *,
    packing: bool = False,
    max_positions: int | None = None,
) -> Any:
    """Token ids, attention masks and labels (-100 where nothing is learned) of every row, as a `datasets.Dataset`.

    Rows are truncated to `min(seq_len, max_positions)` tokens; rows left with nothing to learn are dropped (with a
    warning). With `packing=True`, rows are concatenated (each ended by the EOS token) and cut into blocks of exactly
    that length, so no padding is computed.
    """
    from datasets import Dataset

    fmt = fmt or InstructionFormat()
    if seq_len < 1:
        raise ValueError(f"--seq-len must be at least 1, got {seq_len}.")
    length = min(seq_len, max_positions) if max_positions else seq_len
    if length < seq_len:
        warnings.warn(
            f"--seq-len {seq_len} exceeds the model's {max_positions} positions; rows are cut to {length}.",
            stacklevel=2,
        )
    shape = fmt.shape(rows.column_names)
    examples = [_row_tokens(fmt, row, shape, tokenizer) for row in rows]
    if packing:
        flat_ids = [t for ids, _ in examples for t in ids]
        flat_labels = [t for _, labels in examples for t in labels]
        blocks = len(flat_ids) // length
        if blocks == 0:
            raise ValueError(f"--packing needs at least {length} tokens of data; the rows hold {len(flat_ids)}.")
        columns = {
            "input_ids": [flat_ids[i * length : (i + 1) * length] for i in range(blocks)],
            "labels": [flat_labels[i * length : (i + 1) * length] for i in range(blocks)],
        }
    else:
        kept = [(ids[:length], labels[:length]) for ids, labels in examples]
        kept = [(ids, labels) for ids, labels in kept if any(t != IGNORE_INDEX for t in labels)]
        if len(kept) < len(examples):
            warnings.warn(
                f"{len(examples) - len(kept)} of {len(examples)} rows have nothing to learn within {length} tokens "
                "(the prompt fills them) and were dropped; raise --seq-len to keep them.",
                stacklevel=2,
            )
        if not kept:
            raise ValueError(f"No row has a completion within {length} tokens; raise --seq-len.")
        columns = {"input_ids": [ids for ids, _ in kept], "labels": [labels for _, labels in kept]}
    columns["attention_mask"] = [[1] * len(ids) for ids in columns["input_ids"]]
    return Dataset.from_dict(columns)


def check_token_rows(
    dataset: Any, name: str, max_positions: int | None = None, vocab_size: int | None = None, limit: int = 100_000
) -> None:
    """Raise a `ValueError` naming `name` when `dataset` is empty, or a row of its `input_ids` is longer than the
    model's `max_positions` or holds a token id outside its `vocab_size`, which would train on positions the model
    never learned (rotary models, silently) or fail inside an embedding (GPT-2's absolute positions).

    A `datasets.Dataset` is checked whole (with Arrow, without reading rows into Python); other sized datasets up to
    `limit` rows, and iterable ones not at all.
    """
    try:
        size = len(dataset)
    except TypeError:
        return
    if size == 0:
        raise ValueError(f"{name} is empty (0 rows): nothing to train on. Check the data file, split and filters.")
    lengths, top = _row_lengths_and_top_id(dataset, limit)
    if lengths is None:
        return
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if max_positions and lengths[longest] > max_positions:
        raise ValueError(
            f"{name} row {longest} has {lengths[longest]} tokens, more than the model's {max_positions} positions "
            "(config.max_position_embeddings / n_positions). Cut the rows to at most "
            f"{max_positions} tokens: hf-elastic train --seq-len {max_positions}, or tokenize with truncation=True, "
            f"max_length={max_positions} (hf_elastic.tokenize_rows cuts them for you)."
        )
    if vocab_size and top is not None and not 0 <= top[0] < vocab_size:
        raise ValueError(
            f"{name} holds token id {top[0]} (row {top[1]}), outside the model's vocabulary of {vocab_size}: the "
            "data was tokenized with another tokenizer. Tokenize it with the model's own."
        )


def _row_lengths_and_top_id(dataset: Any, limit: int) -> tuple[list[int] | None, tuple[int, int] | None]:
    """The `input_ids` length of each row and (the largest or a negative id, its row), or (None, None)."""
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        if "input_ids" not in dataset.column_names:
            return None, None
        import pyarrow.compute as pc

        column = dataset.with_format("arrow")["input_ids"]
        lengths = pc.list_value_length(column).to_pylist()
        flat = pc.list_flatten(column)
        if len(flat) == 0:
            return lengths, None
        low, high = pc.min_max(flat).values()
        value = high.as_py() if low.as_py() >= 0 else low.as_py()
        offsets = [0, *itertools.accumulate(lengths)]
        return lengths, (value, bisect.bisect_right(offsets, pc.index(flat, value).as_py()) - 1)
    if len(dataset) > limit:
        return None, None
    lengths, top = [], None
    for i in range(len(dataset)):
        row = dataset[i]
        ids = row.get("input_ids") if isinstance(row, Mapping) else None
        if ids is None:
            return None, None
        ids = torch.as_tensor(ids).reshape(-1)
        lengths.append(len(ids))
        if len(ids):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            if top is None or bad < 0 or (top[0] >= 0 and bad > top[0]):
                top = (bad, i)
    return lengths, top


def _row_tokens(fmt: InstructionFormat, row: Mapping[str, Any], shape: str, tokenizer: Any) -> tuple[list, list]:
    """Token ids and labels of one row, as `tokenize_rows` builds them before truncation (EOS appended)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, learn in fmt.segments(row, shape, tokenizer):
        piece = encode_text(tokenizer, text) if not ids else tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if learn else [IGNORE_INDEX] * len(piece)
    eos = tokenizer.eos_token_id
    if eos is not None and shape != "messages" and ids[-1:] != [eos]:
        ids.append(eos)
        labels.append(eos)
    return ids, labels


def fit_rows(rows: Any, tokenizer: Any, seq_len: int, fmt: InstructionFormat, column: str = "text") -> Any:
    """`rows` with `column` shortened (whole tokens off its end) so that each row, as `tokenize_rows` tokenizes it,
    fits in `seq_len` tokens: the rest of the template, such as a question after a long review and its answer,
    always survives. Rows that fit are unchanged.
    """
    if column not in rows.column_names:
        raise ValueError(f"fit_rows: the rows have no column {column!r}; they have {rows.column_names}.")
    shape = fmt.shape(rows.column_names)

    def length(row: Mapping[str, Any]) -> int:
        return len(_row_tokens(fmt, row, shape, tokenizer)[0])

    values = []
    for row in rows:
        text = row[column]
        if length(row) > seq_len:
            room = seq_len - length({**row, column: ""})
            if room < 1:
                raise ValueError(f"--seq-len {seq_len} leaves no room for the {column!r} column after the template.")
            ids = tokenizer.encode(text, add_special_tokens=False)[:room]
            text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
            while ids and length({**row, column: text}) > seq_len:  # re-tokenized, the cut text may merge differently
                ids = ids[:-1]
                text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        values.append(text)
    names = rows.column_names
    return rows.remove_columns(column).add_column(column, values).select_columns(names)


@dataclass
class CompletionCollator:
    """Right-pads `input_ids` (pad token), `attention_mask` (0) and `labels` (-100) to the longest row of a batch.

    Right padding keeps the default position ids correct, so no `position_ids` are needed during training.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([list(f[key]) + [value] * (longest - len(f[key])) for f in features], dtype=torch.long)
            for key, value in fill.items()
        }


def completion_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> CompletionCollator:
    """A `CompletionCollator` for `tokenizer` (its pad token, else its EOS token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first.")
    return CompletionCollator(pad, pad_to_multiple_of)


# --------------------------------------------------------------------------------------------------------------------
# The fine-food reviews task, shipped with the package
# --------------------------------------------------------------------------------------------------------------------

FINE_FOODS_DIR = Path(__file__).resolve().parent / "data_files" / "fine_foods"
"""The vendored JSONL files (built by `scripts/build_demo_data.py` from the Debian package `r-cran-modeldata`)."""
FINE_FOODS_LABELS = ("other", "great")
"""`label` 0 is "other" (fewer than 5 stars) and 1 is "great" (5 stars), as in modeldata's `score` column."""
FINE_FOODS_ANSWERS = (" negative", " positive")
"""The label words scored after `FINE_FOODS_FORMAT`'s prompt, one per label (the `answer` column)."""
FINE_FOODS_FORMAT = InstructionFormat(template="Review: {text}\nSentiment:{answer}", response_template="\nSentiment:")
"""The zero-shot prompt of the fine-food task. Chosen by zero-shot accuracy of SmolLM2-135M-Instruct on 100 test
rows against six other prompts (chat format, "great"/"other", "yes"/"no" to "5 stars?"): the chat-format prompts
put almost all predictions on one class."""


def load_fine_foods(split_sizes: Mapping[str, int] | None = None, data_dir: str | Path | None = None) -> Any:
    """Load the vendored Amazon fine-food reviews as a `datasets.DatasetDict` with `train` and `test` splits.

    Args:
        split_sizes: keep only the first `n` rows of the named splits, e.g. `{"train": 256, "test": 200}`. The files
            are stored in a fixed shuffled order, so a prefix is a deterministic sample with both labels.
        data_dir: a folder with `train.jsonl` and `test.jsonl`; defaults to the copy shipped in the package.

    Returns:
        `datasets.DatasetDict` with columns `text`, `label` (1 = great, 0 = other), `label_text` and `answer` (the
        label word of `FINE_FOODS_FORMAT`), ready for `tokenize_rows` and `prompts_and_answers`.
    """
    import json

    import datasets

    root = Path(data_dir) if data_dir is not None else FINE_FOODS_DIR
    files = {split: root / f"{split}.jsonl" for split in ("train", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fine-food data not found: {', '.join(missing)}. Build it from a source checkout with "
            "`python scripts/build_demo_data.py` (needs apt-get and `pip install hf-elastic[demo]`), "
            "or pass `data_dir=`."
        )
    split_sizes = dict(split_sizes or {})
    unknown = set(split_sizes) - set(files)
    if unknown:
        raise ValueError(f"Unknown split(s) {sorted(unknown)}; the fine-food data has {sorted(files)}.")
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(FINE_FOODS_LABELS)),
            "label_text": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    out = {}
    for split, path in files.items():
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        n = split_sizes.get(split)
        if n is not None:
            if n > len(rows):
                raise ValueError(f"split_sizes[{split!r}]={n} but {path} has only {len(rows)} rows.")
            rows = rows[:n]
        columns = {
            "text": [r["text"] for r in rows],
            "label": [int(r["label"]) for r in rows],
            "label_text": [r["label_text"] for r in rows],
            "answer": [FINE_FOODS_ANSWERS[int(r["label"])] for r in rows],
        }
        out[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(out)
