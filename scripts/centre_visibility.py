"""How visible a shower's wandering centre is in the space a diffusion model learns (benchmarks/fidelity.md).

A shower's transverse centre wanders as one through depth (`calofm.evaluate.observables.centre_coherence`). In the
cells that is a dipole, cos / sin of the azimuth, shared by every layer. This script measures, for the showers above
the median E_inc of each file, the correlation between adjacent depth segments of the segment's dipole coordinate
(the cells' projection on cos and sin of the azimuth, summed over rings and the segment's layers), once in the
cells' fractions of E_dep (where the energy-weighted centre lives) and once in log(fraction + eps) for a few eps,
the normaliser's space (`calofm.data.transforms.Normalizer`, unit `deposit`; the recipes' `data.log_eps`). A
correlation near 0 in the model's space means the shared shift is buried under the noise of which faint cells
are lit.

    python scripts/centre_visibility.py data/test/par04_siw.h5 data/test/par04_scipb.h5
"""

from __future__ import annotations

import argparse

import numpy as np


def segment_dipoles(y: np.ndarray, segments: int) -> np.ndarray:
    """(B, 2, segments): the cells (B, r, phi, z) projected on cos and sin of the azimuth, summed per segment."""
    from calofm.geometry import N_Z, PHI_CENTRES

    phi = np.asarray(PHI_CENTRES)
    c = np.einsum("kp,brpz->bkz", np.stack([np.cos(phi), np.sin(phi)]), y)
    return c.reshape(len(y), 2, segments, N_Z // segments).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="shower files (any format calofm reads)")
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-7, 1e-5, 1e-4, 1e-3],
                    help="offsets inside the log (the recipes' data.log_eps is 1e-7)")
    ap.add_argument("--segments", type=int, default=5)
    ap.add_argument("--boot", type=int, default=100, help="bootstrap resamples for the errors")
    args = ap.parse_args()

    from calofm.data.formats import open_showers
    from calofm.data.transforms import deposit
    from calofm.evaluate.metrics import bootstrap
    from calofm.evaluate.observables import adjacent_correlation
    from calofm.geometry import THRESHOLD_MEV

    print("| file | showers | fractions of E_dep | " + " | ".join(f"log, eps {e:g}" for e in args.eps) + " |")
    print("|---|---|---|" + "---|" * len(args.eps))
    for path in args.files:
        with open_showers(path) as f:
            s = f.read()
        high = s.energy > np.median(s.energy)
        x = np.where(s.showers[high] < THRESHOLD_MEV, 0.0, s.showers[high]).astype(np.float64)
        frac = x / deposit(x)[:, None, None, None]
        spaces = [frac] + [np.log(frac + eps) for eps in args.eps]
        cells = [bootstrap(adjacent_correlation, segment_dipoles(y, args.segments), boot=args.boot) for y in spaces]
        print(f"| {path} | {int(high.sum()):,} | " + " | ".join(f"{v:.2f} ± {e:.2f}" for v, e in cells) + " |")


if __name__ == "__main__":
    main()
