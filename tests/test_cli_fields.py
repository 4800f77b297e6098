"""The CLI options generated from the config dataclasses, the method registry, and the config-object forms of
`quantize` and `search_subnetworks`."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from conftest import ARCHS, VOCAB, random_llama

from hf_elastic import QuantizationConfig, SearchConfig, quantize, search_subnetworks
from hf_elastic.cli import build_parser, main
from hf_elastic.cli.commands import _peft_config, _training_arguments
from hf_elastic.cli.fields import field_default
from hf_elastic.cli.options import COMMAND_CONFIGS, HIDDEN, HIDDEN_UPSTREAM
from hf_elastic.demo.config import DemoConfig
from hf_elastic.export import CardInfo
from hf_elastic.nas import Dimension, SearchSpace
from hf_elastic.search import FunctionEvaluator
from hf_elastic.tuners import ElasticLoraConfig, NLSConfig
from hf_elastic.tuners.methods import DEMO_METHODS, METHODS, demo_method, get_method, infer_method

# The options whose command-line default deliberately differs from the field's.
CLI_DEFAULTS = {
    ("sparsify", "seq_len"): 256,
    ("quantize", "seq_len"): 256,
    ("train", "rank_choices"): [16, 12, 8],
    ("train", "target_modules"): ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    ("train", "lora_alpha"): 32,
    ("train", "eval_subnets"): ["median", "max", "min"],
    ("train", "max_steps"): None,
    ("train", "num_train_epochs"): None,
    ("train", "learning_rate"): 3e-4,
    ("train", "logging_steps"): 10,
    ("train", "save_steps"): 50,
    ("search", "budget"): 40,
}

# Options left None when absent, so the config class chosen by --method applies its own default.
UNSET = {("train", "ffn_width_choices"), ("train", "head_choices")}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _owner(cls: type, name: str) -> type:
    """The class of `cls`'s MRO that declares the field `name`."""
    return next(c for c in cls.__mro__ if name in c.__dict__.get("__annotations__", {}))


@pytest.mark.parametrize("command", list(COMMAND_CONFIGS))
def test_every_field_is_an_option_or_hidden_on_purpose(command):
    actions = {a.dest: a for a in _subparser(command)._actions}
    for cls, options in COMMAND_CONFIGS[command]:
        exposed = {o.name for o in options}
        hidden = HIDDEN.get(cls, {})
        assert not exposed & set(hidden), f"{cls.__name__} both exposes and hides {exposed & set(hidden)}"
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(hidden) <= names, f"HIDDEN names fields {cls.__name__} lacks: {set(hidden) - names}"
        for name in names - exposed - set(hidden):
            owner = _owner(cls, name)
            assert any(issubclass(upstream, owner) for upstream in HIDDEN_UPSTREAM), (
                f"{cls.__name__}.{name} (declared by {owner.__name__}) is neither a `hf-elastic {command}` option "
                "nor listed in hf_elastic.cli.options.HIDDEN"
            )
        for name in exposed:
            assert actions[name].config_field[:2] == (cls, name)


@pytest.mark.parametrize("command", list(COMMAND_CONFIGS))
def test_options_show_the_fields_default_and_help(command):
    sub = _subparser(command)
    text = "".join(sub.format_help().split())
    seen = set()
    for action in sub._actions:
        if not hasattr(action, "config_field"):
            continue
        cls, name, shown = action.config_field
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        expected = CLI_DEFAULTS.get((command, name), field_default(f))
        if (command, name) in CLI_DEFAULTS:
            seen.add((command, name))
            assert expected != field_default(f), f"{name}: the CLI default equals the field's; drop the override"
        assert shown == expected, (name, shown, expected)
        assert action.default == (None if (command, name) in UNSET else expected)
        help_text = f.metadata["help"].replace("%%", "%")
        assert action.help.replace("%%", "%").startswith(help_text), name
        assert "".join(help_text.split()) in text, name  # argparse renders it (wrapped anywhere)
    assert seen == {key for key in CLI_DEFAULTS if key[0] == command}


