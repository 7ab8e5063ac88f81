"""Sampling speed: EDM (32 Heun steps = 63 network evaluations) vs the distilled consistency model (1 step).

Latency per shower at batch 1 with one thread (the paper's CPU setting: EDM 6.3 s, CD 101 ms), measured end to
end through `calofm.diffusion.sample`; then throughput at larger batches with --threads (default 1). Beside them,
in the same process: the one-thread matmul peak (GFLOP/s of a 1024^3 fp32 matmul) and the CD network's FLOPs
(`torch.utils.flop_counter`), so the batch-1 CD evaluation is reported as a fraction of what this CPU can do, and
the CPU time per shower at each batch relative to batch 1 on one thread (it should not grow with the batch). Every figure
is the median of --repeats runs, with the minimum wall time and the median CPU time of this process beside it
(on a shared machine CPU time is what the work costs; wall time adds the waiting), and the load average is
recorded. Writes --out afresh (default benchmarks/sampling.md). At large
batches a full EDM run of the paper preset takes tens of minutes on a small CPU, so EDM throughput there is 63 x
one timed network evaluation (the sampler's other work is a few element-wise ops; the batch-1 row checks this estimate
against the measured end-to-end time). Timing needs no trained weights: the models are untrained (random
initialisation), which costs exactly what trained weights cost.

    python scripts/bench_sampling.py                      # paper preset, batches 16 64 256, one thread
    python scripts/bench_sampling.py --preset tiny --batches 16 64
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from calofm.data.transforms import encode_conditions
from calofm.diffusion import denoiser, sample
from calofm.diffusion.edm import EDMParams
from calofm.geometry import SHAPE
from calofm.io import atomic_write_text
from calofm.memory import keep_freed_memory
from calofm.models.dit import CaloDiT

EDM_STEPS = 32
EDM_EVALS = 2 * EDM_STEPS - 1


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.machine())


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"


def timed(device: torch.device, repeats: int, fn, *args, **kwargs) -> dict:
    """Seconds per call of `fn(*args, **kwargs)` after one warm-up call: median and minimum wall time, median CPU
    time of this process."""
    fn(*args, **kwargs)
    wall, cpu = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic, cpu_tic = time.perf_counter(), time.process_time()
        fn(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - tic)
        cpu.append(time.process_time() - cpu_tic)
    return {"wall": statistics.median(wall), "wall_min": min(wall), "cpu": statistics.median(cpu)}


def inputs(model: CaloDiT, batch: int, device: torch.device):
    """Noise and the conditions of a 50 GeV shower at normal incidence in slot 0 (`encode_conditions`)."""
    g = torch.Generator(device).manual_seed(0)
    noise = torch.randn(batch, *SHAPE, generator=g, device=device)
    cond = encode_conditions(np.full(batch, 5e4), np.full(batch, 1.57), np.full(batch, 0.3), 0, model.n_slots)
    return noise, cond.to(device)


def matmul_peak(repeats: int) -> float:
    """One-thread fp32 matmul GFLOP/s (1024^3, median of `repeats` by CPU time): the ceiling for dense layers."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / timed(torch.device("cpu"), repeats, torch.mm, a, b)["cpu"] / 1e9


def network_flops(model: CaloDiT, noise: torch.Tensor, cond: torch.Tensor) -> tuple[int, int]:
    """FLOPs of one network evaluation: torch's flop counter (matmuls and convolutions), and the attention's two
    batched matmuls (Q K^T and A V: 4 n^2 width a block for n tokens), which the counter leaves out for the CPU
    flash-attention kernel (it counts 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        sample(model, noise, cond, steps=1)
    tokens = math.prod(model.grid)
    return counter.get_total_flops(), 4 * tokens**2 * model.width * model.depth * noise.shape[0]


def variants(preset: str, repeats: int) -> dict:
    """CPU time of one CD shower at batch 1, one thread, end to end through `calofm.generate.generate_showers`
    (deposit net, network, inverse preprocessing) for every backend and precision: a `preset` network with
    random weights under the shipped model's normaliser and slot map, so the graph is what a user runs."""
    from calofm.generate import BACKEND_PRECISIONS, generate_showers, with_backend
    from calofm.hub import load_model

    shipped = load_model("calodit-tiny-standin-cd")
    model = CaloDiT.from_preset(preset, objective="cd", n_slots=shipped.n_slots, slot_map=shipped.slot_map,
                                normalizer=shipped.normalizer, sampler=shipped.sampler).eval()
    out = {}
    for backend, precision in ((b, p) for b, ps in BACKEND_PRECISIONS.items() for p in ps):
        run = with_backend(model, backend, precision)
        out[f"{backend} {precision}"] = timed(torch.device("cpu"), repeats, generate_showers, run, "odd", [5e4],
                                              [1.57], [0.3], batch_size=1, precision=precision, backend=backend)
    return out


