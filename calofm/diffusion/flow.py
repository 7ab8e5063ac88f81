"""Flow matching with conditional optimal-transport paths (Lipman et al. 2023; rectified flow, Liu et al. 2023).

Pure functions of tensors. Data x_0 at t = 0, noise z ~ N(0, I) at t = 1 (the direction EDM's sigma runs):
x_t = (1 - t) x_0 + t z, whose velocity dx_t/dt = z - x_0 the network `v(x, t, cond)` learns by regression. The
probability-flow ODE dx/dt = v is integrated from t = 1 to 0 by Euler or Heun. The same path is EDM's with
sigma = t / (1 - t) and x_t = x_sigma / (1 + sigma), so an FM model is also an EDM denoiser (`as_denoiser`), which
is how consistency distillation takes an FM teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from calofm.diffusion.edm import Denoiser, per_sample

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # v(x_t, t, cond)
SOLVERS = ("euler", "heun")


@dataclass(frozen=True)
class FMParams:
    """Training times t = sigmoid(n), n ~ N(t_mean, t_std^2): the logit-normal of Esser et al. 2024 (SD3), which
    weights the middle of the path, where the velocity is hardest to predict, over its ends."""
    t_mean: float = 0.0
    t_std: float = 1.0


def sample_t(n: int, p: FMParams, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    return torch.sigmoid(torch.randn(n, generator=generator, device=device) * p.t_std + p.t_mean)


def fm_loss(v: Velocity, x: torch.Tensor, cond: torch.Tensor, p: FMParams,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """L_CFM = E || v(x_t, t) - (z - x_0) ||^2 with x_t = (1 - t) x_0 + t z."""
    t = sample_t(x.shape[0], p, generator, x.device)
    z = torch.randn(x.shape, generator=generator, device=x.device)
    x_t = x + per_sample(t, x) * (z - x)
    return ((v(x_t, t, cond) - (z - x)) ** 2).mean()


@torch.no_grad()
def fm_sample(v: Velocity, noise: torch.Tensor, cond: torch.Tensor, steps: int = 32, solver: str = "heun",
              progress: Callable | None = None) -> torch.Tensor:
    """x_0 from x_1 = noise on `steps` uniform steps in t: Euler (steps network evaluations) or Heun (2 x steps;
    the velocity is finite at t = 0, so unlike EDM's sampler the last step is Heun too)."""
    if solver not in SOLVERS:
        raise ValueError(f"flow-matching solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = noise.to(torch.float32)
    ones = x.new_ones(x.shape[0])
    for t, t_next in zip(ts[:-1], ts[1:]):
        d = v(x, t * ones, cond)
        x_next = x + (t_next - t) * d
        if solver == "heun":
            x_next = x + (t_next - t) * (d + v(x_next, t_next * ones, cond)) / 2
        x = x_next
        if progress is not None:
            progress()
    return x


def network_evaluations(steps: int, solver: str) -> int:
    return steps if solver == "euler" else 2 * steps


def as_denoiser(v: Velocity) -> Denoiser:
    """The EDM denoiser D(x_sigma, sigma) = E[x_0 | x_sigma] of an FM model: x_t = x_sigma / (1 + sigma) at
    t = sigma / (1 + sigma), and x_0 = x_t - t v(x_t, t)."""

    def D(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(torch.float32).view(-1)
        t = sigma / (1 + sigma)
        x_t = x / per_sample(1 + sigma, x)
        return x_t - per_sample(t, x) * v(x_t, t, cond)

    return D
