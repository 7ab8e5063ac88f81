"""Objectives and samplers. `denoiser(model)` wraps a CaloDiT's raw network with the preconditioning of the
model's own objective (edm, cd, or fm: flow matching, whose velocity is also a denoiser, `flow.as_denoiser`), and
`sample(model)` runs its own sampler, so callers never branch on the objective.

A model whose normaliser has unit `deposit` draws each shower's total deposit first, with its small
`deposit_net` and EDM's Heun sampler (whatever the model's objective: it is one number a shower, so 63
evaluations of an MLP cost next to nothing beside one of the transformer), then the shape conditioned on it:
the encoded deposit is the last column of the transformer's conditions (`shape_conditions`). A model whose
normaliser has `centre` draws the shower's transverse centre (x, y) with it: three numbers, the last three columns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from calofm.diffusion import flow
from calofm.diffusion.consistency import boundary_scalings, consistency_function
from calofm.diffusion.edm import Churn, Denoiser, EDMParams, heun_sample, per_sample, precond

# The encoded deposit (and centre) are standardised (unit variance over the training showers), so sigma_data = 1.
DEPOSIT_PARAMS = EDMParams(sigma_data=1.0)
DEPOSIT_STEPS = 32
# Heun steps of EDM and FM; one step is the point of consistency distillation
DEFAULT_STEPS = {"edm": 32, "cd": 1, "fm": 32}


def sampler_steps(model: torch.nn.Module, steps: int | None = None) -> int:
    """The one rule for the number of sampler steps: `steps` if given, else the model's saved `sampler.steps`,
    else its objective's default."""
    return int(steps or (model.sampler or {}).get("steps") or DEFAULT_STEPS[model.objective])


def sampler_params(model: torch.nn.Module) -> EDMParams:
    """The noise levels and sigma_data a model samples with: its saved `sampler` config (`EDMParams.from_sampler`)."""
    return EDMParams.from_sampler(model.sampler)


def step_noise_draws(model: torch.nn.Module, steps: int | None = None) -> int:
    """How many noise tensors of a shower's shape the model's sampler draws after its start: a multistep
    consistency sampler's re-noisings (steps - 1), the churned steps of EDM's stochastic sampler (`Churn`), none
    for flow matching."""
    steps = sampler_steps(model, steps)
    if model.objective == "cd":
        return steps - 1
    if model.objective == "edm":
        return Churn.from_sampler(model.sampler).draws(steps, sampler_params(model))
    return 0


def sampler_label(model: torch.nn.Module, steps: int | None = None) -> str:
    """How the model samples, for reports: e.g. "32 Heun steps, churn S_churn 10", "1 step"."""
    steps = sampler_steps(model, steps)
    if model.objective == "cd":
        return f"{steps} step" + "s" * (steps > 1)
    label = f"{steps} {(model.sampler or {}).get('name', 'heun').capitalize()} steps"
    churn = Churn.from_sampler(model.sampler)
    return label + (f", churn S_churn {churn.S_churn:g}" if model.objective == "edm" and churn.S_churn > 0 else "")


def network_evaluations(model: torch.nn.Module, steps: int | None = None) -> int:
    """Transformer evaluations per shower of the model's sampler (the deposit net's not counted)."""
    steps = sampler_steps(model, steps)
    if model.objective == "fm":
        return flow.network_evaluations(steps, (model.sampler or {}).get("name", "heun"))
    return steps if model.objective == "cd" else 2 * steps - 1


def velocity(model: torch.nn.Module) -> flow.Velocity:
    """v(x_t, t, cond) of a flow-matching model: the raw network, with t as its noise input."""
    return lambda x, t, cond: model(x, t.to(torch.float32).view(-1), cond).to(x.dtype)


def teacher_objective(model: torch.nn.Module) -> str:
    """What a consistency model's network was trained as before its distillation: its teacher's objective (edm or
    fm), saved in its `sampler` config (models saved without it were distilled from EDM)."""
    return (model.sampler or {}).get("teacher_objective", "edm")


def denoiser(model: torch.nn.Module, params: EDMParams = EDMParams(), objective: str | None = None,
             teacher: str | None = None) -> Denoiser:
    """D(x, sigma, cond) = c_skip x + c_out F(c_in x, c_noise, cond) for model.objective in {edm, cd}; for fm,
    the FM model's own estimate of x_0 (`flow.as_denoiser`); for cd distilled from fm (`teacher`, default
    `teacher_objective(model)`), that estimate under the boundary condition (`consistency.consistency_function`)."""
    objective = objective or model.objective
    if objective == "fm":
        return flow.as_denoiser(velocity(model))
    if objective == "cd" and (teacher or teacher_objective(model)) == "fm":
        return consistency_function(flow.as_denoiser(velocity(model)), params.sigma_data, params.sigma_min)

    def D(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(torch.float32).view(-1)
        c_skip, c_out, c_in, c_noise = precond(sigma, params.sigma_data)
        if objective == "cd":
            c_skip, c_out = boundary_scalings(sigma, params.sigma_data, params.sigma_min)
        F_x = model(x * per_sample(c_in, x), c_noise, cond)
        return per_sample(c_skip, x) * x + per_sample(c_out, x) * F_x.to(x.dtype)

    return D


def deposit_denoiser(model: torch.nn.Module) -> Denoiser:
    """The EDM denoiser of a model's total deposit [and centre] y (B, deposit_net.dim), conditioned on (B, n_cond)."""
    return denoiser(model.deposit_net, DEPOSIT_PARAMS, objective="edm")


def shape_conditions(cond: torch.Tensor, deposit: torch.Tensor | None) -> torch.Tensor:
    """The transformer's conditions: [kinematics, one-hot] and, for a model that draws it, the encoded deposit [and
    centre]."""
    return cond if deposit is None else torch.cat([cond, deposit.to(cond.dtype)], 1)


@torch.no_grad()
def sample(model: torch.nn.Module, noise: torch.Tensor, cond: torch.Tensor, steps: int | None = None,
           generator: torch.Generator | None = None, progress: Callable | None = None,
           deposit_noise: torch.Tensor | None = None, step_noise: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalised showers from unit Gaussian `noise` with the model's own sampler and its saved parameters, and the
    encoded deposit [and centre] (B, deposit_net.dim) they were drawn with (None for a model without `deposit_net`).
    `deposit_noise` (B, deposit_net.dim) starts the deposit's sampler (default: drawn from `generator`); `step_noise` (`step_noise_draws`, B, ...) is
    what the sampler adds on the way: a multistep consistency sampler's re-noising or EDM's churn (default: drawn
    from `generator`)."""
    params = sampler_params(model)
    deposit = None
    if model.deposit_net is not None:
        if deposit_noise is None:
            deposit_noise = torch.randn((noise.shape[0], model.deposit_net.dim), generator=generator,
                                        device=noise.device)
        deposit = heun_sample(deposit_denoiser(model), deposit_noise, cond, DEPOSIT_PARAMS, DEPOSIT_STEPS)
    cond = shape_conditions(cond, deposit)
    steps = sampler_steps(model, steps)
    if model.objective == "fm":
        return flow.fm_sample(velocity(model), noise, cond, steps, model.sampler.get("name", "heun"), progress), deposit
    D = denoiser(model, params)
    if model.objective == "edm":
        return heun_sample(D, noise, cond, params, steps, progress, Churn.from_sampler(model.sampler), step_noise,
                           generator), deposit
    from calofm.diffusion.consistency import multistep_sample

    return multistep_sample(D, noise, cond, params, steps, generator, progress, step_noise), deposit
