"""Importance of FFN channels and key/value groups, for `SuperNetwork.reorder_channels`.

Each method returns, per width layer, `{"ffn": scores, "heads": scores}` (higher = keep longer), built by
`models.arch.unit_scores` from a score per weight element.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..models.arch import base_layer, unit_scores, weight_out_in

if TYPE_CHECKING:
    from .supernet import SuperNetwork

Scores = list[dict[str, torch.Tensor]]


def _scored_weights(supernet: SuperNetwork) -> dict[str, nn.Module]:
    """The base layers whose weights tie to FFN channels or heads, by module path."""
    return {
        layer.path(rel): base_layer(supernet.base.get_submodule(layer.path(rel)))
        for layer in supernet.width_layers
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


@contextlib.contextmanager
def _full_model_in_eval(supernet: SuperNetwork) -> Iterator[torch.device]:
    """Run the max sub-network in eval mode, then restore the active sub-network and the training flag."""
    active, was_training = supernet.active_config, supernet.model.training
    supernet.activate("max")
    supernet.model.eval()
    try:
        yield next(supernet.model.parameters()).device
    finally:
        supernet.model.train(was_training)
        supernet.activate(active)


def _on_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _by_layer(supernet: SuperNetwork, modules: dict[str, nn.Module], element: Callable[[str], torch.Tensor]) -> Scores:
    paths = {id(m): path for path, m in modules.items()}

    def element_score(module: nn.Module) -> torch.Tensor:
        return element(paths[id(base_layer(module))])

    return [unit_scores(layer, element_score) for layer in supernet.width_layers]


def magnitude_scores(supernet: SuperNetwork, batches: Iterable | None = None) -> Scores:
    """W**2 per weight element: no data needed."""
    return [unit_scores(layer, lambda m: weight_out_in(m).detach().float() ** 2) for layer in supernet.width_layers]


def activation_scores(supernet: SuperNetwork, batches: Iterable) -> Scores:
    """(W_ij * ||x_j||)**2 per weight element, ||x_j|| the L2 norm of input feature j over every token of `batches`.

    For the FFN's output projection, x_j is channel j's activation, so a channel that rarely fires scores low however
    large its weights are (Wanda's importance, summed per channel).
    """
    modules = _scored_weights(supernet)
    sums: dict[str, torch.Tensor] = {}

    def hook(path: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            sums[path] = sums.get(path, 0) + x.reshape(-1, x.shape[-1]).pow(2).sum(0)

        return record

    handles = [m.register_forward_pre_hook(hook(path)) for path, m in modules.items()]
    n = 0
    try:
        with _full_model_in_eval(supernet) as device, torch.no_grad():
            for batch in batches:
                supernet.model(**_on_device(batch, device))
                n += 1
    finally:
        for handle in handles:
            handle.remove()
    if n == 0:
        raise ValueError("reorder_channels(method='activation') got no batches.")
    return _by_layer(
        supernet, modules, lambda path: weight_out_in(modules[path]).detach().float() ** 2 * sums[path][None, :]
    )


def gradient_scores(supernet: SuperNetwork, batches: Iterable) -> Scores:
    """|W * dL/dW| per weight element, summed over `batches` (which need labels): the first-order Taylor term."""
    modules = _scored_weights(supernet)
    weights = {path: m.weight for path, m in modules.items()}
    flags = {k: w.requires_grad for k, w in weights.items()}
    acc = {k: torch.zeros_like(w, dtype=torch.float32) for k, w in weights.items()}
    n = 0
    try:
        with _full_model_in_eval(supernet) as device:
            for w in weights.values():
                w.requires_grad_(True)
            for batch in batches:
                supernet.model.zero_grad(set_to_none=True)
                supernet.model(**_on_device(batch, device)).loss.backward()
                for k, w in weights.items():
                    acc[k] += (w.detach().float() * w.grad.float()).abs()
                n += 1
    finally:
        for k, w in weights.items():
            w.requires_grad_(flags[k])
            w.grad = None
    if n == 0:
        raise ValueError("reorder_channels(method='gradient') got no batches.")
    return _by_layer(supernet, modules, lambda path: acc[path].T if isinstance(modules[path], Conv1D) else acc[path])


IMPORTANCE_METHODS: dict[str, Callable[..., Scores]] = {
    "magnitude": magnitude_scores,
    "activation": activation_scores,
    "gradient": gradient_scores,
}