def test_generated_options_build_the_configs(tmp_path):
    base = ["train", "m", str(tmp_path / "out"), "--data", "d.jsonl"]
    args = build_parser().parse_args(base + ["--batch-size", "4", "--warmup-ratio", "0.1", "--lr-scheduler", "cosine",
                                             "--eval-batch-size", "2", "--weight-decay", "0.01", "--cpu"])  # fmt: skip
    training = _training_arguments(args, has_eval=False)
    assert (training.per_device_train_batch_size, training.per_device_eval_batch_size) == (4, 2)
    assert training.warmup_steps == 0.1 and training.lr_scheduler_type.value == "cosine"
    assert (training.learning_rate, training.max_steps, training.logging_steps) == (3e-4, 200, 10)
    assert training.weight_decay == 0.01 and training.use_cpu and training.report_to == []
    assert training.eval_subnets == ["median", "max", "min"] and training.sampling == "uniform"

    config = _peft_config(build_parser().parse_args(base + ["--method", "elastic_lora", "--lora-dropout", "0.1"]))
    assert type(config) is ElasticLoraConfig and config.lora_dropout == 0.1
    assert config.ffn_width_choices == [1.0, 0.875, 0.75, 0.625, 0.5]  # ElasticLoraConfig's own default
    assert config.rank_choices == [16, 12, 8] and config.lora_alpha == 32 and config.task_type == "CAUSAL_LM"
    plain = _peft_config(build_parser().parse_args(base + ["--nls-target-modules", "q_proj"]))
    assert type(plain) is NLSConfig and plain.nls_target_modules == ["q_proj"]

    search_args = build_parser().parse_args(["search", "a", "--base", "b", "--output", "o", "--reference-subnets"])
    assert search_args.reference_subnets == [] and search_args.budget == 40 and search_args.progress is True
    assert search_args.score_extracted == "auto"
    for flag, value in (("--score-extracted", True), ("--no-score-extracted", False)):
        assert (
            build_parser().parse_args(["search", "a", "--base", "b", "--output", "o", flag]).score_extracted is value
        )
    demo = build_parser().parse_args(["demo", "--output", "x", "--train-steps", "12", "--rank-choices", "8", "4"])
    assert (demo.output_dir, demo.train_steps, demo.rank_choices, demo.method) == ("x", 12, [8, 4], "lonas")
    assert build_parser().parse_args(["--verbose", "demo"]).verbose is True
    assert build_parser().parse_args(["demo"]).verbose is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--method", "sqft-sparsepeft"], r"argument --method: invalid choice: 'sqft-sparsepeft'"),
        (["search", "a", "--base", "b", "--output", "o", "--strategy", "greedy"], r"invalid choice: 'greedy'"),
        (["quantize", "m", "o", "--bits", "3"], r"argument --bits: invalid choice: 3"),
        (["train", "m", "o", "--data", "d", "--sampling", "nope"], r"argument --sampling: invalid choice: 'nope'"),
        (["push", "f", "me/x", "--base-model", "me/b", "--method", "sqft-qa"], r"invalid choice: 'sqft-qa'"),
        (["search", "a", "--base", "b", "--output", "o", "--population", "1"], r"SearchConfig.population=1 must be"),
        (["sparsify", "m", "o", "--pattern", "5:4"], r"SparsityConfig.pattern='5:4' needs 0 < N < M"),
    ],
)
def test_option_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert pytest.importorskip("re").search(message, err), err


