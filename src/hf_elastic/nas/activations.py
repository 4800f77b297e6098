"""Activation statistics of a super-network's max sub-network.

Activation-based channel importance (`nas.importance`) and the activation-based heuristic (`search.heuristics`) both
run calibration batches through the max sub-network and sum a statistic of some modules' inputs: `input_statistics`
does that, with `max_subnetwork` switching to the max sub-network and back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch
import torch.nn as nn

from .search_space import SubnetConfig

Statistic = Callable[[torch.Tensor], torch.Tensor]


class SubnetSwitch(Protocol):
    """What switching sub-networks needs: `SuperNetwork` is one."""

    model: nn.Module

    @property
    def active_config(self) -> SubnetConfig: ...

    def activate(self, config: Any) -> SubnetConfig: ...


@contextlib.contextmanager
def max_subnetwork(network: SubnetSwitch) -> Iterator[torch.device]:
    """Run the max sub-network in eval mode, then restore the active sub-network and the training flag.

    Yields the device of the model's parameters.
    """
    active, was_training = network.active_config, network.model.training
    network.activate("max")
    network.model.eval()
    try:
        yield next(network.model.parameters()).device
    finally:
        network.model.train(was_training)
        network.activate(active)


def on_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors moved to `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """`sum_t x_{t,j}**2` per input feature `j` over every token `t` of an input (..., features), in float32."""
    x = x.float()
    return x.reshape(-1, x.shape[-1]).pow(2).sum(0)


def input_statistics(
    network: SubnetSwitch,
    statistics: Mapping[Hashable, tuple[nn.Module, Statistic]],
    batches: Iterable[Mapping[str, Any]],
    caller: str,
) -> dict[Hashable, torch.Tensor]:
    """Sum of `statistic(x)` over `batches`, `x` the input of each module, run through the max sub-network.

    `statistics` maps a key to a module and a statistic of its input (e.g. `squared_norms`); the result maps the same
    keys to the sums (keys of modules that never ran are missing). The forward passes run without gradients, in eval
    mode; the previous sub-network and training flag are restored afterwards. Raises naming `caller` when `batches`
    is empty.
    """
    sums: dict[Hashable, torch.Tensor] = {}

    def hook(key: Hashable, statistic: Statistic) -> Callable[[nn.Module, tuple], None]:
        def record(module: nn.Module, args: tuple) -> None:
            sums[key] = sums.get(key, 0) + statistic(args[0].detach())

        return record

    handles = [module.register_forward_pre_hook(hook(key, stat)) for key, (module, stat) in statistics.items()]
    seen = 0
    try:
        with max_subnetwork(network) as device, torch.no_grad():
            for batch in batches:
                network.model(**on_device(batch, device))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise ValueError(f"{caller} got no batches.")
    return sums
