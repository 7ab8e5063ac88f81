"""The one Accelerate training loop behind pretrain, distill and adapt.

An `Objective` supplies the loss (EDM, consistency distillation, ...); the loop owns everything else: AdamW, the
WSD schedule, the weight EMA, clipping, accumulation, mixed precision, checkpoints with exact resume, the progress
bar and the metrics log. Noise is drawn from a generator seeded by (seed, rank, step, micro-step), and the data
stream is a pure function of its position, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from calofm.config import RunConfig, save_config
from calofm.data.loader import ShowerStream
from calofm.data.transforms import Normalizer
from calofm.io import atomic_dir, atomic_write_text
from calofm.progress import progress
from calofm.train import checkpoint
from calofm.train.checkpoint import checkpoints, clean_stale, last_good, resume_point
from calofm.train.ema import EMA, power_decay
from calofm.train.schedule import wsd


class Objective(Protocol):
    def loss(self, net: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor: ...

    def after_step(self, model: nn.Module, step: int) -> None: ...

    def checkpoint_modules(self) -> list[nn.Module]:
        """Modules besides the trained one whose weights a checkpoint must hold (e.g. a target network)."""
        ...


class NonFiniteError(RuntimeError):
    """Training stopped: too many steps with a non-finite loss or gradient."""


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """On a machine with no GPU, Accelerate must be told cpu=True, or torchrun ranks each run alone."""
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision,
                       gradient_accumulation_steps=cfg.train.grad_accum,
                       log_with=cfg.train.log_with or None, project_dir=cfg.output_dir)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[0] if found else None


def finished_model(cfg: RunConfig, say=print) -> Path | None:
    """`<output_dir>/model` of a run that already ended (its newest intact checkpoint at `train.steps`, its model
    saved, last and atomically), said so; else None: `--resume` returns it instead of redoing the work after
    training."""
    model, ckpt = Path(cfg.output_dir) / "model", last_good(cfg.output_dir)
    if ckpt is None or checkpoint.step_of(ckpt) != cfg.train.steps or not (model / "config.json").exists():
        return None
    say(f"{model}: this run already finished its {cfg.train.steps} steps; nothing to resume")
    return model


def _noise_generator(device: torch.device, *key: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def _trim_log(path: Path, step: int) -> None:
    """Drop the metrics rows a killed run wrote after its last checkpoint: the resumed run writes them again."""
    if path.exists():
        rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        atomic_write_text(path, "".join(r + "\n" for r in rows))


def train(cfg: RunConfig, model: nn.Module, objective: Objective, files: dict[str, Path], normalizer: Normalizer,
          *, accelerator: Accelerator, resume: bool = False, use_ema: bool = True, desc: str = "train") -> nn.Module:
    """Train `model` in place and return the weights to ship (the EMA when `use_ema`).

    A step whose loss or gradient is not finite is skipped (no update, a warning); after
    `train.max_nonfinite_steps` of them the run stops with `NonFiniteError`. No non-finite weights are saved."""
    # the precision Accelerate resolved (the recipe's, else its own config's) is what the saved config records
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=accelerator.mixed_precision))
    t, out = cfg.train, Path(cfg.output_dir)
    existing = latest_checkpoint(out)
    if existing is not None and not resume:
        raise ValueError(f"{out}: already holds checkpoint {existing.name}; pass --resume to continue it, "
                         "or choose another output_dir")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    set_seed(t.seed)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: wsd(s, t.steps, t.warmup_frac, t.decay_frac))
    ema = EMA(model, power_decay(t.ema_max, t.ema_power)) if use_ema else None
    kept = ([ema.model] if ema else []) + objective.checkpoint_modules()
    step, skipped = 0, 0
    net, opt = accelerator.prepare(model, opt)
    ckpt = resume_point(out, say=accelerator.print) if resume else None
    if ckpt is not None:
        state = checkpoint.load(accelerator, ckpt, kept)
        if state["world_size"] != accelerator.num_processes:
            msg = (f"{ckpt} was written by {state['world_size']} process(es), this run has "
                   f"{accelerator.num_processes}: the data order changes, so the resumed run is no longer bit-exact")
            if not t.allow_world_size_change:
                raise ValueError(msg + "; set train.allow_world_size_change=true to continue anyway")
            accelerator.print(f"warning: {msg}")
        step, skipped = state["step"], state["skipped"]
        sched.load_state_dict(state["scheduler"])
        accelerator.print(f"resumed from {ckpt} at step {step}")
    if t.log_with:
        accelerator.init_trackers(out.name, config={"lr": t.lr, "batch_size": t.batch_size, "steps": t.steps})

    stream = ShowerStream(files, model.slot_map, model.n_slots, normalizer, t.batch_size, seed=t.seed,
                          rank=accelerator.process_index, world_size=accelerator.num_processes,
                          start_batch=step * t.grad_accum, chunk_size=cfg.data.chunk_size,
                          max_per_detector=cfg.data.max_per_detector, particle_map=model.particle_map,
                          n_particle_slots=model.n_particle_slots)
    batches = iter(DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers))
    log = None
    if accelerator.is_main_process:
        _trim_log(out / "metrics.jsonl", step)
        log = open(out / "metrics.jsonl", "a")
    names = {slot: name for name, slot in model.slot_map.items()}
    bar = progress(accelerator.is_main_process, total=t.steps, initial=step, desc=desc, dynamic_ncols=True)
    tic, seen = time.perf_counter(), 0
    net.train()
    while step < t.steps:
        finite, detectors = True, set()
        for micro in range(t.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
            detectors.update(names.get(int(s), f"slot {int(s)}") for s in batch["slot"].unique())
            g = _noise_generator(accelerator.device, t.seed, accelerator.process_index, step, micro)
            with accelerator.accumulate(net):
                with accelerator.autocast():
                    loss = objective.loss(net, batch, g)
                finite &= bool(torch.isfinite(loss.detach()))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else math.inf)
                    # fp16: the grad scaler already skips steps with inf gradients while it calibrates
                    finite &= accelerator.mixed_precision == "fp16" or bool(torch.isfinite(norm))
                    finite = bool(accelerator.reduce(torch.tensor(float(finite), device=accelerator.device),
                                                     "min"))  # every process skips, or none
                    if finite:
                        opt.step()
                opt.zero_grad(set_to_none=True)
            seen += batch["x"].shape[0] * accelerator.num_processes
        sched.step()
        step += 1
        unwrapped = accelerator.unwrap_model(net)
        if finite:
            if ema is not None:
                ema.update(unwrapped, step)
            objective.after_step(unwrapped, step)
        else:
            skipped += 1
            where = f"step {step}: non-finite loss or gradient (detectors in the batch: {', '.join(sorted(detectors))})"
            if skipped > t.max_nonfinite_steps:  # only now hash the checkpoints, to name the last good one
                raise NonFiniteError(f"{where}; {skipped} such steps, more than train.max_nonfinite_steps="
                                     f"{t.max_nonfinite_steps}. Last good checkpoint: {last_good(out) or 'none'}. Lower "
                                     "train.lr or set train.grad_clip, then run again with --resume")
            accelerator.print(f"warning: {where}; step skipped ({skipped} of at most {t.max_nonfinite_steps})")

        if step % t.log_every == 0 or step == t.steps:
            rate = seen / (time.perf_counter() - tic)
            row = {"step": step, "loss": accelerator.gather(loss.detach()).mean().item(),
                   "lr": sched.get_last_lr()[0], "showers_per_s": rate, "processes": accelerator.num_processes,
                   "skipped": skipped, "mixed_precision": accelerator.mixed_precision}
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", showers_s=f"{rate:.0f}")
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if t.log_with:
                accelerator.log(row, step=step)
            tic, seen = time.perf_counter(), 0
        bar.update(1)
        if step % t.checkpoint_every == 0 or step == t.steps:
            bad = checkpoint.nonfinite([unwrapped, *kept])
            if bad is not None:
                raise NonFiniteError(f"step {step}: weight {bad} is not finite; not writing a checkpoint. Last good "
                                     f"checkpoint: {last_good(out) or 'none'}")
            checkpoint.save(accelerator, out, {"step": step, "skipped": skipped,
                                               "world_size": accelerator.num_processes,
                                               "scheduler": sched.state_dict()}, kept, t.keep_checkpoints)
    bar.close()
    del batches  # closes the stream's files while the interpreter is still whole
    if log is not None:
        log.close()
    if t.log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return ema.model if ema is not None else accelerator.unwrap_model(net)


def save_model(model: nn.Module, path: str | Path) -> Path:
    """A model folder (config.json + model.safetensors + card), written atomically; never non-finite weights."""
    bad = checkpoint.nonfinite([model])
    if bad is not None:
        raise NonFiniteError(f"weight {bad} is not finite; not saving the model to {path}")
    from calofm.hub import write_model_card

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        write_model_card(tmp, model=model)  # calofm's card over the mixin's generic one
    return Path(path)