def test_registry_is_the_one_vocabulary():
    assert list(METHODS) == ["lonas", "nls", "shears", "sqft", "sqft-sparsepeft", "sqft-qa-sparsepeft"]
    assert {k: m.name for k, m in DEMO_METHODS.items()} == {
        "lonas": "lonas", "shears": "shears", "sqft": "sqft-sparsepeft", "sqft-qa": "sqft-qa-sparsepeft"
    }  # fmt: skip
    assert [a for a in _subparser("demo")._actions if a.dest == "method"][0].choices == list(DEMO_METHODS)
    assert list([a for a in _subparser("push")._actions if a.dest == "method"][0].choices) == list(METHODS)
    assert list([a for a in _subparser("train")._actions if a.dest == "method"][0].choices) == ["elastic_lora", "nls"]
    for name in METHODS:
        assert CardInfo(method=name).method == name
    with pytest.raises(ValueError, match=r"CardInfo.method='sqft-qa' is not known; use one of \['lonas', 'nls'"):
        CardInfo(method="sqft-qa")
    assert DemoConfig(method="sqft-qa").quantization_aware and not DemoConfig(method="sqft").quantization_aware
    assert demo_method("sqft").sparse_adapter and not demo_method("shears").sparse_adapter
    qa = get_method("sqft-qa-sparsepeft")
    assert (qa.base_bits, qa.base_sparsity, qa.recipe.lora_dropout, qa.recipe.epochs) == (4, 0.5, 0.0, 4)
    assert get_method("lonas").paper.short == "LoNAS" and get_method("shears").recipe.rank_choices == (32, 24, 16)
    with pytest.raises(ValueError, match=r"Unknown method 'lora'; use one of \['lonas'"):
        get_method("lora")
    with pytest.raises(ValueError, match=r"Unknown demo method 'sqft-sparsepeft'; use one of \['lonas', 'shears'"):
        demo_method("sqft-sparsepeft")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("elastic_lora", False, False), "lonas"),
        (("nls", False, False), "nls"),
        (("nls", True, False), "sqft-sparsepeft"),
        (("nls", True, True), "sqft-qa-sparsepeft"),
        (("nls", False, True), "sqft-qa-sparsepeft"),
    ],
)
def test_infer_method_from_config_flags(flags, expected):
    assert infer_method(*flags).name == expected


def test_infer_method_refuses_unknown_configs():
    with pytest.raises(ValueError, match=r"method='dora' is not one hf_elastic writes; use one of \['elastic_lora'"):
        infer_method("dora")


def _tiny():
    torch.manual_seed(0)
    return ARCHS["llama"].build()


def test_quantize_takes_a_config_or_its_fields():
    config = QuantizationConfig(bits=8, group_size=16, symmetric=True)
    by_config, by_kwargs = _tiny(), _tiny()
    report = quantize(by_config, config, show_progress=False)
    quantize(by_kwargs, bits=8, group_size=16, symmetric=True, show_progress=False)
    assert report.config == config and report.config is not config
    layer, twin = by_config.model.layers[0].mlp.down_proj, by_kwargs.model.layers[0].mlp.down_proj
    assert (layer.bits, layer.group_size) == (8, 16) and torch.equal(layer.dequantize(), twin.dequantize())
    untouched = QuantizationConfig()
    wide = random_llama(VOCAB, 64, 128)
    assert quantize(wide, untouched, show_progress=False).config.group_size == 64  # resolved in the report's copy
    assert untouched.group_size is None  # the caller's config is not modified
    with pytest.raises(
        ValueError, match=r"quantize\(\) got a QuantizationConfig and the keyword arguments \['bits'\]"
    ):
        quantize(_tiny(), config, bits=4)
    with pytest.raises(TypeError, match=r"quantize\(\) takes a QuantizationConfig as config, got int"):
        quantize(_tiny(), 4)
    with pytest.raises(TypeError, match=r"quantize\(\) got unknown arguments \['bit'\]"):
        quantize(_tiny(), bit=4)


def test_search_takes_a_config_a_strategy_or_its_fields():
    space = SearchSpace([Dimension("a", "rank", (4, 3, 2, 1)), Dimension("b", "rank", (4, 3, 2, 1))])
    evaluator = FunctionEvaluator(lambda c: float((c["a"] - 3) ** 2 + (c["b"] - 2) ** 2), "dist")
    config = SearchConfig(strategy="random", budget=6, seed=1, progress=False)
    by_config = search_subnetworks(space, evaluator, config)
    by_kwargs = search_subnetworks(space, evaluator, strategy="random", budget=6, seed=1, progress=False)
    by_name = search_subnetworks(space, evaluator, "random", budget=6, seed=1, progress=False)
    keys = [[e.key for e in r.evaluations] for r in (by_config, by_kwargs, by_name)]
    assert keys[0] == keys[1] == keys[2] and len(keys[0]) == 6
    assert by_config.best().values["dist"] == min(e.values["dist"] for e in by_config.evaluations)
    with pytest.raises(
        ValueError, match=r"search_subnetworks\(\) got a SearchConfig and the keyword arguments \['budget'\]"
    ):
        search_subnetworks(space, evaluator, config, budget=4)
    with pytest.raises(
        ValueError, match=r"search_subnetworks\(\) got the strategy twice: 'random' and strategy='nsga2'"
    ):
        search_subnetworks(space, evaluator, "random", strategy="nsga2")
