"""What the search's quality evaluators run a sub-network on, where the masked super-network is not the cheapest copy
of the same function: the adapters merged into a quantization-aware base (`merged_subnetwork`), or the extracted,
physically sliced model (`extracted_subnetwork`, `SearchConfig.score_extracted`)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn as nn

from ..devices import free_memory, module_device, trim_heap
from ..models.arch import base_layer
from ..nas.search_space import SearchSpace, SubnetConfig
from ..nas.supernet import SuperNetwork
from ..tuners.elastic_lora.width import WIDTH_KINDS

EXTRACT_SHARE = 0.5
"""`score_extracted="auto"` scores on extracted copies when the largest copy takes at most this share of the free
memory: the rest is left to the scored batches' activations."""


@contextlib.contextmanager
def merged_subnetwork(supernet: SuperNetwork, cache_weights: bool = True) -> Iterator[SuperNetwork]:
    """Merge the active sub-network's quantization-aware adapters into the base's codes for the block, and restore
    the codes (and rounding residuals) bit for bit after it.

    The merged layers compute the same function as the unmerged ones (the same codes, dequantized the same way), but
    a forward then costs a plain INT4 layer's, not the adapter's grid maths per call; with `cache_weights` each
    merged layer dequantizes once for the block (`QuantLinear.cached_weight`: a float copy of the adapted weights
    while the block runs) and every batch after the first costs a float layer's.
    """
    modules = [m for m in supernet.lora_modules.values() if supernet.adapter_name not in m.merged_adapters]
    with contextlib.ExitStack() as stack:
        try:
            for module in modules:
                module.merge(adapter_names=[supernet.adapter_name])
                if cache_weights:
                    stack.enter_context(module.get_base_layer().cached_weight())
            yield supernet
        finally:
            stack.close()
            for module in modules:
                if module.merged_adapters:
                    module.unmerge()


@dataclass
class ExtractedSubnetwork:
    """The super-network as an evaluator sees it inside `extracted_subnetwork`: `model` is the sub-network's merged,
    physically sliced copy; everything else (`space`, `count`, ...) is read from `supernet`."""

    model: nn.Module
    supernet: SuperNetwork

    def __getattr__(self, name: str) -> Any:
        return getattr(self.supernet, name)


@contextlib.contextmanager
def extracted_subnetwork(supernet: SuperNetwork, config: SubnetConfig) -> Iterator[ExtractedSubnetwork]:
    """`config` extracted from `supernet` for the block (`SuperNetwork.extract_model(share_weights=True)`): the
    function the masked super-network computes, at the cost of the kept FFN channels and heads only. The copy of the
    merged layers is freed after the block."""
    model = supernet.extract_model(config, share_weights=True).eval()
    try:
        yield ExtractedSubnetwork(model, supernet)
    finally:
        del model
        trim_heap()


def extraction_bytes(supernet: SuperNetwork) -> int:
    """The most memory `extracted_subnetwork` adds for any sub-network of `supernet`: the full-size weights of every
    module that extraction merges (an adapter) or slices (one that the narrowest sub-network cuts)."""
    sliced = supernet.geometry.kept_indices(supernet.space.min_config())
    modules = [base_layer(m) for m in supernet.lora_modules.values()]
    modules += [base_layer(supernet.base.get_submodule(path)) for path in sliced]
    unique = {id(m): m for m in modules}.values()
    tensors = itertools.chain.from_iterable(
        itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False)) for m in unique
    )
    return sum(t.numel() * t.element_size() for t in tensors)


def scores_extracted(supernet: SuperNetwork, space: SearchSpace, setting: bool | Literal["auto"]) -> bool:
    """Whether a search of `space` with `SearchConfig.score_extracted=setting` scores on extracted copies: `"auto"`
    does when some FFN width or head count in `space` is elastic (with ranks alone the copy computes what the
    super-network does) and `extraction_bytes` is at most `EXTRACT_SHARE` of the free memory of the super-network's
    device."""
    if setting != "auto":
        return setting
    if not any(d.kind in WIDTH_KINDS and len(d.choices) > 1 for d in space):
        return False
    free = free_memory(module_device(supernet.model))
    return free is not None and extraction_bytes(supernet) <= EXTRACT_SHARE * free
