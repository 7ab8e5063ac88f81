"""Adapting a pretrained model vs training from scratch on a new detector (the CaloDiT-2 experiment, in kind).

On synthetic fccee_allegro showers (the detector held out of pretraining), for each number of training showers
and number of steps, train (a) the pretrained tiny EDM adapted with `calofm.train.adapt` and (b) the same
architecture from scratch on that detector alone with `calofm.train.pretrain`; score each by FPD of the
CaloChallenge high-level features of generated vs held-out showers at the held-out showers' conditions.
Writes benchmarks/adaptation.{md,png,json}.

EDM stage only (adapt.cd_steps = 0): the consistency stage would double the time and is the same for both arms.
The pretrained model (4 detectors, tiny preset) is `--pretrained`, or is trained here once and cached in --work,
like the data; every finished run is cached in --work/results/, so an interrupted study continues and two
processes can share it (one per arm; the scratch arm needs no pretrained model):

    python scripts/study_adaptation.py                    # one process: ~27 min of compute on 2 shared cores
    python scripts/study_adaptation.py --arms scratch &   # or two: the scratch arm needs no pretrained model,
    python scripts/study_adaptation.py --arms adapted     # this one pretrains (cached) and adapts,
    python scripts/study_adaptation.py                    # and, all runs cached, this writes the table and plot
    python scripts/study_adaptation.py --quick            # a smoke run of the whole pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from calofm.config import load_config
from calofm.data.formats import open_showers
from calofm.data.synthetic import synthesize
from calofm.evaluate.metrics import fpd
from calofm.evaluate.observables import high_level_features
from calofm.generate import generate_showers
from calofm.geometry import NEW_DETECTOR, PRETRAIN_DETECTORS
from calofm.hub import load_model
from calofm.io import atomic_path, atomic_write_text
from calofm.train.adapt import adapt
from calofm.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "study-adaptation", help="data, models, cache")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "adaptation", help="OUT.{md,png,json}")
    p.add_argument("--pretrained", type=Path, help="pretrained EDM model folder (default: pretrain one here)")
    p.add_argument("--n-train", type=int, nargs="+", default=[1000, 5000], help="training showers")
    p.add_argument("--steps", type=int, nargs="+", default=[200, 800], help="training steps")
    p.add_argument("--mode", default="full", choices=["full", "lora", "conditioning"])
    p.add_argument("--lr-adapt", type=float, help="default: the recipes/adapt-MODE.yaml rate (full: 1e-4)")
    p.add_argument("--lr-scratch", type=float, default=1e-3, help="the pretrain-tiny recipe's rate")
    p.add_argument("--n-test", type=int, default=1000, help="held-out showers (and generated ones)")
    p.add_argument("--sample-steps", type=int, default=12, help="EDM Heun steps when generating")
    p.add_argument("--n-pretrain", type=int, default=4000, help="showers per pretraining detector")
    p.add_argument("--pretrain-steps", type=int, default=3000,
                   help="the pretrained model must have seen far more than one adaptation run (as in the paper)")
    p.add_argument("--arms", nargs="+", default=["adapted", "scratch"], choices=["adapted", "scratch"],
                   help="train only these arms (two processes can share the work: results are cached per run)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a shared machine 1 is faster: OpenMP threads spin when cores are busy)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the result")
    args = p.parse_args()
    if args.quick:
        args.work = args.work.with_name(args.work.name + "-quick")
        args.out = args.work / "adaptation"
        args.n_train, args.steps, args.n_test, args.sample_steps = [200, 400], [10, 20], 200, 4
        args.n_pretrain, args.pretrain_steps = 300, 20
    args.lr_adapt = args.lr_adapt or load_config(ROOT / "recipes" / f"adapt-{args.mode}.yaml").train.lr
    return args


def make_data(args) -> dict[str, Path]:
    """Pretraining data, the new detector's training pool and its held-out set: three seeds, cached."""
    d = args.work / "data"
    paths = {"pretrain": d / "pretrain", "train": d / "train" / f"{NEW_DETECTOR}.h5",
             "test": d / "test" / f"{NEW_DETECTOR}.h5"}
    if args.pretrained is None and not (paths["pretrain"] / f"{PRETRAIN_DETECTORS[-1]}.h5").exists():
        synthesize(paths["pretrain"], PRETRAIN_DETECTORS, args.n_pretrain, seed=1)
    if not paths["train"].exists():
        synthesize(paths["train"].parent, [NEW_DETECTOR], max(args.n_train), seed=2)
    if not paths["test"].exists():
        synthesize(paths["test"].parent, [NEW_DETECTOR], args.n_test, seed=3)
    return paths


