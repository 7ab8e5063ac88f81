"""`calofm generate` as a user runs it: wall, user and system time, peak memory and showers/s of CPU time, per
batch size and number of showers, each in a fresh process (its own rusage, `os.wait4`).

System time is the allocator's page faults (fresh pages for each batch's buffers): it should stay well under 10 %
of user time, and the peak RSS should not grow with the number of showers (generation streams to the file).

    python scripts/bench_generate.py --model calodit-tiny-standin-cd --n 2000 20000 --batches 16 64 256 \
        --out benchmarks/generation.md
    python scripts/bench_generate.py ... --mallopt both     # also without calofm's malloc settings

Writes --out afresh with the command, the load average and one row per run (median of --repeats).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(model: str, detector: str, n: int, batch: int, threads: int, mallopt: bool) -> dict:
    """One `calofm generate` in a child process; its own rusage (CPU times, peak RSS, faults: `os.wait4`) and wall
    time."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads),
               "CALOFM_MALLOPT": "1" if mallopt else "0"}
        cmd = [sys.executable, "-m", "calofm.cli", "generate", model, "--detector", detector, "-n", str(n),
               "--batch-size", str(batch), "--threads", str(threads), "--seed", "1", "--out", f"{tmp}/g.h5"]
        tic = time.perf_counter()
        with open(f"{tmp}/log", "w") as log:
            child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - tic
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{' '.join(cmd)} failed:\n{Path(tmp, 'log').read_text()[-2000:]}")
        from calofm.data.formats import open_showers

        with open_showers(Path(tmp) / "g.h5") as f:  # a valid, complete file
            assert len(f) == n, (len(f), n)
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "faults": usage.ru_minflt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="calodit-tiny-standin-cd")
    ap.add_argument("--detector", default="odd")
    ap.add_argument("--n", type=int, nargs="+", default=[2000])
    ap.add_argument("--batches", type=int, nargs="+", default=[64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--mallopt", choices=("on", "off", "both"), default="on",
                    help="calofm's malloc settings (calofm.memory.keep_freed_memory), or glibc's defaults")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print only)")
    args = ap.parse_args()

    modes = {"on": [True], "off": [False], "both": [False, True]}[args.mallopt]
    rows = []
    for n in args.n:
        for batch in args.batches:
            for mallopt in modes:
                runs = [run_once(args.model, args.detector, n, batch, args.threads, mallopt)
                        for _ in range(args.repeats)]
                r = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
                r.update(n=n, batch=batch, mallopt=mallopt)
                rows.append(r)
                print(f"n {n} batch {batch} mallopt {mallopt}: wall {r['wall']:.1f} s user {r['user']:.1f} s "
                      f"sys {r['sys']:.1f} s ({r['sys'] / r['user']:.0%}) peak RSS {r['rss_mb']:.0f} MB", flush=True)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    table = "\n".join(
        f"| {r['n']:,} | {r['batch']} | {'calofm' if r['mallopt'] else 'glibc default'} | {r['wall']:.1f} | "
        f"{r['user']:.1f} | {r['sys']:.1f} | {r['sys'] / r['user']:.0%} | {r['n'] / (r['user'] + r['sys']):.0f} | "
        f"{r['rss_mb']:.0f} | {r['faults']:,} |" for r in rows)
    text = (f"# `calofm generate`: time, system time and memory\n\n`python {' '.join(sys.argv)}`; "
            f"model `{args.model}`, detector {args.detector}, {args.threads} thread(s), median of {args.repeats} "
            f"run(s) each, load average {load} at the end (the machine is shared: compare within the table).\n\n"
            "| showers | batch | malloc | wall s | user s | system s | system / user | showers / CPU s | "
            "peak RSS MB | minor faults |\n|---|---|---|---|---|---|---|---|---|---|\n"
            f"{table}\n")
    print(text)
    if args.out:
        from calofm.io import atomic_write_text

        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
