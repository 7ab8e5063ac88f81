"""Objectives and samplers. `denoiser(model)` wraps a CaloDiT's raw network with the preconditioning of the
model's own objective, so callers never branch on edm vs cd."""

from __future__ import annotations

from collections.abc import Callable

import torch

from calofm.diffusion.consistency import boundary_scalings
from calofm.diffusion.edm import Denoiser, EDMParams, heun_sample, precond


def denoiser(model: torch.nn.Module, params: EDMParams = EDMParams(), objective: str | None = None) -> Denoiser:
    """D(x, sigma, cond) = c_skip x + c_out F(c_in x, c_noise, cond) for model.objective in {edm, cd}."""
    objective = objective or model.objective

    def D(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(torch.float32).view(-1)
        c_skip, c_out, c_in, c_noise = precond(sigma, params.sigma_data)
        if objective == "cd":
            c_skip, c_out = boundary_scalings(sigma, params.sigma_data, params.sigma_min)
        F_x = model(x * c_in.view(-1, 1, 1, 1), c_noise, cond)
        return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * F_x.to(x.dtype)

    return D


@torch.no_grad()
def sample(model: torch.nn.Module, noise: torch.Tensor, cond: torch.Tensor, steps: int | None = None,
           generator: torch.Generator | None = None, progress: Callable | None = None) -> torch.Tensor:
    """Normalised showers from unit Gaussian `noise` with the model's own sampler and defaults."""
    params = EDMParams()
    steps = steps or model.sampler.get("steps") or (32 if model.objective == "edm" else 1)
    D = denoiser(model, params)
    if model.objective == "edm":
        return heun_sample(D, noise, cond, params, steps, progress)
    from calofm.diffusion.consistency import multistep_sample

    return multistep_sample(D, noise, cond, params, steps, generator, progress)