def timed(fn, *a, **kw) -> tuple[Path, float]:
    tic = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - tic


def run_pretrain(args, data) -> tuple[Path, float | None]:
    if args.pretrained is not None:
        return args.pretrained, None
    model = args.work / "pretrain" / "model"
    if model.exists():
        return model, None
    cfg = load_config(ROOT / "recipes" / "pretrain-tiny.yaml",
                      [f"data.dir={data['pretrain']}", f"output_dir={args.work / 'pretrain'}",
                       f"train.steps={args.pretrain_steps}", f"train.checkpoint_every={args.pretrain_steps}"])
    return timed(pretrain, cfg, resume=True)


def run_adapted(args, data, pretrained: Path, n: int, steps: int) -> tuple[Path, float]:
    out = args.work / f"adapted-{args.mode}-n{n}-s{steps}"
    cfg = load_config(ROOT / "recipes" / f"adapt-{args.mode}.yaml",
                      [f"output_dir={out}", f"adapt.pretrained={pretrained}", "adapt.pretrained_cd=",
                       f"adapt.data={data['train']}", f"adapt.n_train={n}", "adapt.cd_steps=0",
                       f"train.steps={steps}", f"train.lr={args.lr_adapt}", f"train.checkpoint_every={steps}"])
    folder, seconds = timed(adapt, cfg, resume=True)
    return folder / "edm", seconds


def run_scratch(args, data, n: int, steps: int) -> tuple[Path, float]:
    cfg = load_config(ROOT / "recipes" / "pretrain-tiny.yaml",
                      [f"output_dir={args.work / f'scratch-n{n}-s{steps}'}", f"data.dir={data['train']}",
                       f"data.detectors=[{NEW_DETECTOR}]", f"data.max_per_detector={n}", f"train.steps={steps}",
                       f"train.lr={args.lr_scratch}", f"train.checkpoint_every={steps}"])
    return timed(pretrain, cfg, resume=True)


def score(model_dir: Path, test, test_feats: np.ndarray, sample_steps: int) -> dict:
    """FPD of generated vs held-out showers, generated at the held-out showers' (E, theta, phi)."""
    model = load_model(model_dir)
    gen, seconds = timed(generate_showers, model, NEW_DETECTOR, test.energy, test.theta, test.phi,
                         steps=sample_steps, seed=11)
    value, err = fpd(test_feats, high_level_features(gen.showers, gen.energy))
    return {"fpd": value, "fpd_err": err, "generate_s": seconds}


