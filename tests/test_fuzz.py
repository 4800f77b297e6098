"""Property-based fuzzing of every user-facing config field and every JSON file hf-elastic reads.

Invalid values and damaged files must give a `ValueError`/`FileNotFoundError` that names the field or the file (on
the command line: one `error:` line, exit status 1), never another exception type and never pass silently. The
default profile runs a fixed number of derandomized examples per test; `HF_ELASTIC_FUZZ=long` runs many more, with
fresh randomness.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import types
import typing
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_elastic import ElasticLoraConfig, NLSConfig
from hf_elastic.compression.quantization.quantize import QuantizationConfig
from hf_elastic.compression.sparsity import SparsityConfig
from hf_elastic.nas.trainer import NASArgumentsMixin, NASTrainingArguments
from hf_elastic.search.searcher import SearchConfig

LONG = os.environ.get("HF_ELASTIC_FUZZ") == "long"
FUZZ = settings(
    max_examples=500 if LONG else 25,
    deadline=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
EXPECTED = (ValueError, FileNotFoundError)

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(-4, 70), st.floats(-2, 2), st.text(max_size=3)), max_size=4),
    st.lists(st.lists(st.text(max_size=4), max_size=2), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2),
)


def _matches(value, hint) -> bool:
    """Whether `value` has the type `hint` (an annotation of a config field), recursively for containers."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and (not args or all(_matches(k, args[0]) for k in value))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _own_fields(cls: type) -> list[dataclasses.Field]:
    if cls is NASTrainingArguments:
        return list(dataclasses.fields(NASArgumentsMixin))
    names = getattr(cls, "elastic_fields", None)
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in names and f.name != "base_fingerprint"] if names else list(fields)


BASES = {
    NLSConfig: {"target_modules": ["q_proj"], "rank_choices": [8, 4]},
    ElasticLoraConfig: {"target_modules": ["q_proj"], "rank_choices": [8, 4]},
    NASTrainingArguments: {"output_dir": "unused", "report_to": "none"},
    SparsityConfig: {},
    QuantizationConfig: {},
    SearchConfig: {},
}
CASES = [(cls, f.name) for cls in BASES for f in _own_fields(cls)]


@pytest.mark.parametrize(("cls", "name"), CASES, ids=[f"{c.__name__}.{n}" for c, n in CASES])
@FUZZ
@given(value=JUNK)
def test_config_field_rejects_invalid_values_by_name(cls, name, value) -> None:
    hints = typing.get_type_hints(cls)
    try:
        config = cls(**(BASES[cls] | {name: value}))
    except EXPECTED as error:
        assert name in str(error), f"{cls.__name__}({name}={value!r}): {error}"
        return
    kept = getattr(config, name)
    assert _matches(kept, hints[name]), f"{cls.__name__}({name}={value!r}) passed silently as {kept!r}"


# ---------------------------------------------------------------------------------------------- damaged JSON files


def _damage(data, draw):
    """`data` with one value replaced by junk, one key removed or added, at a random depth."""
    if isinstance(data, dict) and data:
        key = draw(st.sampled_from(sorted(data, key=str)))
        action = draw(st.sampled_from(["junk", "drop", "deeper", "add"]))
        if action == "junk":
            return data | {key: draw(JUNK)}
        if action == "drop":
            return {k: v for k, v in data.items() if k != key}
        if action == "add":
            return data | {draw(st.text(min_size=1, max_size=5)): draw(JUNK)}
        return data | {key: _damage(data[key], draw)}
    if isinstance(data, list) and data:
        i = draw(st.integers(0, len(data) - 1))
        return [*data[:i], _damage(data[i], draw) if draw(st.booleans()) else draw(JUNK), *data[i + 1 :]]
    return draw(JUNK)


@st.composite
def damaged_text(draw, original: str) -> str:
    kind = draw(st.sampled_from(["value", "value", "value", "truncated", "bytes", "not-object"]))
    if kind == "truncated":
        return original[: draw(st.integers(0, max(len(original) - 1, 0)))]
    if kind == "bytes":
        return draw(st.binary(max_size=40)).decode("latin-1")
    if kind == "not-object":
        return json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.text(max_size=4))))
    return json.dumps(_damage(json.loads(original), draw), allow_nan=True)


def _check_reader(path: Path, original: str, text: str, read) -> None:
    path.write_text(text)
    try:
        read()
    except EXPECTED as error:
        assert path.name in str(error), f"{path.name} damaged as {text[:200]!r}: {error}"
    finally:
        path.write_text(original)


