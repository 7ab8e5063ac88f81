"""Adapting the shipped foundation model vs training from scratch on a new detector (the CaloDiT-2 experiment).

On synthetic fccee_allegro showers (the detector held out of pretraining), each run is one point: (a) the shipped
model `calodit-tiny-standin` (`calofm/pretrained`) adapted with `calofm.train.adapt` in one mode (full, LoRA,
conditioning-only) on n showers for s steps, or (b) the same architecture trained from scratch on that detector
alone with `calofm.train.pretrain` on n showers for s steps. Each is scored as the shipped model's card is
(`calofm.evaluate.fidelity`: FPD, classifier AUC, worst-bin response ratios) on held-out showers generated at the
held-out showers' conditions. Writes benchmarks/adaptation.{md,png,json} from every run cached in --work.

EDM stage only (adapt.cd_steps = 0): the consistency stage would double the time and is the same for both arms.
Every finished run is cached in --work/results/, so an interrupted study continues, runs can be added by later
invocations (the table holds all cached runs), and two processes can share the work:

    python scripts/study_adaptation.py --arms adapted --modes full --n-train 1000 --steps 300 1000 --lr-adapt 1e-4
    python scripts/study_adaptation.py --arms adapted --modes full --n-train 250 5000 --steps 1000 --lr-adapt 1e-4
    python scripts/study_adaptation.py --arms adapted --modes full --n-train 1000 --steps 300 1000 --lr-adapt 1e-3
    python scripts/study_adaptation.py --arms adapted --modes lora --n-train 1000 --steps 300 1000
    python scripts/study_adaptation.py --arms adapted --modes conditioning --n-train 1000 --steps 1000
    python scripts/study_adaptation.py --arms scratch --n-train 5000 --steps 300 1000
    python scripts/study_adaptation.py --arms scratch --n-train 1000 --steps 1000
    python scripts/study_adaptation.py --table-only       # the table and plot of every cached run
    python scripts/study_adaptation.py --quick            # a smoke run of the whole pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from calofm.config import load_config
from calofm.data.formats import open_showers
from calofm.data.synthetic import synthesize
from calofm.evaluate.fidelity import auc_text, fidelity
from calofm.generate import generate_showers
from calofm.geometry import NEW_DETECTOR, PRETRAIN_DETECTORS
from calofm.hub import load_model
from calofm.io import atomic_path, atomic_write_text
from calofm.pretrained import SHIPPED
from calofm.train.adapt import MODES, adapt, resolve_pretrained, select_trainable
from calofm.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "study-adaptation", help="data, models, cache")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "adaptation", help="OUT.{md,png,json}")
    p.add_argument("--pretrained", default=SHIPPED, help="pretrained EDM model (a shipped name or a folder)")
    p.add_argument("--arms", nargs="+", default=["adapted", "scratch"], choices=["adapted", "scratch"])
    p.add_argument("--modes", nargs="+", default=["full"], choices=list(MODES), help="adaptation modes")
    p.add_argument("--n-train", type=int, nargs="+", default=[1000], help="training showers")
    p.add_argument("--steps", type=int, nargs="+", default=[300, 1000], help="training steps")
    p.add_argument("--lr-scratch", type=float, default=1e-3, help="the pretrain-tiny recipe's rate")
    p.add_argument("--lr-adapt", type=float, help="adaptation rate (default: recipes/adapt-MODE.yaml's)")
    p.add_argument("--n-test", type=int, default=2000, help="held-out showers (and generated ones)")
    p.add_argument("--sample-steps", type=int, default=12, help="EDM Heun steps when generating")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a shared machine 1 is faster: OpenMP threads spin when cores are busy)")
    p.add_argument("--table-only", action="store_true", help="write the table from the cached runs, train nothing")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the result")
    args = p.parse_args()
    if args.quick:
        args.work = args.work.with_name(args.work.name + "-quick")
        args.out = args.work / "adaptation"
        args.n_train, args.steps, args.n_test, args.sample_steps = [200], [10, 20], 200, 4
    return args


def make_data(args) -> dict[str, Path]:
    """The new detector's training pool (seed 2) and its held-out set (seed 3), cached."""
    d = args.work / "data"
    paths = {"train": d / "train" / f"{NEW_DETECTOR}.h5", "test": d / "test" / f"{NEW_DETECTOR}.h5"}
    if not paths["train"].exists():
        synthesize(paths["train"].parent, [NEW_DETECTOR], max([5000, *args.n_train]), seed=2)
    if not paths["test"].exists():
        synthesize(paths["test"].parent, [NEW_DETECTOR], args.n_test, seed=3)
    return paths