def write_outputs(args, results: dict, meta: dict) -> None:
    rows = sorted(results.values(), key=lambda r: (r["init"] != "adapted", r["n_train"], r["steps"]))
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))

    lines = [f"| {r['init']} | {r['n_train']:,} | {r['steps']:,} | {r['train_s']:.0f} | {r['generate_s']:.0f} | "
             f"{r['fpd']:.2f} ± {r['fpd_err']:.2f} |" for r in rows]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join([
        "# Adaptation vs training from scratch (synthetic fccee_allegro)",
        "",
        f"Tiny preset; pretrained on {', '.join(PRETRAIN_DETECTORS)} ({meta['pretrain']}). Adapted: "
        f"`calofm.train.adapt`, mode `{args.mode}`, lr {args.lr_adapt:g}; scratch: `calofm.train.pretrain` on "
        f"{NEW_DETECTOR} alone, lr {args.lr_scratch:g}. Both: batch 64, WSD schedule, EMA, EDM stage only (the "
        "CD stage would double the time and is common to both arms). FPD (lower is better) of the "
        f"high-level features of {args.n_test:,} generated showers ({args.sample_steps} Heun steps) vs "
        f"{args.n_test:,} held-out showers at the same conditions. Floor: FPD of {args.n_test:,} training "
        f"showers vs the held-out set = {meta['floor'][0]:.3f} ± {meta['floor'][1]:.3f}.",
        "",
        f"Machine: {meta['machine']}, {meta['threads']} torch thread(s); pretraining, training and generation took "
        f"{meta['compute_s'] / 60:.1f} min in all (train time per run below; other jobs shared the cores, so the "
        "times are indicative).",
        "",
        "| init | training showers | steps | train time [s] | generation time [s] | FPD |",
        "|---|---|---|---|---|---|",
        *lines,
        "",
        f"![FPD vs steps]({args.out.with_suffix('.png').name})",
        "",
        f"Reproduce: `python scripts/study_adaptation.py` ({meta['command']}).",
        "",
    ]))

    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for (init, n), marker in zip(sorted({(r["init"], r["n_train"]) for r in rows}), "osD^v<>", strict=False):
        rs = sorted((r for r in rows if (r["init"], r["n_train"]) == (init, n)), key=lambda r: r["steps"])
        ax.errorbar([r["steps"] for r in rs], [r["fpd"] for r in rs], [r["fpd_err"] for r in rs],
                    marker=marker, ls="-" if init == "adapted" else "--", capsize=3,
                    label=f"{init}, {n:,} showers")
    ax.set(xlabel="training steps", ylabel="FPD vs held-out fccee_allegro", yscale="log",
           title="Adapted from pretrained vs from scratch", xticks=sorted({r["steps"] for r in rows}))
    for fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        fmt(FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    with atomic_path(args.out.with_suffix(".png"), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tic = time.perf_counter()
    cache = args.work / "results"
    cache.mkdir(parents=True, exist_ok=True)
    data = make_data(args)
    with open_showers(data["test"]) as f:
        test = f.read()
    test_feats = high_level_features(test.showers, test.energy)
    with open_showers(data["train"]) as f:
        ref = f.read(0, args.n_test)
    floor = fpd(test_feats, high_level_features(ref.showers, ref.energy))

    pretrained = None
    if "adapted" in args.arms:
        pretrained, pretrain_s = run_pretrain(args, data)
        if pretrain_s is not None:
            atomic_write_text(cache / "pretrain.json", json.dumps({"pretrain_s": pretrain_s}))
    for n in args.n_train:
        for steps in args.steps:
            for init in args.arms:
                key = f"{init}-n{n}-s{steps}"
                if (cache / f"{key}.json").exists():
                    continue
                model_dir, train_s = (run_adapted(args, data, pretrained, n, steps) if init == "adapted"
                                      else run_scratch(args, data, n, steps))
                row = {"init": init, "n_train": n, "steps": steps, "train_s": train_s,
                       **score(model_dir, test, test_feats, args.sample_steps)}
                atomic_write_text(cache / f"{key}.json", json.dumps(row))
                print(f"{key}: train {train_s:.0f} s, FPD = {row['fpd']:.3g} ± {row['fpd_err']:.2g}", flush=True)
    wanted = {f"{i}-n{n}-s{s}" for i in ("adapted", "scratch") for n in args.n_train for s in args.steps}
    results = {p.stem: json.loads(p.read_text()) for p in cache.glob("*.json") if p.stem in wanted}
    if len(results) < len(wanted) or pretrained is None:
        print(f"{len(results)} of {len(wanted)} runs done; run with both arms to write the table")
        return

    cfg = load_model(pretrained).provenance
    pre = (f"{cfg.get('steps', '?')} steps on {args.n_pretrain:,} showers each" if args.pretrained is None
           else f"given: {args.pretrained}")
    pretrain_s = json.loads((cache / "pretrain.json").read_text())["pretrain_s"] if (
        cache / "pretrain.json").exists() else 0.0
    if pretrain_s:
        pre += f", {pretrain_s:.0f} s"
    meta = {"pretrain": pre, "floor": floor, "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
            "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - tic,
            "compute_s": pretrain_s + sum(r["train_s"] + r["generate_s"] for r in results.values()),
            "command": f"--n-train {' '.join(map(str, args.n_train))} --steps {' '.join(map(str, args.steps))} "
                       f"--mode {args.mode} --lr-adapt {args.lr_adapt:g} --threads {args.threads}"}
    write_outputs(args, results, meta)
    print(f"wrote {args.out.with_suffix('.md')} and .png ({meta['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
