"""Exponential moving average weights at save time: the recipes save their EMA adapter by swapping
the averaged values into the trained parameters for the duration of the save."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def parameters_replaced(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily load `state` (e.g. EMA weights, keyed by parameter name) into `model`'s parameters."""
    parameters = dict(model.named_parameters())
    saved = {name: parameters[name].detach().clone() for name in state}
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                parameters[name].copy_(value)
