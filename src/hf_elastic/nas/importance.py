"""Importance of FFN channels and key/value groups, for `SuperNetwork.reorder_channels`.

Each method takes the super-network's `SubnetGeometry`, the super-network (to run batches through its max sub-network)
and the batches, and returns, per width layer, `{"ffn": scores, "heads": scores}` (higher = keep longer), built by
`models.arch.unit_scores` from a score per weight element.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..models.arch import base_layer, unit_scores, weight_out_in
from .activations import SubnetSwitch, input_statistics, max_subnetwork, on_device, squared_norms
from .geometry import SubnetGeometry

Scores = list[dict[str, torch.Tensor]]
ImportanceMethod = Callable[[SubnetGeometry, SubnetSwitch, Iterable | None], Scores]


def _scored_weights(geometry: SubnetGeometry) -> dict[str, nn.Module]:
    """The base layers whose weights tie to FFN channels or heads, by module path."""
    return {
        layer.path(rel): base_layer(layer.module.get_submodule(rel))
        for layer in geometry.width_layers
        for rel in (
            *layer.spec.ffn_in,
            layer.spec.ffn_out,
            layer.spec.attn_out,
            layer.spec.qkv,
            layer.spec.q,
            layer.spec.k,
            layer.spec.v,
        )
        if rel is not None
    }


def _by_layer(
    geometry: SubnetGeometry, modules: dict[str, nn.Module], element: Callable[[str], torch.Tensor]
) -> Scores:
    paths = {id(m): path for path, m in modules.items()}

    def element_score(module: nn.Module) -> torch.Tensor:
        return element(paths[id(base_layer(module))])

    return [unit_scores(layer, element_score) for layer in geometry.width_layers]


def magnitude_scores(geometry: SubnetGeometry, network: SubnetSwitch, batches: Iterable | None = None) -> Scores:
    """W**2 per weight element: no data needed."""
    return [unit_scores(layer, lambda m: weight_out_in(m).detach().float() ** 2) for layer in geometry.width_layers]


def activation_scores(geometry: SubnetGeometry, network: SubnetSwitch, batches: Iterable) -> Scores:
    """(W_ij * ||x_j||)**2 per weight element, ||x_j|| the L2 norm of input feature j over every token of `batches`.

    For the FFN's output projection, x_j is channel j's activation, so a channel that rarely fires scores low however
    large its weights are (Wanda's importance, summed per channel).
    """
    modules = _scored_weights(geometry)
    statistics = {path: (m, squared_norms) for path, m in modules.items()}
    sums = input_statistics(network, statistics, batches, "reorder_channels(method='activation')")
    return _by_layer(
        geometry, modules, lambda path: weight_out_in(modules[path]).detach().float() ** 2 * sums[path][None, :]
    )


def gradient_scores(geometry: SubnetGeometry, network: SubnetSwitch, batches: Iterable) -> Scores:
    """|W * dL/dW| per weight element, summed over `batches` (which need labels): the first-order Taylor term."""
    modules = _scored_weights(geometry)
    weights = {path: m.weight for path, m in modules.items()}
    flags = {k: w.requires_grad for k, w in weights.items()}
    acc = {k: torch.zeros_like(w, dtype=torch.float32) for k, w in weights.items()}
    n = 0
    try:
        with max_subnetwork(network) as device:
            for w in weights.values():
                w.requires_grad_(True)
            for batch in batches:
                network.model.zero_grad(set_to_none=True)
                network.model(**on_device(batch, device)).loss.backward()
                for k, w in weights.items():
                    acc[k] += (w.detach().float() * w.grad.float()).abs()
                n += 1
    finally:
        for k, w in weights.items():
            w.requires_grad_(flags[k])
            w.grad = None
    if n == 0:
        raise ValueError("reorder_channels(method='gradient') got no batches.")
    return _by_layer(geometry, modules, lambda path: acc[path].T if isinstance(modules[path], Conv1D) else acc[path])


IMPORTANCE_METHODS: dict[str, ImportanceMethod] = {
    "magnitude": magnitude_scores,
    "activation": activation_scores,
    "gradient": gradient_scores,
}
