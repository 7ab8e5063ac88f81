"""Consistency distillation of an EDM model into a one-step sampler (CaloDiT-2 section 3.1.2, Song et al. 2023).

A flow-matching teacher works the same way: its ODE is seen in EDM's sigma through `flow.as_denoiser`, and its
student keeps the teacher's parametrisation (a velocity at t) under the boundary condition
(`consistency.consistency_function`), so it too starts as its teacher's denoiser (benchmarks/objectives.md).

Three networks of one architecture: the frozen teacher, the student (initialised from the teacher, trained by
the shared loop) and the target, an EMA of the student with constant mu. As in the paper, the teacher is
"distilled into the target model": the target is what is saved, and the loop's own stability EMA is off (the paper
keeps only these three networks). `distill.weights: ema` saves instead that EMA of the student (its power-decay
ramp, `train.ema_max`), as Song et al.'s code samples. Both are registered for checkpointing: a resumed run is exact.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from calofm.config import RunConfig
from calofm.data.loader import find_detector_files
from calofm.data.transforms import Normalizer
from calofm.diffusion import denoiser, sampler_params, shape_conditions
from calofm.diffusion.consistency import cd_loss
from calofm.diffusion.edm import EDMParams
from calofm.hub import load_model
from calofm.models.dit import CaloDiT
from calofm.train.ema import EMA, constant_decay
from calofm.train.loop import finished_model, latest_checkpoint, make_accelerator, save_model, train


def cd_sampler(steps: int, teacher: nn.Module) -> dict:
    """The sampler config saved with a consistency model: its steps (levels: `consistency.multistep_sigmas`), the
    teacher's objective (the student's network keeps its parametrisation: `diffusion.denoiser`) and the teacher's
    parameters, which its boundary condition and preconditioning share."""
    return {"name": "consistency", "steps": steps, "teacher_objective": teacher.objective,
            **sampler_params(teacher).sampler_config()}


class CDObjective:
    """L_CD of `consistency.cd_loss` for the shared loop; `target` (an EMA) is updated after every step."""

    def __init__(self, teacher: nn.Module, student: nn.Module, N: int = 32, mu: float = 0.95,
                 params: EDMParams = EDMParams(), distance: str = "l2", weighting: str = "uniform"):
        self.teacher_objective = getattr(teacher, "objective", "edm")  # the student's parametrisation too
        if self.teacher_objective not in ("edm", "fm"):
            raise ValueError(f"the teacher must be an EDM or FM model, but its objective is {teacher.objective!r}")
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"distill.mu must be in [0, 1), got {mu}")
        self.params, self.N, self.distance, self.weighting = params, N, distance, weighting
        teacher.requires_grad_(False).eval()
        if teacher.deposit_net is not None:  # the student keeps its copy of the teacher's EDM deposit net, frozen:
            student.deposit_net.requires_grad_(False)  # one number a shower needs no distillation
        self.D_teacher = denoiser(teacher, params)  # an FM teacher's ODE in EDM's sigma (`flow.as_denoiser`)
        self.target = EMA(student, constant_decay(mu))
        self.f_target = denoiser(self.target.model, params, "cd", self.teacher_objective)

    def loss(self, net: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        f = denoiser(net, self.params, "cd", self.teacher_objective)
        cond = shape_conditions(batch["cond"], batch.get("deposit"))
        return cd_loss(f, self.f_target, self.D_teacher, batch["x"], cond, self.params, self.N, generator,
                       self.distance, self.weighting)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.target.update(model, step)

    def checkpoint_modules(self) -> list:
        return [self.target.model]


def weights_note(cfg: RunConfig) -> str:
    """What a consistency model's saved weights are (`distill.weights`), for its provenance."""
    if cfg.distill.weights == "ema":
        return f"power-decay EMA of the student (max {cfg.train.ema_max}, power {cfg.train.ema_power})"
    return f"target network (EMA of the student, mu {cfg.distill.mu})"


