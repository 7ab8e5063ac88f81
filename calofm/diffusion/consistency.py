"""Consistency models (Song et al. 2023): boundary-condition scalings for distilled one-step samplers."""

from __future__ import annotations

import torch


def boundary_scalings(sigma: torch.Tensor, sigma_data: float, sigma_min: float):
    """c_skip, c_out with c_skip(sigma_min) = 1 and c_out(sigma_min) = 0, so f(x, sigma_min) = x exactly."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out
