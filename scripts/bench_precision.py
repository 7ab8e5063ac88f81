"""Fidelity and cost of `calofm generate --precision fp32|bf16|int8 --backend torch|onnxruntime`, measured rather
than assumed.

For each backend (--backend, default torch), precision it supports and detector: the showers of one model
generated at the conditions of the first N held-out showers (same seed, so the same noise), scored by
`calofm.evaluate.fidelity` against them; and the cost per shower (CPU time of this process and wall time, the
median of --repeats runs over one batch; the onnxruntime graph is exported once, before the timing). Writes OUT.md
and OUT.json.

    calofm data synth --all -n 3000 --seed 2 --out data/test
    python scripts/bench_precision.py --model calodit-tiny-standin-cd --reference data/test --out benchmarks/precision
    python scripts/bench_precision.py ... --backend torch onnxruntime   # the variants side by side
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="calodit-tiny-standin-cd")
    ap.add_argument("--reference", required=True, help="folder of held-out <detector>.h5 files")
    ap.add_argument("--detectors", nargs="+", default=["odd", "par04_siw"])
    ap.add_argument("--n", type=int, default=2000, help="held-out showers per detector (the first N)")
    ap.add_argument("--batch", type=int, default=64, help="batch of the timing runs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="OUT.md and OUT.json")
    ap.add_argument("--backend", nargs="+", default=["torch"], choices=["torch", "onnxruntime"],
                    help="backends to measure (onnxruntime: fp32 and int8)")
    ap.add_argument("--eval-dir", help="keep the evaluation reports here (default: a temporary folder)")
    args = ap.parse_args()

    from calofm.data.formats import open_showers
    from calofm.evaluate.fidelity import NOTE, fidelity, table
    from calofm.generate import BACKEND_PRECISIONS, generate_showers, with_backend
    from calofm.hub import load_model

    torch.set_num_threads(args.threads)
    eval_dir = args.eval_dir or tempfile.mkdtemp(prefix="bench-precision-")
    out = Path(args.out)
    base = load_model(args.model)
    results = {}
    variants = [(b, p) for b in args.backend for p in BACKEND_PRECISIONS[b]]
    for backend, precision in variants:
        name = precision if args.backend == ["torch"] else f"{backend} {precision}"
        model = with_backend(base, backend, precision, detector=args.detectors[0])  # quantised or exported once
        summary, cost = {}, {}
        for det in args.detectors:
            with open_showers(Path(args.reference) / f"{det}.h5") as f:
                ref = f.read(0, args.n)
            cpu, wall = [], []
            b = slice(0, args.batch)
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                generate_showers(model, det, ref.energy[b], ref.theta[b], ref.phi[b], seed=1, precision=precision,
                                 backend=backend)
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            cost[det] = {"cpu_ms": 1e3 * statistics.median(cpu) / args.batch,
                         "wall_ms": 1e3 * statistics.median(wall) / args.batch,
                         "wall_ms_min": 1e3 * min(wall) / args.batch}
            gen = generate_showers(model, det, ref.energy, ref.theta, ref.phi, seed=1, precision=precision,
                                   backend=backend)
            summary[det] = fidelity(ref, gen, Path(eval_dir) / name.replace(" ", "-") / det, det)
            print(name, det, f"FPD x1e3 {summary[det]['fpd']['value'] * 1e3:.3g}", cost[det], flush=True)
        results[name] = {"summary": summary, "cost": cost}

    lines = [f"# `calofm generate --precision` (model `{args.model}`)", "",
             f"Command: `python {' '.join(sys.argv)}`; {args.threads} torch (and onnxruntime) thread(s), load "
             "average "
             f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end. Same noise (seed 1) at every precision. "
             f"Cost: median of {args.repeats} runs of one batch of {args.batch} (CPU time of this process beside "
             "wall time; the machine is shared, so compare ratios within this table).", ""]
    for precision, r in results.items():
        lines += [f"## {precision}", "", table(r["summary"]),
                  "| detector | CPU ms / shower | wall ms / shower (median, min) |", "|---|---|---|",
                  *(f"| {d} | {c['cpu_ms']:.2f} | {c['wall_ms']:.2f}, {c['wall_ms_min']:.2f} |"
                    for d, c in r["cost"].items()), ""]
    lines += [NOTE, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
