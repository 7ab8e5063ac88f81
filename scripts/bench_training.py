"""Training throughput (showers/s) of the EDM objective for each preset on this machine's CPU cores.

Times full optimiser steps (forward, backward, AdamW) of the real loss on random normalised showers, after a
warm-up, and appends the figures to benchmarks/RESULTS.md.

    python scripts/bench_training.py [--presets tiny paper] [--batch 64] [--steps 5]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from calofm.diffusion import denoiser
from calofm.diffusion.edm import EDMParams, edm_loss
from calofm.models.dit import CaloDiT


def throughput(preset: str, batch: int, steps: int) -> float:
    model = CaloDiT.from_preset(preset)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 9, 16, 45) * 0.5
    cond = torch.rand(batch, 4 + model.n_slots)
    g = torch.Generator().manual_seed(0)
    D = denoiser(model, EDMParams(), "edm")

    def step():
        loss = edm_loss(D, x, cond, EDMParams(), g)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - tic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "paper"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    rows = []
    for preset in args.presets:
        rate = throughput(preset, args.batch, args.steps)
        rows.append(f"{preset} {rate:,.0f}")
        print(f"{preset:6s} batch {args.batch}: {rate:8.1f} showers/s ({threads} threads)")
    line = (f"- {datetime.datetime.now():%Y-%m-%d %H:%M} bench_training (EDM step incl. AdamW, batch {args.batch}, "
            f"{threads} threads, {platform.processor() or platform.machine()}): showers/s " + ", ".join(rows))
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"
    with results.open("a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
