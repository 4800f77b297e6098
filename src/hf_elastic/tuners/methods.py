"""The method registry: LoNAS, NLS, Shears and SQFT declared once, for the tuners, the CLI, the demo, the model card
and the recipes in `examples/recipes/`.

A `Method` names the peft config it trains (`elastic_method`: `NLSConfig` or `ElasticLoraConfig`), the flags it
sets on it, the compressed base it expects, the text and papers of its model card and its published recipe.

```py
>>> from hf_elastic.tuners.methods import METHODS, infer_method
>>> METHODS["sqft-sparsepeft"].sparse_adapter
True
>>> infer_method("nls", sparse_adapter=True).name
'sqft-sparsepeft'
```
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "DEMO_METHODS",
    "ELASTIC_METHODS",
    "METHODS",
    "PAPERS",
    "Method",
    "Paper",
    "Recipe",
    "demo_method",
    "get_method",
    "infer_method",
]


@dataclass(frozen=True)
class Paper:
    """A paper a model card cites."""

    short: str
    title: str
    venue: str
    url: str
    arxiv: str | None
    bibtex: str

    @property
    def link(self) -> str:
        return f"[arXiv:{self.arxiv}](https://arxiv.org/abs/{self.arxiv})" if self.arxiv else f"<{self.url}>"


PAPERS: dict[str, Paper] = {
    "lonas": Paper(
        "LoNAS",
        "LoNAS: Elastic Low-Rank Adapters for Efficient Large Language Models",
        "LREC-COLING 2024",
        "https://aclanthology.org/2024.lrec-main.940",
        None,
        "@inproceedings{munoz2024lonas,\n"
        "  title = {LoNAS: Elastic Low-Rank Adapters for Efficient Large Language Models},\n"
        "  author = {Mu{\\~n}oz, J. Pablo and Yuan, Jinjie and Zheng, Yi and Jain, Nilesh},\n"
        "  booktitle = {Proceedings of the 2024 Joint International Conference on Computational Linguistics, "
        "Language Resources and Evaluation (LREC-COLING 2024)},\n"
        "  year = {2024},\n"
        "  url = {https://aclanthology.org/2024.lrec-main.940}\n"
        "}",
    ),
    "shears": Paper(
        "Shears",
        "Shears: Unstructured Sparsity with Neural Low-rank Adapter Search",
        "NAACL 2024, Industry Track",
        "https://arxiv.org/abs/2404.10934",
        "2404.10934",
        "@inproceedings{munoz2024shears,\n"
        "  title = {Shears: Unstructured Sparsity with Neural Low-rank Adapter Search},\n"
        "  author = {Mu{\\~n}oz, J. Pablo and Yuan, Jinjie and Jain, Nilesh},\n"
        "  booktitle = {Proceedings of the 2024 Conference of the North American Chapter of the Association for "
        "Computational Linguistics: Human Language Technologies (Volume 6: Industry Track)},\n"
        "  year = {2024},\n"
        "  eprint = {2404.10934},\n"
        "  archivePrefix = {arXiv}\n"
        "}",
    ),
    "sqft": Paper(
        "SQFT",
        "SQFT: Low-cost Model Adaptation in Low-precision Sparse Foundation Models",
        "Findings of EMNLP 2024",
        "https://arxiv.org/abs/2410.03750",
        "2410.03750",
        "@inproceedings{munoz2024sqft,\n"
        "  title = {SQFT: Low-cost Model Adaptation in Low-precision Sparse Foundation Models},\n"
        "  author = {Mu{\\~n}oz, Juan Pablo and Yuan, Jinjie and Jain, Nilesh},\n"
        "  booktitle = {Findings of the Association for Computational Linguistics: EMNLP 2024},\n"
        "  pages = {12817--12832},\n"
        "  year = {2024},\n"
        "  eprint = {2410.03750},\n"
        "  archivePrefix = {arXiv}\n"
        "}",
    ),
}


@dataclass(frozen=True)
class Recipe:
    """A method's published training settings (LLaMA-class models, GSM8K / unified math), as the recipe scripts in
    `examples/recipes/` run them."""

    rank_choices: tuple[int, ...] = (32, 28, 24, 20, 16)
    extra_targets: tuple[str, ...] = ()  # adapted besides the attention and up/down projections
    group_qkv: bool = True  # q/k/v share one rank per layer
    ffn_width_choices: tuple[float, ...] | None = None
    lora_alpha: int = 64
    lora_dropout: float = 0.1
    learning_rate: float = 3e-4
    epochs: float = 3.0
    batch_size: int = 16
    gradient_accumulation: int = 1
    warmup_steps: int = 100
    base_model: str = "meta-llama/Meta-Llama-3-8B"


@dataclass(frozen=True)
class Method:
    """One method: the config it trains, the base it expects, its model-card text and its recipe.

    Args:
        name: the key of `METHODS`, `CardInfo(method=...)` and `hf-elastic push --method`.
        title, description, tags: the model card's method row, paragraph and Hub tags.
        papers: keys of `PAPERS` the card cites.
        elastic_method: the peft config it trains: "nls" (`NLSConfig`) or "elastic_lora" (`ElasticLoraConfig`).
        sparse_adapter, quantization_aware: the `NLSConfig` flags it sets (SparsePEFT, QA-SparsePEFT).
        base_sparsity: the Wanda sparsity of the base it expects (0: a dense base).
        base_bits: the integer bits of the base it expects (None: a float base).
        demo_name: its `hf-elastic demo --method` name, or None when the demo has no mode for it.
        inferable: whether a card infers it from a saved config's flags alone (Shears and plain SQFT train the same
            config as NLS and differ only by their base, which the config does not record).
        recipe: its published training settings, or None.
    """

    name: str
    title: str
    description: str
    tags: tuple[str, ...]
    papers: tuple[str, ...]
    elastic_method: str = "nls"
    sparse_adapter: bool = False
    quantization_aware: bool = False
    base_sparsity: float = 0.0
    base_bits: int | None = None
    demo_name: str | None = None
    inferable: bool = True
    recipe: Recipe | None = field(default=None, repr=False)

    @property
    def paper(self) -> Paper:
        """The method's own paper (the first one cited)."""
        return PAPERS[self.papers[0]]


