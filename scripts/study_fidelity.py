"""Fidelity of a model against one fixed held-out reference file per detector (benchmarks/fidelity.md).

For each detector: generate one shower at each of the first `--n` reference showers' (E, theta, phi) with the
model's own sampler, then `calofm.evaluate` (FPD / KPD on calofm's features and the CaloChallenge's, classifier
AUC on high-level features) and the energy response and resolution in five log-spaced E_inc bins
(`calofm.evaluate.response`), and the high-level features that contribute most to the FPD. Prints one markdown
row per detector and writes everything as JSON.

    python scripts/study_fidelity.py MODEL --reference data/test --out study/fidelity/NAME [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def feature_distances(ref, gen, top: int = 6) -> list[tuple[str, float]]:
    """Which features drive the FPD: each high-level feature's 1-D Frechet distance (mu_r - mu_g)^2 +
    (sigma_r - sigma_g)^2, on the features normalised as FPD normalises them; the `top` largest."""
    from calofm.evaluate import metrics as M
    from calofm.evaluate import observables as O

    a, b = M.normalise_features(O.high_level_features(ref.showers, ref.energy),
                                O.high_level_features(gen.showers, gen.energy))
    fd = (a.mean(0) - b.mean(0)) ** 2 + (a.std(0) - b.std(0)) ** 2
    order = fd.argsort()[::-1][:top]
    return [(O.high_level_names()[i], float(fd[i])) for i in order]


def pm(v: dict | None) -> str:
    """value ± error x 1e3 of an FPD/KPD entry."""
    return f"{v['value'] * 1e3:.1f} ± {v['error'] * 1e3:.1f}" if v else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model folder or Hub repo id")
    ap.add_argument("--reference", required=True, help="folder of held-out <detector>.h5 files")
    ap.add_argument("--out", required=True, help="folder for generated files, evaluation folders and fidelity.json")
    ap.add_argument("--detectors", nargs="*", help="default: every detector of the model's slot map")
    ap.add_argument("--n", type=int, default=2000, help="showers per detector (the first N of each reference file)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's own)")
    ap.add_argument("--metrics", default="response,fpd,kpd,fpd_cc,kpd_cc,auc_high,auc_low",
                    help="calofm evaluate metrics")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    args = ap.parse_args()

    from calofm.data.formats import open_showers, write_showers
    from calofm.evaluate.report import METRICS, evaluate
    from calofm.generate import generate_showers
    from calofm.hub import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    detectors = args.detectors or sorted(model.slot_map, key=model.slot_map.get)
    metrics = [m for m in args.metrics.split(",") if m in METRICS]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"model": args.model, "objective": model.objective, "steps": args.steps or model.sampler.get("steps"),
               "n": args.n, "reference": str(args.reference), "metrics": metrics, "detectors": {}}
    print("| detector | FPD x1e3 (calofm) | FPD x1e3 (CaloChallenge) | AUC high / low | mean ratio (5 E bins) | "
          "spread ratio (5 E bins) | gen s |")
    print("|---|---|---|---|---|---|---|")
    for det in detectors:
        with open_showers(Path(args.reference) / f"{det}.h5") as f:
            ref = f.read(0, min(args.n, len(f)))
        t0 = time.perf_counter()
        gen = generate_showers(model, det, ref.energy, ref.theta, ref.phi, steps=args.steps, seed=1)
        gen_s = time.perf_counter() - t0
        gen_file = out / f"{det}_generated.h5"
        write_showers(gen_file, gen, attrs={"detector": det, "generated_by": f"calofm ({args.model})"})
        ev = evaluate(ref, gen, out / f"eval_{det}", metrics=metrics, detector=det)
        rows = ev.get("response", [])
        results["detectors"][det] = {"evaluate": {k: ev[k] for k in metrics if k in ev},
                                     "feature_fd": feature_distances(ref, gen), "generate_s": gen_s}


        auc_s = " / ".join(f"{ev[k]['value']:.3f} ± {ev[k]['error']:.3f}" if k in ev else "–"
                           for k in ("auc_high", "auc_low"))
        means = " / ".join(f"{r['mean_ratio']:.3f}±{r['mean_ratio_error']:.3f}" for r in rows)
        spreads = " / ".join(f"{r['spread_ratio']:.2f}±{r['spread_ratio_error']:.2f}" for r in rows)
        print(f"| {det} | {pm(ev.get('fpd'))} | {pm(ev.get('fpd_cc'))} | {auc_s} | {means} | {spreads} | {gen_s:.0f} |", flush=True)
        print("   largest 1-D feature distances (x1e3): " + ", ".join(
            f"{n} {v * 1e3:.1f}" for n, v in results["detectors"][det]["feature_fd"]), flush=True)
    (out / "fidelity.json").write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
