"""The one Accelerate training loop behind pretrain, distill and adapt.

An `Objective` supplies the loss (EDM, consistency distillation, ...); the loop owns everything else: AdamW, the
WSD schedule, the weight EMA, clipping, accumulation, mixed precision, checkpoints with exact resume, the progress
bar and the metrics log. Noise is drawn from a generator seeded by (seed, rank, step, micro-step), and the data
stream is a pure function of its position, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
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
from calofm.io import atomic_dir
from calofm.progress import progress
from calofm.train.ema import EMA, power_decay
from calofm.train.schedule import wsd


class Objective(Protocol):
    def loss(self, net: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor: ...

    def after_step(self, model: nn.Module, step: int) -> None: ...

    def checkpoint_objects(self) -> list: ...


@dataclass
class TrainState:
    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """On a machine with no GPU, Accelerate must be told cpu=True, or torchrun ranks each run alone (DESIGN 10)."""
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision,
                       gradient_accumulation_steps=cfg.train.grad_accum,
                       log_with=cfg.train.log_with or None, project_dir=cfg.output_dir)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = sorted((Path(output_dir) / "checkpoints").glob("step_*"))
    return ckpts[-1] if ckpts else None


def _noise_generator(device: torch.device, *key: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def train(cfg: RunConfig, model: nn.Module, objective: Objective, files: dict[str, Path], normalizer: Normalizer,
          *, accelerator: Accelerator, resume: bool = False, use_ema: bool = True, desc: str = "train") -> nn.Module:
    """Train `model` in place and return the weights to ship (the EMA when `use_ema`)."""
    t, out = cfg.train, Path(cfg.output_dir)
    existing = latest_checkpoint(out)
    if existing is not None and not resume:
        raise ValueError(f"{out}: already holds checkpoint {existing.name}; pass --resume to continue it, "
                         "or choose another output_dir")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    set_seed(t.seed)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: wsd(s, t.steps, t.warmup_frac, t.decay_frac))
    ema = EMA(model, power_decay(t.ema_max, t.ema_power)) if use_ema else None
    state = TrainState()
    net, opt = accelerator.prepare(model, opt)
    accelerator.register_for_checkpointing(sched, state, *([ema] if ema else []), *objective.checkpoint_objects())
    if resume and existing is not None:
        accelerator.load_state(str(existing))
        accelerator.print(f"resumed from {existing} at step {state.step}")
    if t.log_with:
        accelerator.init_trackers(out.name, config={"lr": t.lr, "batch_size": t.batch_size, "steps": t.steps})

    stream = ShowerStream(files, model.slot_map, model.n_slots, normalizer, t.batch_size, seed=t.seed,
                          rank=accelerator.process_index, world_size=accelerator.num_processes,
                          start_batch=state.step * t.grad_accum, chunk_size=cfg.data.chunk_size,
                          max_per_detector=cfg.data.max_per_detector)
    batches = iter(DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers))
    log = open(out / "metrics.jsonl", "a") if accelerator.is_main_process else None
    bar = progress(accelerator.is_main_process, total=t.steps, initial=state.step, desc=desc, dynamic_ncols=True)
    tic, seen = time.perf_counter(), 0
    net.train()
    while state.step < t.steps:
        for micro in range(t.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
            g = _noise_generator(accelerator.device, t.seed, accelerator.process_index, state.step, micro)
            with accelerator.accumulate(net):
                with accelerator.autocast():
                    loss = objective.loss(net, batch, g)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.grad_clip > 0:
                    accelerator.clip_grad_norm_(params, t.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            seen += batch["x"].shape[0] * accelerator.num_processes
        sched.step()
        state.step += 1
        unwrapped = accelerator.unwrap_model(net)
        if ema is not None:
            ema.update(unwrapped, state.step)
        objective.after_step(unwrapped, state.step)

        if state.step % t.log_every == 0 or state.step == t.steps:
            rate = seen / (time.perf_counter() - tic)
            row = {"step": state.step, "loss": accelerator.gather(loss.detach()).mean().item(),
                   "lr": sched.get_last_lr()[0], "showers_per_s": rate, "processes": accelerator.num_processes}
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", showers_s=f"{rate:.0f}")
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if t.log_with:
                accelerator.log(row, step=state.step)
            tic, seen = time.perf_counter(), 0
        bar.update(1)
        if state.step % t.checkpoint_every == 0 or state.step == t.steps:
            save_checkpoint(accelerator, out, state.step, t.keep_checkpoints)
    bar.close()
    del batches  # closes the stream's files while the interpreter is still whole
    if log is not None:
        log.close()
    if t.log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return ema.model if ema is not None else accelerator.unwrap_model(net)


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, keep: int) -> None:
    """All processes write into one temporary folder; the main process renames it into place, then prunes."""
    root = out / "checkpoints"
    tmp = root / f".tmp-step_{step:07d}"
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = root / f"step_{step:07d}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def save_model(model: nn.Module, path: str | Path) -> Path:
    """A model folder (config.json + model.safetensors + card), written atomically."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
    return Path(path)
