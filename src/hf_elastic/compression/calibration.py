"""Calibration data and the sequential layer-by-layer runner shared by Wanda pruning and GPTQ.

The runner embeds the calibration samples once, captures the inputs of the first transformer layer (hidden states
and the keyword arguments the model passes to its layers: attention mask, position embeddings, ...), then walks the
layers in order. For each layer it hooks the target modules to accumulate statistics of their inputs, runs every
sample through the layer, applies the per-module transform (prune, quantize) and runs the samples through the
transformed layer again to get the inputs of the next layer. Memory stays at one layer's activations.
"""

from __future__ import annotations

import inspect
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..devices import ieee_fp32_matmul
from ..models.arch import decoder_layers
from ..utils import matches_module

CalibrationData = Any
"""A `datasets.Dataset` (an `input_ids` column, or a `text` column with a tokenizer), a list of texts (with a
tokenizer), a list of token id sequences (tensors or lists), a 1-D/2-D tensor of token ids, or a single text."""


class Statistic(Protocol):
    """Accumulates the inputs of one module: `update(x)` gets a (tokens, in_features) float tensor."""

    def update(self, x: torch.Tensor) -> None: ...


class SquaredNorm:
    """Per-input-channel sum of squares of the activations, ‖X_j‖² (Wanda)."""

    def __init__(self, in_features: int, device: torch.device | None = None) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        self.sum += x.to(self.sum.device, torch.float32).pow(2).sum(0)
        self.tokens += x.shape[0]

    @property
    def norm(self) -> torch.Tensor:
        return self.sum.sqrt()


class Hessian:
    """Sum of XᵀX over the calibration tokens (GPTQ); `hessian` is the mean 2XᵀX/n."""

    def __init__(self, in_features: int, device: torch.device | None = None) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.to(self.sum.device, torch.float32)
        with ieee_fp32_matmul():
            self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.tokens, 1))


@dataclass(kw_only=True)
class CalibrationSettings:
    """Calibration fields (keyword-only) of `SparsityConfig` and `QuantizationConfig`, which also define `modules`."""

    seq_len: int | None = field(
        default=None,
        metadata={"help": "Tokens per calibration sample. None uses min(2048, the model's max positions)."},
    )
    num_samples: int = field(
        default=128, metadata={"help": "Calibration windows of seq_len tokens (rows are concatenated and cut)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Calibration samples per forward pass."})

    def _check_calibration(self, extra_positive: tuple[str, ...] = (), verb: str = "process") -> None:
        """`seq_len`, `num_samples`, `batch_size` and `extra_positive` must be positive integers; a single `modules`
        name becomes a list."""
        owner = type(self).__name__
        for name in (*extra_positive, "num_samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}.")
        seq_len = self.seq_len
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"{owner}.seq_len must be a positive integer or None, got {seq_len!r}.")
        if isinstance(self.modules, str):
            self.modules = [self.modules]
        if self.modules is not None and not self.modules:
            raise ValueError(f"{owner}.modules is empty. Pass None to {verb} every linear layer, or name some.")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


@dataclass
class LayerTargets:
    """One transformer layer (at `prefix` in the model) and the modules to process in it, keyed by full path."""

    prefix: str
    layer: nn.Module
    modules: dict[str, nn.Module]


