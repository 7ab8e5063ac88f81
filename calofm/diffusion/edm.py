"""EDM (Karras et al. 2022): preconditioning, noise-level distribution, loss weight and the Heun sampler
(algorithm 1, deterministic, or algorithm 2 with `Churn`).

Pure functions of tensors; `D` below is any denoiser callable D(x, sigma, cond) -> x0 estimate, for x of any
shape (B, ...): a shower (B, 9, 16, 45) or its total deposit (B, 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


SAMPLER_KEYS = ("sigma_data", "sigma_min", "sigma_max", "rho")  # what a saved model's `sampler` config holds


@dataclass(frozen=True)
class EDMParams:
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    P_mean: float = -1.2
    P_std: float = 1.2
    rho: float = 7.0

    @classmethod
    def from_sampler(cls, sampler: dict | None) -> EDMParams:
        """The parameters a model's saved `sampler` config names; a key it lacks (older models) keeps EDM's value."""
        return cls(**{k: float(sampler[k]) for k in SAMPLER_KEYS if sampler and k in sampler})

    def sampler_config(self) -> dict:
        return {k: getattr(self, k) for k in SAMPLER_KEYS}


@dataclass(frozen=True)
class Churn:
    """EDM algorithm 2's stochasticity. Before the step from each noise level t_i in [S_min, S_max], fresh noise
    raises it to t_hat = (1 + gamma) t_i, gamma = min(S_churn / steps, sqrt(2) - 1), and the Heun step starts from
    t_hat; S_noise a little above 1 offsets the denoiser's shrinking of the noise it adds. The fresh noise corrects
    errors of the earlier steps (EDM section 4; benchmarks/fidelity.md: it halves the stray cells an imperfect
    model lights in low-energy showers). S_churn = 0 is algorithm 1."""
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0

    @classmethod
    def from_sampler(cls, sampler: dict | None) -> Churn:
        """A model's saved `sampler.churn` (absent: deterministic, as every model saved before it)."""
        saved = (sampler or {}).get("churn") or {}
        unknown = set(saved) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"sampler.churn: unknown key {sorted(unknown)[0]!r}; expected "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**{k: float(v) for k, v in saved.items()})

    def levels(self, sigmas: list[float]) -> list[float]:
        """t_hat of each step of the schedule `sigmas` (`karras_sigmas`: steps levels, then 0)."""
        gamma = min(self.S_churn / (len(sigmas) - 1), math.sqrt(2) - 1)
        return [t * (1 + gamma) if self.S_churn > 0 and self.S_min <= t <= self.S_max else t for t in sigmas[:-1]]

    def draws(self, steps: int, p: EDMParams) -> int:
        """How many fresh noise tensors a sample of `steps` steps takes."""
        sigmas = karras_sigmas(steps, p.sigma_min, p.sigma_max, p.rho).tolist()
        return sum(h > t for h, t in zip(self.levels(sigmas), sigmas, strict=False))


def per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1), broadcasting one value per sample over x."""
    return v.view(-1, *([1] * (x.ndim - 1)))


def precond(sigma: torch.Tensor, sigma_data: float):
    """c_skip, c_out, c_in, c_noise of EDM table 1."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1 / s2.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def sample_sigma(n: int, p: EDMParams, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """ln sigma ~ N(P_mean, P_std^2)."""
    return (torch.randn(n, generator=generator, device=device) * p.P_std + p.P_mean).exp()


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2: unit loss magnitude at every sigma."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(D: Denoiser, x: torch.Tensor, cond: torch.Tensor, p: EDMParams,
             generator: torch.Generator | None = None) -> torch.Tensor:
    sigma = sample_sigma(x.shape[0], p, generator, x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device) * per_sample(sigma, x)
    w = per_sample(loss_weight(sigma, p.sigma_data), x)
    return (w * (D(x + noise, sigma, cond) - x) ** 2).mean()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float, device=None) -> torch.Tensor:
    """sigma_0 = sigma_max > ... > sigma_{steps-1} = sigma_min, then a final 0 (EDM eq. 5)."""
    i = torch.arange(steps, dtype=torch.float64, device=device)
    s = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64, device=device)])


def heun_step(D: Denoiser, x: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor,
              cond: torch.Tensor) -> torch.Tensor:
    """One deterministic step of EDM algorithm 1 from sigma to sigma_next (Euler when sigma_next = 0).

    sigma and sigma_next are floats, or (B,) tensors for a different step per sample (consistency distillation).
    """
    heun = bool((torch.as_tensor(sigma_next) > 0).all())  # decided before x enters, so a trace stays static
    ones = x.new_ones(x.shape[0])
    sigma, sigma_next = sigma * ones, sigma_next * ones
    s, s_next = per_sample(sigma, x), per_sample(sigma_next, x)
    d = (x - D(x, sigma, cond)) / s
    x_next = x + (s_next - s) * d
    if heun:
        d2 = (x_next - D(x_next, sigma_next, cond)) / s_next
        x_next = x + (s_next - s) * (d + d2) / 2
    return x_next


@torch.no_grad()
def heun_sample(D: Denoiser, noise: torch.Tensor, cond: torch.Tensor, p: EDMParams, steps: int = 32,
                progress: Callable | None = None, churn: Churn = Churn(), step_noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """2nd-order sampler: `steps` noise levels, 2 * steps - 1 network evaluations. With `churn`, the k-th churned
    step's fresh noise is `step_noise[k]` when given ((churn.draws(steps, p), *noise.shape)), else drawn from
    `generator`."""
    sigmas = karras_sigmas(steps, p.sigma_min, p.sigma_max, p.rho).tolist()
    hats = churn.levels(sigmas)
    x = noise.to(torch.float32) * sigmas[0]
    k = 0
    for i in range(steps):
        if hats[i] > sigmas[i]:
            z = step_noise[k].to(x) if step_noise is not None else torch.randn(x.shape, generator=generator,
                                                                                device=x.device)
            x = x + (hats[i] ** 2 - sigmas[i] ** 2) ** 0.5 * churn.S_noise * z
            k += 1
        x = heun_step(D, x, hats[i], sigmas[i + 1], cond)
        if progress is not None:
            progress()
    return x