def saved_network(cfg: RunConfig, objective: CDObjective, trained: nn.Module) -> nn.Module:
    """The network a CD run saves: the target, or with `distill.weights: ema` what the loop returned (its EMA)."""
    return trained if cfg.distill.weights == "ema" else objective.target.model


def pruned_blocks(depth: int, keep: int) -> list[int]:
    """The teacher blocks a `keep`-block student starts from: every (depth / keep)-th, as DistilBERT takes every
    other layer of BERT (6 -> 3: 0, 2, 4; 2 -> 1: 0). The embeddings, final layer and deposit net are all kept."""
    if not 1 <= keep <= depth:
        raise ValueError(f"distill.student_depth must be in [1, {depth}] (the teacher's depth), got {keep}")
    return [i * depth // keep for i in range(keep)]


def student_from(teacher: CaloDiT, depth: int | None = None, **config) -> CaloDiT:
    """A consistency model of the teacher's architecture, slot map and normaliser, starting from its weights; with
    `depth` below the teacher's, of that many blocks (`pruned_blocks`): one network evaluation costs less."""
    config = {"objective": "cd", "sampler": {}, "provenance": {}, **config}
    if depth is None or depth == teacher.depth:
        return teacher.with_config(**config)
    keep = pruned_blocks(teacher.depth, depth)
    student = CaloDiT(**{**teacher._hub_mixin_config, **config, "depth": depth})
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("blocks.")}
    for i, j in enumerate(keep):  # student block i <- teacher block keep[i]
        state.update({f"blocks.{i}.{k}": v for k, v in teacher.blocks[j].state_dict().items()})
    student.load_state_dict(state)
    return student


def distill(cfg: RunConfig, resume: bool = False) -> Path:
    """Distil cfg.distill.teacher, then save the target network to `<output_dir>/model`; returns that folder.

    Detectors: cfg.data.detectors, or all of the teacher's slot map when that list is empty.
    """
    d = cfg.distill
    if not d.teacher:
        raise ValueError("distill.teacher is not set: pass --teacher MODEL or set distill.teacher in the recipe")
    if d.n_boundaries < 2 or d.sample_steps < 1:
        raise ValueError(f"need distill.n_boundaries >= 2 and distill.sample_steps >= 1, got {d.n_boundaries} "
                         f"and {d.sample_steps}")
    accelerator = make_accelerator(cfg)
    if resume and (done := finished_model(cfg, say=accelerator.print)) is not None:
        return done
    teacher = load_model(d.teacher)
    if teacher.normalizer is None:
        raise ValueError(f"{d.teacher}: the teacher has no normaliser in its config; it was not trained by calofm")
    detectors = list(cfg.data.detectors) or sorted(teacher.slot_map, key=teacher.slot_map.get)
    files = find_detector_files(cfg.data.dir, detectors)
    params = sampler_params(teacher)
    student = student_from(teacher, d.student_depth, sampler=cd_sampler(d.sample_steps, teacher), provenance={
        "stage": "distill", "teacher": str(d.teacher), "teacher_provenance": teacher.provenance,
        "detectors": detectors, "steps": cfg.train.steps, "n_boundaries": d.n_boundaries, "mu": d.mu,
        "distance": d.distance, "weighting": d.weighting,
        "weights": weights_note(cfg), "data": str(cfg.data.dir),
        **({"student_blocks": pruned_blocks(teacher.depth, d.student_depth)} if d.student_depth else {})})
    teacher.to(accelerator.device)
    student.to(accelerator.device)
    objective = CDObjective(teacher, student, d.n_boundaries, d.mu, params, d.distance, d.weighting)
    if resume and latest_checkpoint(cfg.output_dir) is None:
        accelerator.print(f"no checkpoint in {cfg.output_dir}; starting from step 0")
    trained = train(cfg, student, objective, files, Normalizer.from_dict(teacher.normalizer),
                    accelerator=accelerator, resume=resume, use_ema=d.weights == "ema", desc="distill")
    out = Path(cfg.output_dir) / "model"
    if accelerator.is_main_process:
        save_model(saved_network(cfg, objective, trained), out)
    accelerator.wait_for_everyone()
    return out
