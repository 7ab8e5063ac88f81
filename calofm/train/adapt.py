"""Adaptation of a pretrained model to a new detector (CaloDiT-2 section 3.3).

The new detector gets a free one-hot slot; nothing else of the pretrained model's contract changes (the shared
normaliser, the other detectors' slots). Stage 1 fine-tunes the pretrained (EMA) EDM on the new showers; stage 2
distils the adapted EDM into a consistency model whose student starts from the pretrained CD model, moved by
what stage 1 changed in the EDM's weights (`adapt.cd_transfer`; full and conditioning modes). Both stages
run through the shared Accelerate loop and train only the parameters the mode selects:

- full: every weight.
- lora: peft LoRA adapters on the attention, MLP and adaLN linears (`adapt.lora_targets`). The condition
  embedding's first Linear, the layer that reads the one-hot vector, trains in full (peft `modules_to_save`):
  the new slot's column is a fresh, never-trained row of inputs, and a low-rank update of that layer would also
  move every other detector's column. So does the small deposit net, where the model has one. The adapter is saved alone (loadable with `PeftModel.from_pretrained`)
  and merged into plain weights for the exported model.
- conditioning: only the condition embedding and the adaLN modulation (`CaloDiT.conditioning_parameter_names`),
  which include that first Linear.

Output folder: `edm/` and `cd/` model folders (config.json carries the updated slot map, the unchanged
normaliser and `provenance`; no `cd/` when adapt.cd_steps = 0), `adapters/{edm,cd}/` in LoRA mode, and
`runs/{edm,cd}/` with the checkpoints, resolved config and metrics of each stage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from calofm.config import RunConfig
from calofm.data.formats import open_showers
from calofm.data.loader import detector_response, find_detector_files
from calofm.data.transforms import Normalizer
from calofm.diffusion import sampler_params
from calofm.diffusion.flow import FMParams
from calofm.geometry import get_detector
from calofm.hub import load_model
from calofm.io import atomic_dir
from calofm.models.dit import CaloDiT
from calofm.particles import particle_code
from calofm.pretrained import shipped_root
from calofm.train.deposit import refit_deposit
from calofm.train.distill import CDObjective, cd_sampler, saved_network, student_from, weights_note
from calofm.train.loop import make_accelerator, save_model, train
from calofm.train.pretrain import PretrainObjective, training_params

MODES = ("full", "lora", "conditioning")
# Learning rate when no recipe sets one, every mode. Measured on the shipped tiny model (benchmarks/adaptation.md):
# full fine-tuning at CaloDiT-2's 1e-4 reached FPD x1e3 270 after 1,000 steps, at 1e-3 60; the paper-size recipe
# (recipes/adapt-paper.yaml) keeps the paper's 1e-4.
DEFAULT_LR = 1e-3
SLOT_LAYER = "cond_embed.0"  # the Linear that reads [E, theta, phi, one-hot]: trains in every mode


def resolve_pretrained(pretrained: str, pretrained_cd: str = "") -> tuple[str, str | None]:
    """(EDM, CD or None) model references: a folder holding `edm/` (and `cd/`), or an EDM model (+ a CD model)."""
    if not pretrained:
        raise ValueError("adapt.pretrained is not set: pass --pretrained DIR (a folder with edm/ and cd/, a shipped "
                         "model's name such as calodit-tiny-standin, or an EDM model folder or Hub repo id)")
    root = shipped_root(pretrained) or Path(pretrained).expanduser()
    if (root / "edm").is_dir():
        cd = root / "cd"
        return str(root / "edm"), pretrained_cd or (str(cd) if cd.is_dir() else None)
    return pretrained, pretrained_cd or None


def allocate_slot(slot_map: dict[str, int], n_slots: int, detector: str, continue_slot: bool = False,
                  source: str = "the pretrained model", what: str = "detector") -> int:
    """The one-hot slot for `detector` (or particle, `what`): its own slot when continuing, else the lowest free
    one; never a reuse."""
    if detector in slot_map:
        if continue_slot:
            return slot_map[detector]
        raise ValueError(f"{what} {detector!r} already has slot {slot_map[detector]} in {source}; to train that "
                         f"slot further set adapt.continue_slot=true, or adapt under another {what} name")
    free = sorted(set(range(n_slots)) - set(slot_map.values()))
    if not free:
        option = "model.n_free_slots" if what == "detector" else "model.n_free_particle_slots"
        raise ValueError(f"no free one-hot slot in {source}: all {n_slots} slots are taken ({slot_map}); pretrain "
                         f"with more free slots ({option}) to adapt to another {what}")
    return free[0]


def select_trainable(model: CaloDiT, mode: str, lora_rank: int = 16, lora_alpha: int = 32,
                     lora_dropout: float = 0.0, lora_targets: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """`model` with requires_grad set for `mode`; in LoRA mode a peft model wrapping it."""
    check_mode(mode)
    if mode == "full":
        return model.requires_grad_(True)
    if mode == "conditioning":
        names = set(model.conditioning_parameter_names())
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
        return model
    from peft import LoraConfig, get_peft_model

    if lora_rank < 1 or not lora_targets:
        raise ValueError(f"LoRA needs adapt.lora_rank >= 1 and some adapt.lora_targets, got {lora_rank} and "
                         f"{list(lora_targets)}")
    full = [SLOT_LAYER] + (["deposit_net"] if model.deposit_net is not None else [])
    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=list(lora_targets), modules_to_save=full)
    return get_peft_model(model, config)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"adapt.mode must be one of {', '.join(MODES)}, got {mode!r}")


def finish(trained: nn.Module, model_dir: Path, adapter_dir: Path, is_main: bool = True) -> CaloDiT:
    """Save a trained stage: in LoRA mode the adapter alone (peft `save_pretrained`: adapter_model.safetensors,
    loadable onto the base with `PeftModel.from_pretrained`), then the adapter merged into plain weights; the
    model folder holds plain CaloDiT weights in every mode. Returns that model."""
    lora = hasattr(trained, "merge_and_unload")
    if lora and is_main:
        with atomic_dir(adapter_dir) as tmp:
            trained.save_pretrained(tmp)
    model = trained.merge_and_unload() if lora else trained  # merging rewrites the peft model in place: save first
    if is_main:
        save_model(model, model_dir)
    return model


def _check_cd(edm: CaloDiT, cd: CaloDiT, edm_ref: str, cd_ref: str) -> None:
    if cd.objective != "cd":
        raise ValueError(f"{cd_ref}: the pretrained CD model has objective {cd.objective!r}, expected 'cd'")
    for key in ("n_slots", "slot_map", "normalizer"):
        if getattr(cd, key) != getattr(edm, key):
            raise ValueError(f"{cd_ref}: its {key} {getattr(cd, key)} differs from the EDM model's "
                             f"({edm_ref}: {getattr(edm, key)}); both must come from the same pretraining")


def default_run(cfg: RunConfig, explicit: set[str]) -> RunConfig:
    """Without a recipe: `DEFAULT_LR` and `runs/adapt-<detector>-<mode>`, unless set explicitly."""
    check_mode(cfg.adapt.mode)
    if "output_dir" not in explicit:
        cfg = dataclasses.replace(cfg, output_dir=f"runs/adapt-{cfg.adapt.detector}-{cfg.adapt.mode}")
    if "train.lr" not in explicit:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=DEFAULT_LR))
    return cfg


def add_change(student: nn.Module, before: nn.Module, after: nn.Module) -> None:
    """student += after - before, weight by weight (task arithmetic, Ilharco et al. 2023): the CD student starts
    where the EDM's fine-tuning moved its own weights, new slot included, instead of where pretraining left it
    (benchmarks/adaptation.md: the demo's adapted CD has its centre drift back and calofm's FPD 407 -> 163 x1e-3;
    the CaloChallenge FPD, weighing per-layer widths, rises 4.4e3 -> 6.5e3)."""
    b, a = before.state_dict(), after.state_dict()
    with torch.no_grad():
        for name, w in student.state_dict().items():  # views of the parameters: updated in place
            w.add_(a[name].to(w.device) - b[name].to(w.device))


def adapt(cfg: RunConfig, resume: bool = False) -> Path:
    """Adapt `cfg.adapt.pretrained` to `cfg.adapt.detector`: EDM fine-tuning, then CD; returns the output folder."""
    a = cfg.adapt
    check_mode(a.mode)
    get_detector(a.detector)
    if not a.data:
        raise ValueError("adapt.data is not set: pass --data FILE with the new detector's showers")
    out = Path(cfg.output_dir)
    if (out / "edm").exists() and not resume:
        raise ValueError(f"{out}: already holds an adapted model; pass --resume to continue or choose another "
                         "output_dir")

    edm_ref, cd_ref = resolve_pretrained(a.pretrained, a.pretrained_cd)
    base = load_model(edm_ref)
    if base.objective not in ("edm", "fm") or base.normalizer is None:
        raise ValueError(f"{edm_ref}: expected a pretrained EDM (or FM) model with a normaliser, got objective "
                         f"{base.objective!r}")
    base_cd = load_model(cd_ref) if cd_ref else None
    if base_cd is not None:
        _check_cd(base, base_cd, edm_ref, cd_ref)
    if a.particle:  # a new particle, on a detector the model knows or a new one
        particle_code(a.particle)
        known = a.detector in base.slot_map
        slot = base.slot_map[a.detector] if known else allocate_slot(base.slot_map, base.n_slots, a.detector)
        particle_map = {**base.particle_map, a.particle: allocate_slot(
            base.particle_map, base.n_particle_slots, a.particle, a.continue_slot, edm_ref, "particle")}
    else:
        slot = allocate_slot(base.slot_map, base.n_slots, a.detector, a.continue_slot, edm_ref)
        particle_map = base.particle_map
    slot_map = {**base.slot_map, a.detector: slot}

    files = find_detector_files(a.data, [a.detector])
    with open_showers(files[a.detector]) as f:
        available = len(f)
    n_train = a.n_train or available
    if not 0 < n_train <= available:
        raise ValueError(f"adapt.n_train={n_train}, but {files[a.detector]} holds {available} showers")
    run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_per_detector=n_train))
    normalizer = Normalizer.from_dict(base.normalizer)
    if normalizer.uses_response and a.detector not in normalizer.response:
        # the one number a new detector brings to the frozen transform: its mean E_dep / E_inc
        normalizer = normalizer.with_response(a.detector, detector_response(files[a.detector], n_train))
    provenance = {"base_model": edm_ref, "detector": a.detector, "slot": slot, "mode": a.mode, "data": str(a.data),
                  "n_train": n_train, **({"particle": a.particle} if a.particle else {})}
    lora = dict(lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                lora_targets=a.lora_targets)

    # Stage 1: fine-tune the pretrained EMA EDM.
    edm_dir = out / "edm"
    if edm_dir.exists():
        edm = load_model(edm_dir)
    else:
        stage = dataclasses.replace(run, output_dir=str(out / "runs" / "edm"))
        accelerator = make_accelerator(stage)
        accelerator.print(f"adapting {edm_ref} to {a.detector} in slot {slot} ({a.mode}, {n_train} showers)")
        torch.manual_seed(cfg.train.seed)
        net = select_trainable(base.with_config(slot_map=slot_map, particle_map=particle_map,
                                                normalizer=normalizer.to_dict(), provenance={
            **provenance, "stage": "adapt-edm", "steps": stage.train.steps}), a.mode, **lora)
        fm = FMParams(cfg.fm.t_mean, cfg.fm.t_std) if base.objective == "fm" else None
        objective = PretrainObjective(training_params(sampler_params(base), cfg.edm, edm_ref), fm)
        trained = train(stage, net, objective, files, normalizer, accelerator=accelerator, resume=resume,
                        desc=f"adapt EDM ({a.mode})")
        refit_deposit(trained, files, normalizer, run, show=accelerator.is_main_process)
        edm = finish(trained, edm_dir, out / "adapters" / "edm", accelerator.is_main_process)
        accelerator.wait_for_everyone()

    # Stage 2: distil the adapted EDM; the student starts from the pretrained CD model. cd_steps = 0: EDM only.
    cd_dir = out / "cd"
    if a.cd_steps != 0 and not cd_dir.exists():
        stage = dataclasses.replace(run, output_dir=str(out / "runs" / "cd"),
                                    train=dataclasses.replace(run.train, steps=a.cd_steps or run.train.steps))
        accelerator = make_accelerator(stage)
        cd_provenance = {**provenance, "base_model": cd_ref or edm_ref, "stage": "adapt-cd",
                         "steps": stage.train.steps, "teacher": str(edm_dir),
                         "distance": cfg.distill.distance, "weighting": cfg.distill.weighting,
                         "weights": weights_note(cfg),
                         "student_init": cd_ref or "the adapted EDM (no pretrained CD model given)"}
        if base_cd is not None:
            transfer = a.cd_transfer and a.mode != "lora"  # a LoRA adapter must load onto the pretrained CD itself
            if transfer:
                cd_provenance["student_init"] = f"{cd_ref} plus the EDM stage's change to {edm_ref}"
            student = base_cd.with_config(slot_map=slot_map, particle_map=particle_map, normalizer=normalizer.to_dict(),
                                          provenance=cd_provenance)
            if transfer:
                add_change(student, base, edm)
            if student.deposit_net is not None:  # the deposit is drawn by the adapted EDM's net (see distill.py)
                student.deposit_net.load_state_dict(edm.deposit_net.state_dict())
        else:
            accelerator.print("no pretrained CD model: stage 2 starts the student from the adapted EDM")
            student = student_from(edm, sampler=cd_sampler(cfg.distill.sample_steps, edm),
                                   provenance=cd_provenance)
        torch.manual_seed(cfg.train.seed)
        net = select_trainable(student, a.mode, **lora)
        edm.to(accelerator.device)
        net.to(accelerator.device)
        objective = CDObjective(edm, net, cfg.distill.n_boundaries, cfg.distill.mu, sampler_params(edm),
                                cfg.distill.distance, cfg.distill.weighting)
        trained = train(stage, net, objective, files, normalizer, accelerator=accelerator, resume=resume,
                        use_ema=cfg.distill.weights == "ema", desc=f"adapt CD ({a.mode})")
        finish(saved_network(cfg, objective, trained), cd_dir, out / "adapters" / "cd", accelerator.is_main_process)
        accelerator.wait_for_everyone()
    return out