def find_target_modules(
    model: nn.Module,
    modules: list[str] | None = None,
    predicate: Callable[[nn.Module], bool] = is_linear,
    caller: str = "this function",
) -> list[LayerTargets]:
    """The modules inside the transformer layers of `model` that `predicate` accepts, layer by layer.

    `modules` restricts them to paths inside a layer that end with one of the names (peft-style suffix match, e.g.
    `"q_proj"` or `"mlp.down_proj"`); embeddings and the LM head are never included. The layers are found by
    `decoder_layers`, so any Hugging Face model whose projections are `nn.Linear` or `Conv1D` works.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(modules, str):
        modules = [modules]
    out, matched = [], set()
    for prefix, layer in decoder_layers(model):
        found = {}
        for rel, module in layer.named_modules():
            if isinstance(module, BaseTunerLayer):
                raise ValueError(
                    f"{prefix}.{rel} carries a peft adapter. {caller} works on the base model: apply it before "
                    "get_peft_model, or merge_and_unload() the adapters first."
                )
            if not rel or not predicate(module):
                continue
            if modules is not None:
                hits = [m for m in modules if matches_module(rel, m)]
                if not hits:
                    continue
                matched.update(hits)
            found[f"{prefix}.{rel}"] = module
        out.append(LayerTargets(prefix, layer, found))
    if modules is not None and (missing := [m for m in modules if m not in matched]):
        raise ValueError(
            f"modules={modules!r}: {missing!r} match no linear module inside the transformer layers. Names are "
            f"matched as suffixes of paths inside a layer, e.g. {sorted({p.rsplit('.', 1)[-1] for p in _paths(out)})}."
        )
    if not any(t.modules for t in out):
        raise ValueError(
            f"{caller} found no nn.Linear / Conv1D modules inside the transformer layers of this {model_type} "
            "model; its projections are of another type."
        )
    return out


def _paths(targets: list[LayerTargets]) -> list[str]:
    return [p for t in targets for p in t.modules]


def _vocab_size(model: nn.Module) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    return getattr(getattr(model, "config", None), "vocab_size", None)


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _token_rows(data: CalibrationData, tokenizer: Any) -> Iterable[list[int]]:
    """Token id sequences, one per text / row of `data`, produced lazily."""

    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise ValueError(
                "Calibration data holds text but no tokenizer was given. Pass tokenizer=<the model's tokenizer>, or "
                "pass token ids (a dataset with an 'input_ids' column, or a list of id tensors)."
            )
        return list(tokenizer(text)["input_ids"])

    def row_ids(row: Any) -> list[int]:
        if isinstance(row, str):
            return encode(row)
        if isinstance(row, torch.Tensor):
            return row.reshape(-1).tolist()
        if hasattr(row, "tolist") and not isinstance(row, (list, tuple)):  # numpy arrays
            return row_ids(row.tolist())
        if isinstance(row, Mapping):
            if "input_ids" in row:
                return row_ids(row["input_ids"])
            if "text" in row:
                return encode(row["text"])
            raise ValueError(
                f"Calibration rows need an 'input_ids' or a 'text' field, got fields {sorted(row)}. Rename the "
                "column (dataset.rename_column) or pass a list of texts."
            )
        if isinstance(row, (list, tuple)) and all(isinstance(t, numbers.Integral) for t in row):
            return [int(t) for t in row]
        raise TypeError(
            f"Cannot read calibration row of type {type(row).__name__}; expected a text, a list of token ids or a "
            "tensor of token ids."
        )

    if isinstance(data, str):
        yield encode(data)
    elif isinstance(data, torch.Tensor):
        yield from (row.tolist() for row in (data[None] if data.dim() == 1 else data.reshape(-1, data.shape[-1])))
    elif hasattr(data, "column_names"):
        columns = data.column_names
        if "input_ids" not in columns and "text" not in columns:
            raise ValueError(
                f"Calibration dataset needs an 'input_ids' or a 'text' column, got {columns}. Rename the column "
                "holding the text with dataset.rename_column(<name>, 'text')."
            )
        key = "input_ids" if "input_ids" in columns else "text"
        yield from (row_ids(row[key]) for row in data)
    elif isinstance(data, Mapping) and "input_ids" in data:
        yield from _token_rows(data["input_ids"], tokenizer)
    elif isinstance(data, Iterable):
        yield from (row_ids(row) for row in data)
    else:
        raise TypeError(
            f"Unsupported calibration data of type {type(data).__name__}: pass a datasets.Dataset, a list of texts "
            "with a tokenizer, or a list of token id tensors."
        )


def prepare_calibration(
    data: CalibrationData,
    tokenizer: Any = None,
    seq_len: int = 2048,
    num_samples: int = 128,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Tokenize and pack calibration data into a (samples, seq_len) tensor of token ids.

    The rows are concatenated and cut into consecutive windows of `seq_len` tokens (as `group_texts` in the
    transformers examples): `num_samples` counts windows, not rows, and rows are read only until that many windows are
    full. When the data holds fewer tokens, a one-line warning says how many windows it gave; with fewer than
    `seq_len` tokens in all, the single shorter sample is returned.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    stream: list[int] = []
    needed = seq_len * num_samples
    rows = 0
    for ids in _token_rows(data, tokenizer):
        stream.extend(ids)
        rows += 1
        if len(stream) >= needed:
            break
    if not stream:
        raise ValueError(
            "The calibration data is empty (0 tokens). Pass a non-empty dataset or list of texts, e.g. a few "
            "hundred samples of the pretraining or task data."
        )
    n = min(len(stream) // seq_len, num_samples)
    if n < num_samples:
        got = f"{n} windows of {seq_len} tokens" if n else f"one window of {len(stream)} tokens (< seq_len={seq_len})"
        warnings.warn(
            f"Calibrating on {got}: all {rows} rows hold {len(stream)} tokens, fewer than num_samples={num_samples} "
            f"windows need ({needed}). Pass more rows, or a smaller num_samples or seq_len.",
            stacklevel=3,
        )
    if n == 0:
        ids = torch.tensor([stream], dtype=torch.long)
    else:
        ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).reshape(n, seq_len)
    check_token_ids(ids, vocab_size)
    return ids


def check_token_ids(ids: torch.Tensor, vocab_size: int | None) -> None:
    """Raise when token ids fall outside the model's vocabulary (data tokenized for another model)."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        raise ValueError(
            f"Calibration token id {bad} is outside the model's vocabulary [0, {vocab_size}): the data was "
            "tokenized with a different tokenizer. Pass tokenizer=<this model's tokenizer> (e.g. "
            "AutoTokenizer.from_pretrained(<the model's name>)) or re-tokenize the dataset with it."
        )


