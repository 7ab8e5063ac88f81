"""Synthetic-shower throughput on ONE core at mixed energies over all five detectors (target: >= 5,000/s).

The headline is showers per second of this process's CPU time (numpy held to one thread): the cost on one core,
which a busy shared machine does not distort the way it distorts the wall clock (printed too, with the load
average). Appends one line to benchmarks/RESULTS.md. Usage: python scripts/bench_synthetic.py [--n 4096]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: one core

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from calofm.data.synthetic import GENERATOR_VERSION, generate  # noqa: E402
from calofm.geometry import DETECTORS  # noqa: E402
from calofm.io import atomic_write_text  # noqa: E402

TARGET = 5000.0
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown CPU")


def append_result(line: str) -> None:
    """Append `line` to RESULTS.md, creating it with a header that names the machine."""
    text = RESULTS.read_text() if RESULTS.exists() else (
        f"# Benchmarks\n\nMachine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}.\n\n")
    atomic_write_text(RESULTS, text + line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="showers per detector per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per detector")
    args = ap.parse_args()

    generate("par04_siw", 256, seed=0)  # warm-up: imports, allocator
    wall, cpu = {}, {}
    for i, name in enumerate(DETECTORS):
        runs = []
        for r in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            generate(name, args.n, seed=1000 * i + r)  # conditions uniform over the detector's ranges
            runs.append((time.perf_counter() - t0, time.process_time() - c0))
        wall[name], cpu[name] = min(w for w, _ in runs), min(c for _, c in runs)
        print(f"{name:14s} {args.n / wall[name]:9,.0f} showers/s wall  {args.n / cpu[name]:9,.0f} showers/s CPU")
    total = args.n * len(DETECTORS)
    rate_cpu, rate_wall = total / sum(cpu.values()), total / sum(wall.values())
    load = os.getloadavg()[0]
    verdict = "meets" if rate_cpu >= TARGET else "BELOW"
    print(f"mixed          {rate_wall:9,.0f} showers/s wall  {rate_cpu:9,.0f} showers/s CPU  "
          f"(1 core; {verdict} the {TARGET:,.0f}/s target; load average {load:.1f})")
    per = ", ".join(f"{name} {args.n / cpu[name]:,.0f}" for name in DETECTORS)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    append_result(f"- {stamp} bench_synthetic (generator v{GENERATOR_VERSION}, 1 core, {args.n} showers x "
                  f"{len(DETECTORS)} detectors, uniform E): {rate_cpu:,.0f} showers/s of CPU time "
                  f"({rate_wall:,.0f}/s wall clock at load average {load:.1f}); per detector (CPU): {per}")

if __name__ == "__main__":
    main()