_NLS = (
    "Neural Low-rank adapter Search (NLS) trains LoRA adapters whose rank is elastic: a sub-network uses the first "
    "`r` rank dimensions of every adapter group, so one training run of the weight-sharing super-network yields "
    "adapters of many sizes, and a search picks one of them."
)
_SQFT_RECIPE = Recipe()  # Llama-3-8B, GSM8K: the defaults above
_METHODS = (
    Method(
        "lonas",
        "LoNAS",
        "LoNAS trains a weight-sharing super-network of elastic low-rank adapters in which the LoRA rank, the FFN "
        "width and the number of attention heads of the base model can all shrink. A sub-network fixes one rank per "
        "adapter group and one width per layer; merging it removes the dropped channels and heads for real.",
        ("lonas",),
        ("lonas",),
        elastic_method="elastic_lora",
        demo_name="lonas",
        recipe=Recipe(
            rank_choices=(32, 28),
            extra_targets=("gate_proj",),
            ffn_width_choices=(1.0, 0.875, 0.75, 0.625, 0.5),
            epochs=8,
            batch_size=4,
            gradient_accumulation=4,
        ),
    ),
    Method("nls", "NLS", _NLS, ("nls",), ("shears",)),
    Method(
        "shears",
        "Shears",
        "Shears sparsifies the base model with an unstructured, zeroth-order method (Wanda) and freezes it. " + _NLS,
        ("shears", "nls"),
        ("shears",),
        base_sparsity=0.5,
        demo_name="shears",
        inferable=False,
        recipe=Recipe(
            rank_choices=(32, 24, 16),
            extra_targets=("gate_proj",),
            group_qkv=False,
            batch_size=4,
            gradient_accumulation=4,
        ),
    ),
    Method(
        "sqft",
        "SQFT",
        "SQFT fine-tunes a sparse, optionally low-precision, base model with elastic-rank adapters. " + _NLS,
        ("sqft", "nls"),
        ("sqft", "shears"),
        base_sparsity=0.5,
        inferable=False,
    ),
    Method(
        "sqft-sparsepeft",
        "SQFT + SparsePEFT",
        "SQFT with SparsePEFT: the adapters are masked with the sparsity pattern of the sparse base model, so "
        "merging them into the base keeps its sparsity. " + _NLS,
        ("sqft", "sparsepeft", "nls"),
        ("sqft", "shears"),
        sparse_adapter=True,
        base_sparsity=0.5,
        demo_name="sqft",
        recipe=_SQFT_RECIPE,
    ),
    Method(
        "sqft-qa-sparsepeft",
        "SQFT + QA-SparsePEFT",
        "SQFT with QA-SparsePEFT: sparsity-preserving adapters trained quantization-aware on a sparse INT4 base "
        "model, so the merged model stays sparse and in the base model's quantized format. " + _NLS,
        ("sqft", "qa-sparsepeft", "nls"),
        ("sqft", "shears"),
        sparse_adapter=True,
        quantization_aware=True,
        base_sparsity=0.5,
        base_bits=4,
        demo_name="sqft-qa",
        # the adapter acts on the weights through the INT4 grid, so there is no input dropout; 4 epochs
        recipe=Recipe(lora_dropout=0.0, epochs=4),
    ),
)
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}
DEMO_METHODS: dict[str, Method] = {m.demo_name: m for m in _METHODS if m.demo_name}
ELASTIC_METHODS: tuple[str, ...] = tuple(dict.fromkeys(m.elastic_method for m in _METHODS))


def get_method(name: str) -> Method:
    """The method called `name` (a key of `METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; use one of {list(METHODS)}.")
    return METHODS[name]


def demo_method(name: str) -> Method:
    """The method behind `hf-elastic demo --method name` (e.g. "sqft" is SQFT + SparsePEFT)."""
    if name not in DEMO_METHODS:
        raise ValueError(f"Unknown demo method {name!r}; use one of {list(DEMO_METHODS)}.")
    return DEMO_METHODS[name]


def infer_method(elastic_method: str, sparse_adapter: bool = False, quantization_aware: bool = False) -> Method:
    """The method a saved elastic config records: `ElasticLoraConfig` gives LoNAS; `NLSConfig` gives NLS, SQFT +
    SparsePEFT with `sparse_adapter` or SQFT + QA-SparsePEFT with `quantization_aware`.

    Only `inferable` methods are candidates; among them, a matching `quantization_aware` flag counts first, then a
    matching `sparse_adapter` flag.
    """
    candidates = [m for m in _METHODS if m.inferable and m.elastic_method == elastic_method]
    if not candidates:
        raise ValueError(
            f"method={elastic_method!r} is not one hf_elastic writes; use one of {list(ELASTIC_METHODS)}."
        )
    qa, sparse = bool(quantization_aware), bool(sparse_adapter)
    return max(candidates, key=lambda m: (m.quantization_aware == qa, m.sparse_adapter == sparse))
