"""Multi-detector pretraining (EDM, or flow matching with model.objective fm): K detectors in fixed one-hot slots,
free slots kept for adaptation, ONE normaliser fitted over all of them and frozen into the model's config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from calofm.config import EDMConfig, FMConfig, ModelConfig, RunConfig
from calofm.data.loader import find_detector_files, fit_normalizer
from calofm.data.sources import canonical_source
from calofm.data.transforms import Normalizer
from calofm.diffusion import (
    DEFAULT_STEPS,
    DEPOSIT_PARAMS,
    denoiser,
    deposit_denoiser,
    sampler_params,
    shape_conditions,
    velocity,
)
from calofm.diffusion.edm import Churn, EDMParams, edm_loss
from calofm.diffusion.flow import FMParams, fm_loss
from calofm.geometry import default_slot_map
from calofm.hub import load_model
from calofm.models.dit import CaloDiT
from calofm.train.deposit import refit_deposit
from calofm.train.loop import finished_model, latest_checkpoint, make_accelerator, save_model, train


def edm_sampler(params: EDMParams, churn: Churn = Churn()) -> dict:
    """The sampler config saved with an EDM model: Heun, its default steps, the parameters it was trained with and
    its churn (none when deterministic, as models saved before it)."""
    return {"name": "heun", "steps": DEFAULT_STEPS["edm"], **params.sampler_config(),
            **({"churn": dataclasses.asdict(churn)} if churn.S_churn > 0 else {})}


def sampler_churn(edm: EDMConfig) -> Churn:
    """The recipe's `edm.s_*` as the sampler's `Churn`."""
    return Churn(edm.s_churn, edm.s_min, edm.s_max, edm.s_noise)


def fm_sampler(cfg: FMConfig) -> dict:
    """The sampler config saved with a flow-matching model: its solver and steps."""
    return {"name": cfg.solver, "steps": cfg.steps}


class PretrainObjective:
    """EDM on the showers (flow matching where `fm` is given); for a model that draws its total deposit first
    (normaliser unit `deposit`), plus EDM on the deposit, and the shape is learnt conditioned on the shower's true
    deposit. The deposit net then goes on alone (calofm/train/deposit.py)."""

    def __init__(self, params: EDMParams = EDMParams(), fm: FMParams | None = None):
        self.params, self.fm = params, fm

    def loss(self, net: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        deposit = batch.get("deposit")
        cond = shape_conditions(batch["cond"], deposit)
        if self.fm is None:
            loss = edm_loss(denoiser(net, self.params, objective="edm"), batch["x"], cond, self.params, generator)
        else:
            loss = fm_loss(velocity(net), batch["x"], cond, self.fm, generator)
        if deposit is not None:  # the same backward pass, so Accelerate's DDP syncs both networks' gradients
            model = getattr(net, "module", net)
            loss = loss + edm_loss(deposit_denoiser(model), deposit, batch["cond"], DEPOSIT_PARAMS, generator)
        return loss

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def checkpoint_modules(self) -> list:
        return []


def build_model(cfg: ModelConfig, **config) -> CaloDiT:
    overrides = {k: v for k, v in (("depth", cfg.depth), ("width", cfg.width), ("heads", cfg.heads),
                                   ("mlp_dim", cfg.mlp_dim), ("patch", cfg.patch)) if v is not None}
    if cfg.particles:
        overrides.update(particle_map={p: i for i, p in enumerate(cfg.particles)},
                         n_particle_slots=len(cfg.particles) + cfg.n_free_particle_slots)
    return CaloDiT.from_preset(cfg.preset, **overrides, **config)


def training_params(base: EDMParams, edm: EDMConfig, ref: str) -> EDMParams:
    """The pretrained model's sigma_data and noise levels (its preconditioning and sampler, fixed by its weights)
    with the recipe's training distribution of noise levels (`edm.p_mean`, `edm.p_std`), as in pretraining."""
    if edm.sigma_data != base.sigma_data:
        raise ValueError(f"edm.sigma_data={edm.sigma_data}, but {ref} was trained with sigma_data={base.sigma_data}, "
                         "which its preconditioning fixes: drop edm.sigma_data from the recipe")
    return dataclasses.replace(base, P_mean=edm.p_mean, P_std=edm.p_std)


def starting_model(cfg: RunConfig, slot_map: dict[str, int]) -> CaloDiT:
    """`model.init_from`, checked against the run: the same detectors in the same slots and the same objective, so
    its weights mean what the run's data means; its normaliser is then the run's (a refit would move the scale under
    the weights)."""
    ref = cfg.model.init_from
    start = load_model(ref)
    if start.slot_map != slot_map:
        raise ValueError(f"model.init_from={ref!r} has the detector slots {start.slot_map}, but data.detectors "
                         f"{cfg.data.detectors} gives {slot_map}; list its detectors in its slot order (a new "
                         "detector is `calofm adapt`'s job)")
    if start.objective != cfg.model.objective or start.normalizer is None:
        raise ValueError(f"model.init_from={ref!r} is a {start.objective!r} model"
                         f"{'' if start.normalizer else ' without a normaliser'}; this run trains "
                         f"{cfg.model.objective!r} (model.objective)")
    norm = Normalizer.from_dict(start.normalizer)
    if (norm.unit, norm.eps) != (cfg.data.unit, cfg.data.log_eps) or norm.centre > cfg.data.centre:
        raise ValueError(f"model.init_from={ref!r} was trained with data.unit={norm.unit}, data.log_eps={norm.eps:g}, "
                         f"data.centre={norm.centre}; the recipe sets {cfg.data.unit}, {cfg.data.log_eps:g}, "
                         f"{cfg.data.centre}: set them as the model's (a model without the centre may gain it)")
    return start