def calibration_ids(
    model: nn.Module, data: CalibrationData, tokenizer: Any, seq_len: int | None, num_samples: int
) -> torch.Tensor:
    """`prepare_calibration` with the model's vocabulary and position limit; `seq_len=None` picks min(2048, limit)."""
    limit = max_positions(model)
    if seq_len is None:
        seq_len = min(2048, limit) if limit else 2048
    elif limit and seq_len > limit:
        raise ValueError(f"seq_len={seq_len} exceeds the model's {limit} positions. Pass seq_len <= {limit}.")
    return prepare_calibration(data, tokenizer, seq_len, num_samples, _vocab_size(model))


class _Captured(Exception):
    pass


def _first_layer_inputs(
    model: nn.Module, layer: nn.Module, input_ids: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, tuple, dict[str, Any]]]:
    """Run the model up to the first transformer layer for each batch; keep the layer's (hidden, args, kwargs)."""
    from transformers.cache_utils import Cache

    captured = []

    def no_cache(v: Any) -> Any:
        return None if isinstance(v, Cache) else v

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = {k: no_cache(v) for k, v in kwargs.items()}
        if args:
            hidden, args = args[0], tuple(no_cache(a) for a in args[1:])
        else:
            hidden = kwargs.pop("hidden_states")
        captured.append((hidden, args, kwargs))
        raise _Captured

    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    device = next(model.parameters()).device
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), **extra)
            except _Captured:
                continue
            raise RuntimeError("The model finished its forward pass without calling its first transformer layer.")
    finally:
        handle.remove()
    return captured


def _layer_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise TypeError(f"Cannot read the hidden states from a layer output of type {type(out).__name__}.")


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: list[LayerTargets],
    make_statistic: Callable[[str, nn.Module], Statistic],
    transform: Callable[[str, nn.Module, Statistic], None],
    batch_size: int = 8,
    desc: str = "calibration",
    show_progress: bool = True,
) -> None:
    """Sequential calibration: per layer, accumulate input statistics of `targets`, transform, propagate.

    `make_statistic(path, module)` creates the accumulator of one module; `transform(path, module, statistic)` is
    called once per module after the whole calibration set went through its layer. It may modify the module in
    place or replace it in its parent; the layer is then re-run on the transformed modules to produce the inputs of
    the next layer.
    """
    training = model.training
    model.eval()
    try:
        states = _first_layer_inputs(model, targets[0].layer, input_ids, batch_size)
        last = max(i for i, t in enumerate(targets) if t.modules)
        for target in tqdm(targets[: last + 1], desc=desc, unit="layer", disable=not show_progress):
            layer = target.layer
            stats = {path: make_statistic(path, module) for path, module in target.modules.items()}
            handles = []
            for path, module in target.modules.items():

                def hook(mod: nn.Module, args: tuple, stat: Statistic = stats[path]) -> None:
                    x = args[0]
                    stat.update(x.reshape(-1, x.shape[-1]))

                handles.append(module.register_forward_pre_hook(hook))
            try:
                if stats:
                    for hidden, args, kwargs in states:
                        layer(hidden, *args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            for path, module in target.modules.items():
                transform(path, module, stats.pop(path))
            if target is targets[last]:
                break
            for i, (hidden, args, kwargs) in enumerate(states):
                states[i] = (_layer_output(layer(hidden, *args, **kwargs)), args, kwargs)
    finally:
        model.train(training)
