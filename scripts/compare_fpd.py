"""Compare two models' FPD on one fixed reference, with the error of their difference (`metrics.fpd_difference`).

    python scripts/compare_fpd.py --reference data/test --a calodit-tiny-standin-cd --b runs/distill/model
    python scripts/compare_fpd.py --reference data/test --a calodit-tiny-standin-cd --b calodit-tiny-standin \
        --factor 3 --b-generated GEN_EDM        # the CD goal: FPD(CD) - 3 FPD(EDM) <= 0

Each FPD's own error is mostly the fluctuation of its 2,000 generated showers (the shipped CD drawn with noise seed
2 instead of 1 scores 17 instead of 33 x 1e-3 on par04_scipb) and of the reference. Two models drawn from one noise
seed at one list of conditions share most of it, so their difference is far more precise than the two errors in
quadrature say: the paired error says whether it is real (benchmarks/distillation.md). A and B are models (a folder
or a shipped name), generated as `scripts/ship_model.py` does (noise seed 1, one shower at each of the first N
reference showers' conditions, so the FPD columns reproduce the cards'); `--a-generated` / `--b-generated` read
`<detector>.h5` from a folder instead (`calofm generate MODEL --detector D --conditions REF/D.h5 --seed 1 --out
DIR/D.h5`), since an EDM takes minutes a detector. `--seed` is the generation seed of both. FPD x1e3 in calofm's
definition (`calofm.evaluate.metrics.fpd`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="folder of held-out <detector>.h5 files")
    ap.add_argument("--a", required=True, help="model A: folder or shipped name")
    ap.add_argument("--b", required=True, help="model B: folder or shipped name")
    ap.add_argument("--a-generated", help="folder of A's generated <detector>.h5 (instead of generating)")
    ap.add_argument("--b-generated", help="folder of B's generated <detector>.h5 (instead of generating)")
    ap.add_argument("--factor", type=float, default=1.0, help="score FPD(A) - factor x FPD(B) (default 1)")
    ap.add_argument("--n", type=int, default=2000, help="showers per detector (the first N of each reference file)")
    ap.add_argument("--detectors", nargs="*", help="default: model A's slot map")
    ap.add_argument("--seed", type=int, default=1, help="noise seed of the generated showers (the cards': 1)")
    args = ap.parse_args()

    from calofm.data.formats import open_showers
    from calofm.evaluate.metrics import fpd, fpd_difference
    from calofm.evaluate.observables import high_level_features
    from calofm.generate import generate_showers
    from calofm.hub import load_model

    models = {"a": load_model(args.a), "b": load_model(args.b)}
    detectors = args.detectors or sorted(models["a"].slot_map, key=models["a"].slot_map.get)
    k = args.factor
    print(f"`python {shlex.join(sys.argv)}`\n\nFPD x1e3 (calofm definition) against the first {args.n:,} showers of "
          f"each `{args.reference}/<detector>.h5`; A = `{args.a}`, B = `{args.b}`; paired: both scored on the same "
          f"reference rows and the same rows of A and B (made from the same noise, seed {args.seed}); quadrature: "
          "the two FPDs' own errors combined as if independent.\n")
    print(f"| detector | FPD A | FPD B | A - {k:g} B, paired error | quadrature error | paired / quadrature |")
    print("|---|---|---|---|---|---|")
    for det in detectors:
        with open_showers(Path(args.reference) / f"{det}.h5") as f:
            ref = f.read(0, min(args.n, len(f)))
        feats = {}
        for side in ("a", "b"):
            folder = getattr(args, f"{side}_generated")
            if folder:
                with open_showers(Path(folder) / f"{det}.h5") as f:
                    gen = f.read(0, min(args.n, len(f)))
                if not all(np.array_equal(getattr(gen, c), getattr(ref, c)) for c in ("energy", "theta", "phi")):
                    raise SystemExit(f"{folder}/{det}.h5: its conditions are not the reference's first {len(ref)} "
                                     f"(generate it with --conditions {args.reference}/{det}.h5)")
            else:
                gen = generate_showers(models[side], det, ref.energy, ref.theta, ref.phi, seed=args.seed)
            feats[side] = high_level_features(gen.showers, gen.energy)
        real = high_level_features(ref.showers, ref.energy)
        (fa, ea), (fb, eb) = fpd(real, feats["a"]), fpd(real, feats["b"])  # the cards' batch seed, 0
        diff, err = fpd_difference(real, feats["a"], feats["b"], factor=k)
        quad = float(np.hypot(ea, k * eb))
        print(f"| {det} | {fa * 1e3:.1f} ± {ea * 1e3:.1f} | {fb * 1e3:.1f} ± {eb * 1e3:.1f} | "
              f"{diff * 1e3:+.1f} ± {err * 1e3:.1f} | {quad * 1e3:.1f} | {err / quad:.2f} |", flush=True)


if __name__ == "__main__":
    main()
