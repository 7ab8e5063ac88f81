"""Which high-level features tell generated showers from the reference, per incident-energy bin (benchmarks/fidelity.md).

For each log-spaced E_inc bin (`calofm.evaluate.response.energy_bins`, five by default) and for all showers: the
classifier AUC on calofm's 44 high-level features (`calofm.evaluate.metrics.classifier_auc`, as `calofm evaluate`'s
auc_high), and each feature's own separation, the ROC AUC of that feature alone folded to max(AUC, 1 - AUC)
(0.5: none), the `--top` largest listed. Reference and generated files are matched by detector name; the generated
showers are expected at the reference's conditions (`calofm generate --conditions`).

Two views of what no single feature shows, for a classifier that separates while every 1-D AUC is near 0.5:
- `--groups`: the classifier on each block of features alone (one block per observable over the five depth
  segments, plus the shower-wide ones), with log10_e_inc beside it: which block carries the separation;
- always: the coherence of the shower's transverse centre across depth, the correlation of c_x (and c_y) between
  adjacent segments averaged over the 8 pairs, in the reference and the generated showers (bootstrap error): a
  shower whose centre wanders as one has it well above 0, segments drawn independently near 0.

    python scripts/feature_separation.py --reference data/test_logu1k --generated gen/ [--detectors odd ...]
    python scripts/feature_separation.py --reference data/test --generated gen/ --bins 2 --groups
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def folded_auc(a: np.ndarray, b: np.ndarray) -> float:
    """ROC AUC of one feature telling sample a from b, folded so that 0.5 is no separation and 1 a complete one."""
    auc = roc_auc_score(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b])
    return float(max(auc, 1.0 - auc))


GLOBAL_FEATURES = ("e_ratio", "c_z", "w_z")


def feature_groups(names: list[str]) -> dict[str, list[int]]:
    """Columns of each block: one per per-segment observable ("c_x" -> c_x[0..4]) and the shower-wide features,
    each with log10_e_inc (column 0), so a group is judged at its incident energy."""
    blocks = dict.fromkeys(n.split("[")[0] for n in names if "[" in n)
    groups = {b: [0] + [i for i, n in enumerate(names) if n.startswith(b + "[")] for b in blocks}
    return {**groups, "shower-wide": [0] + [names.index(n) for n in GLOBAL_FEATURES]}


def separation(ref_feats: np.ndarray, gen_feats: np.ndarray, names: list[str], top: int, groups: bool) -> dict:
    from calofm.evaluate.metrics import bootstrap, classifier_auc
    from calofm.evaluate.observables import centre_coherence

    per_feature = {n: folded_auc(ref_feats[:, i], gen_feats[:, i]) for i, n in enumerate(names)}
    ranked = sorted(per_feature.items(), key=lambda kv: -kv[1])
    row = {"n_reference": len(ref_feats), "n_generated": len(gen_feats),
           "auc_high": classifier_auc(ref_feats, gen_feats)[0], "top": ranked[:top], "per_feature": per_feature,
           "centre_coherence": {"reference": bootstrap(centre_coherence, ref_feats),
                                "generated": bootstrap(centre_coherence, gen_feats)}}
    if groups:
        row["auc_group"] = {g: classifier_auc(ref_feats[:, cols], gen_feats[:, cols])[0]
                            for g, cols in feature_groups(names).items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="folder of reference <detector>.h5 files")
    ap.add_argument("--generated", required=True, help="folder of generated <detector>.h5 files")
    ap.add_argument("--detectors", nargs="*", default=None, help="default: every generated file's detector")
    ap.add_argument("--bins", type=int, default=5)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--groups", action="store_true", help="also the classifier on each block of features alone")
    ap.add_argument("--out", default=None, help="write the full result (every feature's AUC) as JSON here")
    args = ap.parse_args()

    from calofm.data.formats import open_showers
    from calofm.evaluate.observables import high_level_features, high_level_names
    from calofm.evaluate.response import MIN_SHOWERS_PER_BIN, energy_bins

    names = high_level_names()
    detectors = args.detectors or sorted(p.stem for p in Path(args.generated).glob("*.h5"))
    results = {}
    print("| detector | E_inc bin (GeV) | showers ref / gen | classifier AUC (high level) | most separating features "
          "(folded 1-D AUC) | centre coherence ref / gen |" + (" blocks alone: largest AUC |" if args.groups else "")
          + "\n|---|---|---|---|---|---|" + ("---|" if args.groups else ""))
    for det in detectors:
        with open_showers(Path(args.reference) / f"{det}.h5") as f:
            ref = f.read(0, len(f))
        with open_showers(Path(args.generated) / f"{det}.h5") as f:
            gen = f.read(0, len(f))
        fr, fg = high_level_features(ref.showers, ref.energy), high_level_features(gen.showers, gen.energy)
        edges = energy_bins(ref.energy, args.bins)
        bins = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])] + [(edges[0], edges[-1])]
        results[det] = []
        for lo, hi in bins:
            a, b = fr[(ref.energy >= lo) & (ref.energy < hi)], fg[(gen.energy >= lo) & (gen.energy < hi)]
            if min(len(a), len(b)) < MIN_SHOWERS_PER_BIN:
                continue
            row = {"e_low_gev": float(lo) / 1e3, "e_high_gev": float(min(hi, ref.energy.max())) / 1e3,
                   **separation(a, b, names, args.top, args.groups)}
            results[det].append(row)
            label = "all" if (lo, hi) == bins[-1] else f"{row['e_low_gev']:.3g}-{row['e_high_gev']:.3g}"
            tops = ", ".join(f"{n} {v:.2f}" for n, v in row["top"])
            (cr, er), (cg, eg) = row["centre_coherence"].values()
            line = (f"| {det} | {label} | {len(a)} / {len(b)} | {row['auc_high']:.3f} | {tops} | "
                    f"{cr:.2f} ± {er:.2f} / {cg:.2f} ± {eg:.2f} |")
            if args.groups:
                line += " " + ", ".join(f"{g} {v:.2f}" for g, v in sorted(row["auc_group"].items(),
                                                                       key=lambda kv: -kv[1])[:args.top]) + " |"
            print(line, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
