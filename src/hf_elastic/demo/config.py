"""`DemoConfig`: the sizes and the method of `hf-elastic demo`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..export.openvino import WEIGHT_FORMATS
from ..nas.importance import IMPORTANCE_METHODS
from ..nas.samplers import SAMPLERS
from ..tuners.methods import DEMO_METHODS, Method, demo_method

REORDERS = ("none", *IMPORTANCE_METHODS)  # "none" keeps the checkpoint's channel order


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults fit in about 15 minutes on 2 CPU cores."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where every artefact of the demo goes."})
    method: str = field(
        default="lonas",
        metadata={
            "help": "'lonas': elastic FFN width (and, with rank_choices / head_choices, ranks and heads) on the dense "
            "model, searched for accuracy against measured latency. 'shears': Wanda 50 % + NLS (the merge fills the "
            "zeros). 'sqft': Wanda + NLS + SparsePEFT (the merge keeps the zeros). 'sqft-qa': QA-SparsePEFT on a "
            "Wanda + INT4 base.",
            "choices": tuple(DEMO_METHODS),
        },
    )
    model_dir: str | None = field(
        default=None,
        metadata={
            "help": "A local causal LM folder (weights and tokenizer) to use instead of SmolLM2-135M-Instruct, e.g. "
            "for a smoke test. Its widths must be multiples of group_size."
        },
    )
    quick: bool = field(default=False, metadata={"help": "A smoke run: a few steps and evaluations only."})
    seed: int = field(default=0, metadata={"help": "Seed of training and search."})
    sparsity: float = field(default=0.5, metadata={"help": "Wanda sparsity of the base model (not 'lonas')."})
    rank_choices: list[int] | None = field(
        default=None,
        metadata={
            "help": "NLS rank choices. None: [16, 12, 8] for 'shears', 'sqft' and 'sqft-qa'; [16] for 'lonas', whose "
            "sub-networks are merged, so a lower rank saves nothing: trained at rank 16 alone, 75 % FFN stayed 0.9 "
            "points under max against 2.6 with ranks 16/12/8 (3 seeds, benchmarks/bench_lonas_training.py)."
        },
    )
    ffn_width_choices: list[float] = field(
        default_factory=lambda: [1.0, 0.75, 0.625, 0.5625, 0.5],
        metadata={
            "help": "'lonas': FFN widths, fractions of the full one. 0.625 and 0.5625 give the search uniform widths "
            "between 75 and 50 %: with seed 0 the demo picked 56.25 % FFN everywhere, 1.40-1.43x faster than max at "
            "+0.0 test points (a max 5 points under the one trained with 1.0 0.75 0.625 0.5, whose 62.5 % pick timed "
            "1.28-1.36x; README, 'The LoNAS front')."
        },
    )
    head_choices: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={
            "help": "'lonas': attention heads kept, as fractions; each is rounded to whole key/value groups "
            "(SmolLM2: 9 heads in 3 groups, so 0.67 keeps 6 heads). Default: all heads, because 50 % FFN with 6 of "
            "9 heads stayed at chance in every training run of the ablation; '1.0 0.67' searches heads too."
        },
    )
    reorder: str = field(
        default="activation",
        metadata={
            "help": "'lonas': channel importance order before training ('none' keeps the checkpoint's). "
            "'activation' (|W| * ||x|| on training batches) kept the most zero-shot accuracy at 75 % and 50 % FFN "
            "width on SmolLM2.",
            "choices": REORDERS,
        },
    )
    sampling: str = field(
        default="sandwich",
        metadata={
            "help": "'lonas': NASTrainer sampling at equal compute: 'sandwich' (the max and min sub-networks and "
            "sandwich_k random ones each step, so fewer steps), 'progressive' (max alone first, then the max and "
            "min of the choices opened so far: ranks, FFN widths, heads) or 'uniform' (one random sub-network per "
            "step). Over 3 seeds, sandwich was at or above uniform's mean at max, 75 % and 50 % FFN and kept 50 % "
            "FFN at 0.65-0.67 on every seed, where uniform left it at chance on two of three (README, "
            "benchmarks/bench_lonas_training.py).",
            "choices": tuple(SAMPLERS),
        },
    )
    sandwich_k: int = field(
        default=1,
        metadata={
            "help": "'lonas': random sub-networks trained each step besides max and min with sampling 'sandwich' or "
            "'progressive' (at equal compute, so fewer steps). With 0, only max and min are trained (every layer at "
            "100 or 50 % FFN). With 1, 62.5 % FFN everywhere gained 6.0-7.5 test points on each of 3 seeds, but "
            "max and min get fewer updates: max moved +2.0, -3.0 and -15.0 points (README, 'The LoNAS front')."
        },
    )
    distillation: str = field(
        default="none",
        metadata={
            "help": "'lonas': 'inplace' makes the max sub-network's outputs the soft target of the others in each "
            "step (with sampling 'sandwich' or 'progressive'; see NASTrainingArguments.distillation).",
            "choices": ("none", "inplace"),
        },
    )
    train_steps: int = field(default=80, metadata={"help": "Optimizer steps of NAS training."})
    batch_size: int = field(default=8, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Training learning rate (every method)."})
    calibration_samples: int = field(default=32, metadata={"help": "Wanda calibration prompts."})
    val_rows: int = field(default=128, metadata={"help": "Rows of the search's validation split (from train)."})
    test_rows: int = field(default=200, metadata={"help": "Held-out test rows (never trained or searched on)."})
    search_budget: int = field(
        default=10,
        metadata={
            "help": "Sub-networks the search evaluates, the references included: 'lonas' evaluates the uniform-width "
            "ladder (every layer at each FFN width, max and min among them) first, the others max, min and median."
        },
    )
    search_strategy: str = field(
        default="nsga2",
        metadata={
            "help": "How the search chooses what to evaluate after the references: 'nsga2' (NSGA-II on the "
            "measured accuracy) or 'predictor' (each round a ridge model of validation accuracy, fitted on the "
            "evaluations so far, proposes its predicted front; it fits first on the uniform-width ladder).",
            "choices": ("nsga2", "predictor"),
        },
    )
    population: int = field(
        default=5, metadata={"help": "Sub-networks per round: NSGA-II's population, or the predictor's round."}
    )
    accuracy_tolerance: float = field(
        default=0.02,
        metadata={
            "help": "'lonas': the fastest front sub-network within this much validation accuracy of the max one is "
            "the 'smallest useful' one that is exported."
        },
    )
    accuracy_floor_margin: float = field(
        default=0.05,
        metadata={
            "help": "'lonas': every sub-network picked besides max must beat the majority-class baseline of the "
            "validation rows by this much accuracy, so that no chance-level sub-network is shown as a choice "
            "(-1: no floor, for smoke tests on random models)."
        },
    )
    group_size: int = field(default=64, metadata={"help": "INT4 group size (576 and 1536 are multiples of 64)."})
    openvino_weight_format: str = field(
        default="int8",
        metadata={"help": "'lonas': weight format of the OpenVINO IRs.", "choices": WEIGHT_FORMATS},
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per prompt."})

    def __post_init__(self) -> None:
        if self.rank_choices is None:
            self.rank_choices = [16] if self.method == "lonas" else [16, 12, 8]
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(
                    f"DemoConfig.{f.name}={getattr(self, f.name)!r} is unknown; use one of {list(choices)}."
                )
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"DemoConfig.sparsity={self.sparsity} must be in [0, 1); e.g. 0.5.")
        if self.distillation == "inplace" and self.sampling not in ("sandwich", "progressive"):
            raise ValueError(
                f"DemoConfig.distillation='inplace' needs sampling 'sandwich' or 'progressive', not {self.sampling!r}."
            )
        if isinstance(self.sandwich_k, bool) or not isinstance(self.sandwich_k, int) or self.sandwich_k < 0:
            raise ValueError(f"DemoConfig.sandwich_k={self.sandwich_k!r} must be an integer >= 0, e.g. 1.")
        if not -1 <= self.accuracy_floor_margin < 1:
            raise ValueError(
                f"DemoConfig.accuracy_floor_margin={self.accuracy_floor_margin} must be in [-1, 1); e.g. 0.05."
            )
        if not 0 <= self.accuracy_tolerance < 1:
            raise ValueError(f"DemoConfig.accuracy_tolerance={self.accuracy_tolerance} must be in [0, 1); e.g. 0.02.")
        for name in ("ffn_width_choices", "head_choices"):
            values = getattr(self, name)
            if not values or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in values):
                raise ValueError(f"DemoConfig.{name}={values!r} must be fractions in (0, 1], e.g. [1.0, 0.75, 0.5].")
        if self.quick:
            self.train_steps, self.calibration_samples = 4, 8
            self.val_rows, self.test_rows, self.search_budget, self.population = 16, 32, 6, 2

    @property
    def method_info(self) -> Method:
        """The registry entry of `method` (e.g. 'sqft' is SQFT + SparsePEFT)."""
        return demo_method(self.method)

    @property
    def quantization_aware(self) -> bool:
        return self.method_info.quantization_aware