def start_normalizer(cfg: RunConfig, start: CaloDiT, files: dict[str, Path]) -> Normalizer:
    """The start's normaliser; where the run adds `data.centre` to a model without it, the centre's scale is fitted
    on the run's showers (everything else stays the start's, which its weights were trained with)."""
    norm = Normalizer.from_dict(start.normalizer)
    if cfg.data.centre and not norm.centre:
        fitted = fit_normalizer(files, cfg.data.max_per_detector, eps=norm.eps, unit=norm.unit, centre=True)
        norm = dataclasses.replace(norm, centre=True, centre_std=fitted.centre_std)
    return norm


def with_centre(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of a model without the centre, widened to `target`'s (the same model with it) so that the widened
    model computes what the start did: the centre's new inputs (the last two columns of the condition embedding,
    columns 1-2 of the deposit net's first layer) and outputs (the deposit net's rows 1-2, the dipole term) are zero;
    training grows them from there. Tensors of another architecture are left for `load_state_dict` to report."""
    out = dict(state) | {k: torch.zeros_like(w) for k, w in target.items() if k.startswith("dipole.")}
    for k, v in state.items():
        w = target.get(k)
        if w is None or w.shape == v.shape or not k.startswith(("deposit_net.net.", "cond_embed.0.")):
            continue
        out[k] = torch.zeros_like(w)
        if k == "deposit_net.net.0.weight":  # inputs [y, noise embedding, conditions]: y gains the centre's x, y
            out[k][:, :1], out[k][:, 3:] = v[:, :1], v[:, 1:]
        else:  # the deposit's output row, or the condition embedding's columns before the centre's
            out[k][tuple(slice(0, n) for n in v.shape)] = v
    return out


def warm_restart(cfg: RunConfig, start: CaloDiT | None) -> dict:
    """Provenance of a run started from `model.init_from`: the model and the steps it had seen, its own warm
    restarts' included."""
    if start is None:
        return {}
    seen = start.provenance.get("steps")
    if seen is not None:
        seen += start.provenance.get("init_steps", 0)
    return {"init_from": cfg.model.init_from, "init_steps": seen}


def load_start(model: CaloDiT, start: CaloDiT, ref: str) -> None:
    """`start`'s weights into the run's `model` (built from the recipe; `with_centre` where the run adds the centre),
    or an error naming what differs."""
    state = start.state_dict()
    if model.dipole is not None and start.dipole is None:
        state = with_centre(state, model.state_dict())
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"model.init_from={ref!r}: its weights do not fit the recipe's model (model.preset, "
                         f"depth, width, heads, mlp_dim, patch, slots): {str(e).splitlines()[1].strip()}") from e


def pretrain(cfg: RunConfig, resume: bool = False) -> Path:
    """Train, fit the deposit net on its own (`cfg.deposit`), then save the EMA model to `<output_dir>/model`;
    returns that folder."""
    accelerator = make_accelerator(cfg)
    if resume and (done := finished_model(cfg, say=accelerator.print)) is not None:
        return done
    files = find_detector_files(cfg.data.dir, cfg.data.detectors)
    slot_map = default_slot_map(cfg.data.detectors)
    start = starting_model(cfg, slot_map) if cfg.model.init_from else None
    normalizer = (start_normalizer(cfg, start, files) if start is not None else
                  fit_normalizer(files, cfg.data.max_per_detector, eps=cfg.data.log_eps, unit=cfg.data.unit,
                                 centre=cfg.data.centre))
    params = EDMParams(sigma_data=cfg.edm.sigma_data, P_mean=cfg.edm.p_mean, P_std=cfg.edm.p_std)
    fm = FMParams(cfg.fm.t_mean, cfg.fm.t_std) if cfg.model.objective == "fm" else None
    if start is not None and fm is None:  # its preconditioning and noise range, fixed by its weights
        params = training_params(sampler_params(start), cfg.edm, cfg.model.init_from)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, n_slots=len(slot_map) + cfg.model.n_free_slots, slot_map=slot_map,
                        normalizer=normalizer.to_dict(), objective=cfg.model.objective,
                        sampler=fm_sampler(cfg.fm) if fm else edm_sampler(params, sampler_churn(cfg.edm)),
                        provenance={"stage": "pretrain", "detectors": list(slot_map), "steps": cfg.train.steps,
                                    "data": canonical_source(cfg.data.dir), **warm_restart(cfg, start)})
    if start is not None:
        load_start(model, start, cfg.model.init_from)
    if resume and latest_checkpoint(cfg.output_dir) is None:
        accelerator.print(f"no checkpoint in {cfg.output_dir}; starting from step 0")
    ema = train(cfg, model, PretrainObjective(params, fm), files, normalizer, accelerator=accelerator, resume=resume,
                desc="pretrain")
    refit_deposit(ema, files, normalizer, cfg, show=accelerator.is_main_process)
    out = Path(cfg.output_dir) / "model"
    if accelerator.is_main_process:
        save_model(ema, out)
    accelerator.wait_for_everyone()
    return out
