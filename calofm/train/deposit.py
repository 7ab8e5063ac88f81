"""The total-deposit net's own fit, after the shape network's training (pretraining and adaptation's EDM stage).

A model with normaliser unit `deposit` draws each shower's E_dep with a small MLP (`DepositNet`) before the shape.
Trained only beside the transformer, on its batches of 64 showers, that net left the energy resolution up to 1.5x
the data's in some energy bins (benchmarks/fidelity.md). It is one number a shower, so a step on 1,024 of them costs
next to nothing: after the transformer, the (EMA) net goes on alone, on large batches drawn from every training
shower's (conditions, encoded E_dep) held in memory, with its own cosine-decayed learning rate and EMA. The
transformer never sees a drawn deposit in training (it is conditioned on the true one), so it is untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from calofm.config import DepositConfig, RunConfig
from calofm.data.loader import ShowerStream, even_counts
from calofm.data.transforms import Normalizer
from calofm.diffusion import DEPOSIT_PARAMS, deposit_denoiser
from calofm.diffusion.edm import edm_loss
from calofm.progress import progress
from calofm.train.ema import EMA, power_decay


def fit_deposit(model: nn.Module, table: dict[str, torch.Tensor], cfg: DepositConfig, *, seed: int = 0,
                show: bool = True) -> None:
    """Go on training `model.deposit_net` in place on `table` ({cond, deposit, slot}, `ShowerStream.deposit_table`)
    for `cfg.epochs` passes in batches of `cfg.batch_size`, each split evenly over the detectors as in training; the net
    ends with its EMA weights. Parameters outside the net's forward (a peft wrapper's frozen original) stay as they
    are. Deterministic given `seed`."""
    net, steps = model.deposit_net, cfg.steps(len(table["deposit"]))
    if net is None or steps == 0:
        return
    device = next(net.parameters()).device
    table = {k: v.to(device) for k, v in table.items()}
    slots = table["slot"].unique()
    rows = [torch.nonzero(table["slot"] == s).view(-1) for s in slots]
    params = list(net.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    ema = EMA(net, power_decay(cfg.ema_max, cfg.ema_power))
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g, g_noise = torch.Generator().manual_seed(seed), torch.Generator(device).manual_seed(seed + 1)
    bar = progress(show, total=steps, desc="deposit net", dynamic_ncols=True)
    D = deposit_denoiser(model)
    for step in range(steps):
        idx = torch.cat([r[torch.randint(len(r), (n,), generator=g).to(device)]
                         for r, n in zip(rows, even_counts(cfg.batch_size, len(rows), step))])
        loss = edm_loss(D, table["deposit"][idx], table["cond"][idx], DEPOSIT_PARAMS, g_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update(net, step + 1)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
    bar.close()
    with torch.no_grad():
        for p, a, flag in zip(params, ema.model.parameters(), flags):
            p.copy_(a)
            p.requires_grad_(flag)


def refit_deposit(model: nn.Module, files: dict[str, Path], normalizer: Normalizer, cfg: RunConfig,
                  show: bool = True) -> None:
    """`fit_deposit` on the showers a training stage read (`files`, at most `cfg.data.max_per_detector` each), with
    `cfg.deposit`; nothing for a model without a deposit net. Every process runs the same fit (no communication)."""
    if model.deposit_net is None or cfg.deposit.epochs == 0:
        return
    stream = ShowerStream(files, model.slot_map, model.n_slots, normalizer, cfg.deposit.batch_size,
                          chunk_size=cfg.data.chunk_size, max_per_detector=cfg.data.max_per_detector,
                          particle_map=model.particle_map, n_particle_slots=model.n_particle_slots)
    fit_deposit(model, stream.deposit_table(), cfg.deposit, seed=cfg.train.seed, show=show)