def timed(fn, *a, **kw) -> tuple[Path, float]:
    tic = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - tic


def trainable(args, mode: str) -> int:
    """Trainable parameters of the pretrained model in `mode`, as `calofm adapt` sets them."""
    cfg = load_config(f"adapt-{mode}").adapt
    edm, _ = resolve_pretrained(args.pretrained)  # a folder of edm/ and cd/, a shipped name or an EDM folder
    net = select_trainable(load_model(edm), mode, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                           lora_targets=cfg.lora_targets)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def adapt_lr(args, mode: str) -> float:
    return args.lr_adapt or load_config(f"adapt-{mode}").train.lr


def run_adapted(args, data, mode: str, n: int, steps: int, key: str) -> tuple[Path, float]:
    cfg = load_config(f"adapt-{mode}",
                      [f"output_dir={args.work / key}", f"adapt.pretrained={args.pretrained}", "adapt.pretrained_cd=",
                       f"adapt.data={data['train']}", f"adapt.n_train={n}", "adapt.cd_steps=0",
                       f"train.steps={steps}", f"train.lr={adapt_lr(args, mode)}", f"train.checkpoint_every={steps}"])
    folder, seconds = timed(adapt, cfg, resume=True)
    return folder / "edm", seconds


def run_scratch(args, data, n: int, steps: int) -> tuple[Path, float]:
    cfg = load_config("pretrain-tiny",
                      [f"output_dir={args.work / f'scratch-n{n}-s{steps}'}", f"data.dir={data['train'].parent}",
                       f"data.detectors=[{NEW_DETECTOR}]", f"data.max_per_detector={n}", f"train.steps={steps}",
                       f"train.lr={args.lr_scratch}", f"train.checkpoint_every={steps}"])
    return timed(pretrain, cfg, resume=True)


def score(args, model_dir: Path, test, folder: Path) -> dict:
    """The card's fidelity row of showers generated at the held-out showers' (E, theta, phi)."""
    model = load_model(model_dir)
    gen, seconds = timed(generate_showers, model, NEW_DETECTOR, test.energy, test.theta, test.phi,
                         steps=args.sample_steps, batch_size=64, seed=11)
    return {"generate_s": seconds, **fidelity(test, gen, folder, NEW_DETECTOR)}


def fmt(row: dict) -> str:
    init = row["init"] if row["init"] == "scratch" else f"adapted ({row['mode']})"
    return (f"| {init} | {row['trainable']:,} | {row['n_train']:,} | {row['steps']:,} | {row['lr']:g} | {row['train_s']:.0f} | "
            f"{row['fpd']['value'] * 1e3:.3g} ± {row['fpd']['error'] * 1e3:.2g} | {auc_text(row)} | "
            f"{row['mean_ratio']:.3f} ± {row['mean_ratio_error']:.3f} | "
            f"{row['spread_ratio']:.2f} ± {row['spread_ratio_error']:.2f} |")


