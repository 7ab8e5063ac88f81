"""Learning curve of a pretraining run: the fidelity of its EMA weights at each kept checkpoint against showers
seen, on one fixed held-out file per detector (benchmarks/fidelity.md).

    python scripts/learning_curve.py runs/pretrain --reference data/test --n 300 --out study/curve

Each checkpoint's EMA weights (`ema_0.safetensors`, `calofm.train.checkpoint`) go into the run's final model config; `calofm.evaluate.
fidelity` scores them (EDM, the model's own sampler). Writes curve.json and curve.png (the FPD and the classifier
AUC, each with its error, against showers seen) and prints a markdown table (FPD / worst spread ratio / AUC).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

EMA_FILE = "ema_0.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a pretraining output_dir (model/ and checkpoints/step_*)")
    ap.add_argument("--reference", required=True, help="folder of held-out <detector>.h5 files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=300, help="showers per detector (the first N of each reference file)")
    ap.add_argument("--steps", nargs="*", type=int, help="only these checkpoints (default: all kept)")
    ap.add_argument("--detectors", nargs="*", help="only these detectors (default: the model's slot map)")
    ap.add_argument("--final-deposit-net", action="store_true",
                    help="keep the final model's deposit net (refitted at the run's end) at every checkpoint, so the "
                    "curve follows the shape network alone")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from matplotlib.figure import Figure
    from safetensors.torch import load_model as load_weights

    from calofm.config import load_config
    from calofm.data.formats import open_showers
    from calofm.evaluate.fidelity import auc_text, fidelity
    from calofm.generate import generate_showers
    from calofm.hub import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch = load_config(run / "config.yaml").train.batch_size
    model = load_model(run / "model")
    detectors = args.detectors or sorted(model.slot_map, key=model.slot_map.get)
    keep = args.final_deposit_net and model.deposit_net is not None
    final_deposit = {k: v.clone() for k, v in model.deposit_net.state_dict().items()} if keep else None
    refs = {}
    for det in detectors:
        with open_showers(Path(args.reference) / f"{det}.h5") as f:
            refs[det] = f.read(0, min(args.n, len(f)))
    curve = []
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        step = int(ckpt.name.removeprefix("step_"))
        if args.steps and step not in args.steps:
            continue
        load_weights(model, str(ckpt / EMA_FILE))
        if final_deposit:
            model.deposit_net.load_state_dict(final_deposit)
        row = {"step": step, "showers_seen": step * batch, "detectors": {}}
        for det, ref in refs.items():
            gen = generate_showers(model, det, ref.energy, ref.theta, ref.phi, seed=1)
            row["detectors"][det] = fidelity(ref, gen, out / f"step_{step}" / det, det)
        curve.append(row)
        (out / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
        print(f"| {step} | {step * batch:,} | " + " | ".join(
            f"{s['fpd']['value'] * 1e3:.0f} ± {s['fpd']['error'] * 1e3:.0f} / {s['spread_ratio']:.2f} / "
            f"{auc_text(s)}" for s in row["detectors"].values()) + " |", flush=True)

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for det in detectors:
        x = [r["showers_seen"] for r in curve]
        s = [r["detectors"][det] for r in curve]
        ax1.errorbar(x, [v["fpd"]["value"] * 1e3 for v in s], [v["fpd"]["error"] * 1e3 for v in s], label=det,
                     marker="o", capsize=3)
        ax2.errorbar(x, [v["auc_high"] for v in s], [v["auc_high_error"] for v in s], label=det,
                     marker="o", capsize=3)
    ax1.axhline(20, color="k", ls="--", lw=1, label="goal (paper: 20.1)")
    ax1.set(xlabel="showers seen", ylabel="FPD x1e3 (calofm)", xscale="log", yscale="log",
            title=f"EDM learning curve, {args.n} showers / detector")
    ax2.axhline(0.65, color="k", ls="--", lw=1, label="goal")
    ax2.set(xlabel="showers seen", ylabel="classifier AUC (high-level)", xscale="log")
    ax1.legend(fontsize=8)
    fig.savefig(out / "curve.png", dpi=100)
    print(f"wrote {out / 'curve.json'}, {out / 'curve.png'}")


if __name__ == "__main__":
    main()