@pytest.fixture(scope="module")
def super_adapter(tmp_path_factory) -> Path:
    from conftest import ARCHS, peft_kwargs
    from peft import get_peft_model

    path = tmp_path_factory.mktemp("fuzz") / "super"
    config = ElasticLoraConfig(**peft_kwargs(ARCHS["llama"], rank_choices=[8, 4], ffn_width_choices=[1.0, 0.5]))
    get_peft_model(ARCHS["llama"].build(), config).save_pretrained(path)
    return path


@FUZZ
@given(data=st.data())
def test_damaged_elastic_config_is_named(super_adapter, data) -> None:
    path = super_adapter / "elastic_config.json"
    original = path.read_text()
    text = data.draw(damaged_text(original))
    _check_reader(path, original, text, lambda: NLSConfig.from_pretrained(str(super_adapter)))


@pytest.fixture(scope="module")
def nas_stats(tmp_path_factory):
    from conftest import ARCHS, args, dataset, peft_kwargs
    from peft import get_peft_model

    from hf_elastic import NASTrainer

    root = tmp_path_factory.mktemp("fuzz_stats")
    model = get_peft_model(ARCHS["llama"].build(), NLSConfig(**peft_kwargs(ARCHS["llama"], rank_choices=[8, 4, 2])))
    trainer = NASTrainer(model=model, args=args(root / "run", max_steps=4), train_dataset=dataset())
    trainer.train()
    trainer.save_model(str(root / "super"))
    return root / "super" / "nas_stats.json", trainer.supernet.space


@FUZZ
@given(data=st.data())
def test_damaged_nas_stats_is_named(nas_stats, data) -> None:
    from hf_elastic.search import FunctionEvaluator, search_subnetworks

    path, space = nas_stats
    original = path.read_text()
    text = data.draw(damaged_text(original))

    def read():
        evaluator = FunctionEvaluator(lambda c: 0.0)
        search_subnetworks(space, evaluator, "loss_based", nas_stats=path, progress=False, seed=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few NaN losses are left out with a warning
        _check_reader(path, original, text, read)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory) -> Path:
    from conftest import ARCHS

    from hf_elastic import quantize, save_quantized

    model = ARCHS["llama"].build()
    quantize(model, bits=4, group_size=16, show_progress=False)
    return save_quantized(model, tmp_path_factory.mktemp("fuzz_quant") / "int4")


@FUZZ
@given(data=st.data())
def test_damaged_quantization_config_is_named(quantized_dir, data) -> None:
    from hf_elastic import load_quantized

    path = quantized_dir / "quantization_config.json"
    original = path.read_text()
    _check_reader(path, original, data.draw(damaged_text(original)), lambda: load_quantized(quantized_dir))


@pytest.fixture(scope="module")
def search_json(tmp_path_factory) -> Path:
    from hf_elastic.nas import Dimension, SearchSpace
    from hf_elastic.search import Evaluation, SearchResult

    root = tmp_path_factory.mktemp("fuzz_search")
    space = SearchSpace([Dimension("r", "rank", (8, 4)), Dimension("w", "ffn", (1.0, 0.5))])
    rows = [({"r": 8, "w": 1.0}, 1.0, 10.0), ({"r": 4, "w": 0.5}, 2.0, 5.0)]
    evaluations = [
        Evaluation(i, f"{i}", config, {"loss": loss, "params": params}, ["random"])
        for i, (config, loss, params) in enumerate(rows)
    ]
    return SearchResult(space, ["loss", "params"], ["minimize", "minimize"], evaluations, "random").to_json(
        root / "search.json"
    )


@FUZZ
@given(data=st.data())
def test_damaged_search_json_is_named(search_json, data) -> None:
    from hf_elastic.search import SearchResult

    original = search_json.read_text()
    _check_reader(
        search_json, original, data.draw(damaged_text(original)), lambda: SearchResult.from_json(search_json)
    )


@FUZZ
@given(data=st.data())
def test_damaged_search_json_on_the_command_line_is_one_error_line(search_json, tmp_path_factory, data) -> None:
    from hf_elastic.cli import main

    root = search_json.parent
    (root / "adapter").mkdir(exist_ok=True)
    (root / "adapter" / "elastic_config.json").write_text("{}")
    (root / "base").mkdir(exist_ok=True)  # no config.json: the command stops there once --config is read
    original = search_json.read_text()
    search_json.write_text(data.draw(damaged_text(original)))
    argv = ["export", root / "adapter", "--base", root / "base", "--output", root / "out", "--config", search_json]
    try:
        with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(io.StringIO()) as err:
            main([str(a) for a in argv])
    finally:
        search_json.write_text(original)
    lines = err.getvalue().strip().splitlines()
    assert exit_.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "search.json" in lines[0] or "is not a model folder" in lines[0], lines[0]
    assert not (root / "out").exists()
