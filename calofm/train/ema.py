"""Exponential moving average of weights. One class serves both uses: the EDM stability EMA (decay ramping as a
power of the step, capped) and the consistency-distillation target network (constant mu)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def power_decay(max_decay: float, power: float) -> Callable[[int], float]:
    """decay(step) = min(max_decay, 1 - (1 + step)^-power): 0 at the start, so early weights are soon forgotten."""
    return lambda step: min(max_decay, 1.0 - (1.0 + step) ** -power)


def constant_decay(mu: float) -> Callable[[int], float]:
    return lambda step: mu


class EMA:
    def __init__(self, model: nn.Module, decay: Callable[[int], float]):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.decay(step)
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - d)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