@torch.inference_mode()
def run(preset: str, batches: list[int], repeats: int, device: torch.device, threads: int) -> dict:
    keep_freed_memory()  # calofm generate's malloc settings, so the network is timed as it runs there
    torch.manual_seed(0)
    edm = CaloDiT.from_preset(preset, objective="edm").to(device).eval()
    cd = CaloDiT.from_preset(preset, objective="cd").to(device).eval()
    cd.load_state_dict(edm.state_dict())
    D = denoiser(edm, EDMParams())

    torch.set_num_threads(1)
    noise, cond = inputs(edm, 1, device)
    one = timed(device, repeats, D, noise, torch.ones(1, device=device), cond)
    latency = {
        "edm": timed(device, max(1, repeats // 4), sample, edm, noise, cond, steps=EDM_STEPS),
        "edm_est": {k: EDM_EVALS * v for k, v in one.items()},
        "cd": timed(device, repeats, sample, cd, noise, cond, steps=1),
    }
    efficiency = {}
    if device.type == "cpu":  # one thread: the per-shower cost against the batch, and against the matmul peak
        flops, attention = network_flops(cd, noise, cond)
        efficiency = {"peak": matmul_peak(repeats), "flops": flops, "attention": attention, "per_shower": []}
        for b in batches:
            t = timed(device, max(1, repeats // 4), sample, cd, *inputs(edm, b, device), steps=1)
            efficiency["per_shower"].append({"batch": b, "cpu": t["cpu"] / b})
        efficiency["variants"] = variants(preset, repeats)
    torch.set_num_threads(threads)
    throughput = []
    for b in batches:
        noise, cond = inputs(edm, b, device)
        sigma = torch.ones(b, device=device)
        t_eval = timed(device, max(1, repeats // 4), D, noise, sigma, cond)
        t_cd = timed(device, max(1, repeats // 4), sample, cd, noise, cond, steps=1)
        throughput.append({"batch": b, "edm": b / (EDM_EVALS * t_eval["wall"]), "cd": b / t_cd["wall"],
                           "edm_cpu": b / (EDM_EVALS * t_eval["cpu"]), "cd_cpu": b / t_cd["cpu"]})
    return {"latency": latency, "throughput": throughput, "threads": threads, "efficiency": efficiency,
            "params": sum(p.numel() for p in edm.parameters())}


def report(r: dict, preset: str, device: torch.device) -> str:
    lat = r["latency"]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = "\n".join(f"| {t['batch']} | {t['edm']:.2f} ({t['edm_cpu']:.2f}) | {t['cd']:.1f} ({t['cd_cpu']:.1f}) | "
                     f"{t['cd'] / t['edm']:.0f}x |" for t in r["throughput"])

    def ms(t: dict) -> str:
        return f"{t['wall'] * 1e3:.1f} | {t['wall_min'] * 1e3:.1f} | {t['cpu'] * 1e3:.1f}"

    return (
        f"# Sampling speed: EDM 32 Heun steps vs CD 1 step ({datetime.date.today()})\n\n"
        f"`python {' '.join(sys.argv)}`"
        f" on {machine(device)}; load average {load} while it ran. Preset `{preset}` "
        f"({r['params'] / 1e6:.2f} M parameters) with untrained weights (speed does not depend on their values).\n\n"
        "Latency per shower, batch 1, one thread (ms: median wall | minimum wall | median CPU):\n\n"
        "| sampler | network evaluations | wall | min wall | CPU |\n|---|---|---|---|---|\n"
        f"| EDM, 32 Heun steps | {EDM_EVALS} | {ms(lat['edm'])} |\n"
        f"| EDM, {EDM_EVALS} x one timed evaluation (check of the estimate below) | {EDM_EVALS} | "
        f"{ms(lat['edm_est'])} |\n"
        f"| CD, 1 step | 1 | {ms(lat['cd'])} |\n\n"
        f"CD is **{lat['edm']['cpu'] / lat['cd']['cpu']:.0f}x** faster than EDM at batch 1 in CPU time "
        f"({lat['edm']['wall'] / lat['cd']['wall']:.0f}x in wall time; paper, one CPU thread: 6.3 s vs 101 ms, "
        "62x).\n\n"
        f"Throughput, {r['threads']} torch thread(s) (EDM: {EDM_EVALS} x one timed evaluation at that batch; showers "
        "per second of wall time, of CPU time in brackets):\n\n"
        "| batch | EDM showers/s | CD showers/s | CD / EDM |\n|---|---|---|---|\n"
        f"{rows}\n" + efficiency_report(r["efficiency"], lat["cd"]["cpu"]))


def efficiency_report(e: dict, cd_cpu: float) -> str:
    """The batch-1 CD evaluation against the one-thread matmul peak, and CPU time per shower against the batch."""
    if not e:
        return ""
    rate, counted = (e["flops"] + e["attention"]) / cd_cpu / 1e9, e["flops"] / cd_cpu / 1e9
    rows = "\n".join(f"| {t['batch']} | {t['cpu'] * 1e3:.1f} | {t['cpu'] / cd_cpu:.2f} |" for t in e["per_shower"])
    return (
        f"\nOne thread, CPU time: one CD evaluation is {e['flops'] / 1e9:.2f} GFLOP by torch's flop counter (matmuls "
        f"and convolutions) + {e['attention'] / 1e9:.2f} GFLOP in the attention's Q K^T and A V (4 n^2 width a "
        f"block; the counter gives the CPU flash-attention kernel 0), {cd_cpu * 1e3:.1f} ms at batch 1 = "
        f"{rate:.1f} GFLOP/s, **{rate / e['peak']:.0%}** of the {e['peak']:.1f} GFLOP/s one-thread matmul peak "
        f"measured in the same run (1024^3 fp32 `torch.mm`); {counted / e['peak']:.0%} counting the counter's "
        "FLOPs only.\n\n"
        "| batch | CD CPU ms / shower | relative to batch 1 |\n|---|---|---|\n"
        f"| 1 | {cd_cpu * 1e3:.1f} | 1.00 |\n{rows}\n" + variants_report(e["variants"]))


def variants_report(v: dict) -> str:
    base = v["torch fp32"]["cpu"]
    rows = "\n".join(f"| {k} | {t['cpu'] * 1e3:.1f} | {t['wall'] * 1e3:.1f} | {base / t['cpu']:.2f}x |"
                     for k, t in v.items())
    return ("\nOne CD shower end to end (`generate_showers`, batch 1, one thread; deposit net, network and inverse "
            "preprocessing) per backend and precision, in this run (fidelity of each on the trained model: "
            "benchmarks/precision.md):\n\n| backend precision | CPU ms | wall ms | speed-up vs torch fp32 (CPU) |\n"
            f"|---|---|---|---|\n{rows}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper", help="model preset (paper | small | tiny)")
    ap.add_argument("--batches", type=int, nargs="*", default=[16, 64, 256], help="batch sizes for throughput")
    ap.add_argument("--repeats", type=int, default=8, help="timed repeats (median); EDM runs use a quarter")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the throughput runs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/sampling.md"), help="markdown file to write")
    args = ap.parse_args()
    device = torch.device(args.device)
    r = run(args.preset, args.batches, args.repeats, device, args.threads)
    text = report(r, args.preset, device)
    atomic_write_text(args.out, text)
    print(text)
    speedup = r["latency"]["edm"]["cpu"] / r["latency"]["cd"]["cpu"]
    if speedup < 40:
        raise SystemExit(f"CD is only {speedup:.1f}x faster than EDM at batch 1 in CPU time (acceptance: >= 40x)")


if __name__ == "__main__":
    main()
