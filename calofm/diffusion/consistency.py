"""Consistency models (Song et al. 2023): boundary scalings, the consistency-distillation loss and the samplers.

Pure functions of tensors, in the paper's symbols: `f` is the consistency function f_theta(x, sigma, cond) (a
denoiser callable with the boundary scalings, see `calofm.diffusion.denoiser`), `f_target` its EMA target
f_theta^-, and `D_teacher` the frozen EDM denoiser whose probability-flow ODE is being distilled. Time is EDM's
sigma, so t_1 = epsilon = sigma_min and t_N = T = sigma_max.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from calofm.diffusion.edm import Denoiser, EDMParams, heun_step, karras_sigmas, per_sample


def boundary_scalings(sigma: torch.Tensor, sigma_data: float, sigma_min: float):
    """c_skip, c_out with c_skip(sigma_min) = 1 and c_out(sigma_min) = 0, so f(x, sigma_min) = x exactly."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def consistency_function(D: Denoiser, sigma_data: float, sigma_min: float) -> Denoiser:
    """f(x, sigma) = c_skip x + (1 - c_skip) D(x, sigma) (c_skip of `boundary_scalings`): a consistency function
    made of a denoiser D that is not EDM's preconditioned F, such as a flow-matching model's x_0 estimate. It is
    exact at sigma_min (f = x) and D itself where sigma >> sigma_data, so a student made of its teacher's network
    starts as that teacher's denoiser, as an EDM teacher's student does."""

    def f(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c_skip = per_sample(boundary_scalings(sigma.to(torch.float32).view(-1), sigma_data, sigma_min)[0], x)
        return c_skip * x + (1 - c_skip) * D(x, sigma, cond)

    return f


def boundaries(N: int, p: EDMParams, device=None) -> torch.Tensor:
    """t_1 = sigma_min < t_2 < ... < t_N = sigma_max: EDM's Karras schedule with N levels, in ascending order.

    float32, as the networks see sigma; t_1 is set to sigma_min exactly so the boundary condition is exact.
    """
    if N < 2:
        raise ValueError(f"consistency distillation needs N >= 2 boundaries, got {N}")
    t = karras_sigmas(N, p.sigma_min, p.sigma_max, p.rho, device)[:-1].flip(0).to(torch.float32)
    t[0] = p.sigma_min
    return t


DISTANCES = ("l2", "pseudo_huber")
WEIGHTINGS = ("uniform", "inverse_dt")


def cd_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """d(a, b) per sample. l2: the mean squared difference (Song et al. 2023). pseudo_huber: sqrt(|a - b|^2 + c^2) - c
    with c = 0.00054 sqrt(dim) (Song & Dhariwal 2023, improved CT): the squared norm for small differences, the norm
    itself for large ones, so a few badly matched showers do not dominate the gradient."""
    sq = ((a - b) ** 2).flatten(1)
    if kind == "l2":
        return sq.mean(1)
    if kind == "pseudo_huber":
        c = 0.00054 * sq.shape[1] ** 0.5
        return (sq.sum(1) + c**2).sqrt() - c
    raise ValueError(f"distill.distance must be one of {', '.join(DISTANCES)}, got {kind!r}")


def cd_weight(t_n: torch.Tensor, t_n1: torch.Tensor, kind: str = "uniform") -> torch.Tensor:
    """lambda(t_n): 1 (Song et al. 2023), or 1 / (t_{n+1} - t_n) (improved CT), which evens out the loss's scale
    across the schedule: the teacher's step from t_{n+1} to t_n, and so the distance, grows with the gap."""
    if kind == "uniform":
        return torch.ones_like(t_n)
    if kind == "inverse_dt":
        return 1.0 / (t_n1 - t_n)
    raise ValueError(f"distill.weighting must be one of {', '.join(WEIGHTINGS)}, got {kind!r}")


def cd_loss(f: Denoiser, f_target: Denoiser, D_teacher: Denoiser, x: torch.Tensor, cond: torch.Tensor,
            p: EDMParams, N: int = 32, generator: torch.Generator | None = None, distance: str = "l2",
            weighting: str = "uniform") -> torch.Tensor:
    """L_CD = E[ lambda(t_n) d(f(x_{n+1}, t_{n+1}), f^-(x_hat_n, t_n)) ] (`cd_distance`, `cd_weight`; the defaults are
    Song et al.'s squared L2 and lambda = 1).

    Per sample: n ~ U{1, ..., N-1}, x_{n+1} = x + t_{n+1} z, and x_hat_n one Heun step of the teacher's
    probability-flow ODE from t_{n+1} to t_n (`edm.heun_step`). Only the student f receives gradients.
    """
    t = boundaries(N, p, x.device)
    n = torch.randint(0, N - 1, (x.shape[0],), generator=generator, device=x.device)  # 0-based: t[n] = t_n
    t_n, t_n1 = t[n], t[n + 1]
    z = torch.randn(x.shape, generator=generator, device=x.device)
    x_n1 = x + per_sample(t_n1, x) * z
    with torch.no_grad():
        x_hat_n = heun_step(D_teacher, x_n1, t_n1, t_n, cond)
        target = f_target(x_hat_n, t_n, cond)
    return (cd_weight(t_n, t_n1, weighting) * cd_distance(f(x_n1, t_n1, cond), target, distance)).mean()


def multistep_sigmas(steps: int, p: EDMParams) -> list[float]:
    """tau_1 = sigma_max > tau_2 > ... > tau_k: the first k levels of EDM's Karras schedule with k + 1 levels.

    The last level of that schedule is sigma_min, where f is the identity, so it is dropped; the levels in
    between are spaced as in EDM sampling (uniform in sigma^(1/rho)). k = 1: [80]; k = 2: [80, 2.52];
    k = 3: [80, 9.72, 0.47]; k = 4: [80, 17.5, 2.52, 0.17].
    """
    if steps < 1:
        raise ValueError(f"consistency sampling needs steps >= 1, got {steps}")
    return karras_sigmas(steps + 1, p.sigma_min, p.sigma_max, p.rho)[:steps].tolist()


def one_step_sample(f: Denoiser, noise: torch.Tensor, cond: torch.Tensor, p: EDMParams) -> torch.Tensor:
    """x = f(T z, T) with T = sigma_max: the whole probability-flow ODE in one network evaluation."""
    T = noise.new_full((noise.shape[0],), p.sigma_max, dtype=torch.float32)
    return f(noise.to(torch.float32) * p.sigma_max, T, cond)


@torch.no_grad()
def multistep_sample(f: Denoiser, noise: torch.Tensor, cond: torch.Tensor, p: EDMParams, steps: int = 1,
                     generator: torch.Generator | None = None, progress: Callable | None = None,
                     renoise: torch.Tensor | None = None) -> torch.Tensor:
    """Song et al. algorithm 1: one step from T, then k - 1 times re-noise to tau_n and denoise with f.

    x_{tau_n} = x + sqrt(tau_n^2 - epsilon^2) z; the levels tau_n are `multistep_sigmas(steps)`. steps = 1 is the
    one-step sampler. z is `renoise[n - 1]` when given (steps - 1, *noise.shape), else drawn from `generator`.
    """
    taus = multistep_sigmas(steps, p)
    x = one_step_sample(f, noise, cond, p)
    if progress is not None:
        progress()
    for n, tau in enumerate(taus[1:]):
        z = renoise[n].to(x) if renoise is not None else torch.randn(x.shape, generator=generator, device=x.device)
        x_tau = x + (tau**2 - p.sigma_min**2) ** 0.5 * z
        x = f(x_tau, x.new_full((x.shape[0],), tau), cond)
        if progress is not None:
            progress()
    return x