def write_outputs(args, rows: list[dict], meta: dict) -> None:
    rows = sorted(rows, key=lambda r: (r["init"], r.get("mode", ""), r["lr"], r["n_train"], r["steps"]))
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    floor = meta["floor"]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join([
        "# Adapting the shipped model vs training from scratch (synthetic fccee_allegro)",
        "",
        f"Start: `{args.pretrained}` (`calofm/pretrained`, tiny preset, pretrained on "
        f"{', '.join(PRETRAIN_DETECTORS)}; fccee_allegro was never seen). Adapted: `calofm.train.adapt` with "
        "`recipes/adapt-MODE.yaml` at the rate of the lr column; scratch: `calofm.train.pretrain` "
        f"on fccee_allegro alone, lr {args.lr_scratch:g}. All: batch 64, WSD schedule, EMA, EDM stage only. "
        f"Scored as the shipped model's card (`calofm.evaluate.fidelity`): {args.n_test:,} held-out showers "
        f"(seed 3) and one generated at each one's conditions ({args.sample_steps} Heun steps); training pool "
        f"seed 2. Floor (the first {args.n_test:,} training showers scored as if generated): FPD x1e3 = "
        f"{floor['fpd']['value'] * 1e3:.2g} ± {floor['fpd']['error'] * 1e3:.1g}, AUC {auc_text(floor)}.",
        "",
        f"Machine: {meta['machine']}, {meta['threads']} torch thread(s) per run; {meta['compute_s'] / 60:.0f} min "
        "of training and generation in all (other jobs shared the cores, so times are indicative).",
        "",
        "| init | trainable params | training showers | steps | lr | train time [s] | FPD x1e3 | AUC high-level | "
        "worst mean ratio | worst spread ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *map(fmt, rows),
        "",
        f"![FPD vs steps]({args.out.with_suffix('.png').name})",
        "",
        "Reproduce: the commands in `scripts/study_adaptation.py`'s docstring (each run is cached in --work; "
        "the last writes this table).",
        "",
    ]))

    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    def group(r):
        return r["init"], r.get("mode", ""), r["n_train"], r["lr"]

    for (init, mode, n, lr), marker in zip(sorted({group(r) for r in rows}), "osD^v<>ph*", strict=False):
        rs = sorted((r for r in rows if group(r) == (init, mode, n, lr)), key=lambda r: r["steps"])
        ax.errorbar([r["steps"] for r in rs], [r["fpd"]["value"] * 1e3 for r in rs],
                    [r["fpd"]["error"] * 1e3 for r in rs], marker=marker, capsize=3,
                    ls="-" if init == "adapted" else "--",
                    label=f"{init}{f' ({mode})' if mode else ''}, {n:,} showers, lr {lr:g}")
    ax.axhline(floor["fpd"]["value"] * 1e3, color="grey", lw=0.8, ls=":", label="data vs data")
    ax.set(xlabel="training steps", ylabel="FPD x1e3 vs held-out fccee_allegro", yscale="log",
           title="Adapted from the shipped model vs from scratch", xticks=sorted({r["steps"] for r in rows}))
    for f in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        f(FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    with atomic_path(args.out.with_suffix(".png"), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cache = args.work / "results"
    cache.mkdir(parents=True, exist_ok=True)
    data = make_data(args)
    with open_showers(data["test"]) as f:
        test = f.read(0, args.n_test)
    if not (cache / "floor.json").exists():
        with open_showers(data["train"]) as f:
            ref = f.read(0, args.n_test)
        atomic_write_text(cache / "floor.json", json.dumps(fidelity(test, ref, args.work / "eval" / "floor",
                                                                    NEW_DETECTOR)))
    runs = [("scratch", "", n, s) for n in args.n_train for s in args.steps if "scratch" in args.arms]
    runs += [("adapted", m, n, s) for m in args.modes for n in args.n_train for s in args.steps
             if "adapted" in args.arms]
    for init, mode, n, steps in [] if args.table_only else runs:
        lr = adapt_lr(args, mode) if init == "adapted" else args.lr_scratch
        default = init == "scratch" or args.lr_adapt is None
        key = (f"{init}-{mode}-n{n}-s{steps}" if mode else f"{init}-n{n}-s{steps}") + ("" if default else f"-lr{lr:g}")
        if (cache / f"{key}.json").exists():
            continue
        model_dir, train_s = (run_adapted(args, data, mode, n, steps, key) if init == "adapted"
                              else run_scratch(args, data, n, steps))
        params = trainable(args, mode) if init == "adapted" else sum(p.numel() for p in
                                                                      load_model(model_dir).parameters())
        row = {"init": init, "mode": mode, "trainable": params, "n_train": n, "steps": steps, "lr": lr,
               "train_s": train_s,
               **score(args, model_dir, test, args.work / "eval" / key)}
        atomic_write_text(cache / f"{key}.json", json.dumps(row))
        print(f"{key}: train {train_s:.0f} s, FPD x1e3 = {row['fpd']['value'] * 1e3:.3g} ± "
              f"{row['fpd']['error'] * 1e3:.2g}, AUC {auc_text(row)}", flush=True)

    rows = [json.loads(p.read_text()) for p in sorted(cache.glob("*.json")) if p.stem != "floor"]
    meta = {"floor": json.loads((cache / "floor.json").read_text()), "threads": torch.get_num_threads(),
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
            "compute_s": sum(r["train_s"] + r["generate_s"] for r in rows)}
    if rows:
        write_outputs(args, rows, meta)
        print(f"wrote {args.out.with_suffix('.md')} and .png ({len(rows)} runs)")


if __name__ == "__main__":
    main()
