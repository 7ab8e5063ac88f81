"""Mean total deposit of a model's showers vs the synthetic stand-in at fixed (E, theta, phi), per detector.

The check behind benchmarks/preprocessing.md: 10, 40 and 90 GeV at normal
incidence, 200 showers each, the model's own sampler.

    python scripts/fixed_points.py runs/pretrain-tiny/model                  # phi = pi/32 (mid-module)
    python scripts/fixed_points.py runs/pretrain-tiny/model --phi 0          # on an ODD module crack
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from calofm.data.synthetic import generate
from calofm.generate import generate_showers
from calofm.hub import load_model

FIXED_ENERGIES_GEV = (10.0, 40.0, 90.0)
# Normal incidence, mid-module in ODD's 32-fold azimuth: at phi = 0 an ODD shower sits on a module crack and
# loses half its deposit (in the stand-in), a 2 pi / 32 structure in phi that the tiny model does not resolve.
FIXED_THETA, FIXED_PHI = math.pi / 2, math.pi / 32


def fixed_point_response(model, detectors, n: int = 200, seed: int = 7, phi: float = FIXED_PHI) -> list[dict]:
    """Mean total deposit of generated vs synthetic showers at fixed (E, FIXED_THETA, phi)."""
    rows = []
    for d in detectors:
        for e_gev in FIXED_ENERGIES_GEV:
            e = np.full(n, e_gev * 1e3, np.float32)
            t = np.full(n, FIXED_THETA, np.float32)
            p = np.full(n, phi, np.float32)
            data = generate(d, n, seed, energy=e, phi=p, theta=t).showers.sum(axis=(1, 2, 3)).mean()
            gen = generate_showers(model, d, e, t, p, seed=seed).showers.sum(axis=(1, 2, 3)).mean()
            rows.append({"detector": d, "energy_gev": e_gev, "data_mev": float(data), "model_mev": float(gen),
                         "ratio": float(gen / data)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder or Hub repo id")
    p.add_argument("--detectors", nargs="*", help="default: the model's slot map")
    p.add_argument("--phi", type=float, default=FIXED_PHI, help=f"incident phi [rad] (default pi/32 = {FIXED_PHI:.4f})")
    p.add_argument("--n", type=int, default=200, help="showers per point")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args()
    model = load_model(args.model)
    rows = fixed_point_response(model, args.detectors or list(model.slot_map), n=args.n, phi=args.phi)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"theta = pi/2, phi = {args.phi:.4f} rad ({args.phi / math.pi:.4f} pi), {args.n} showers a point")
    print(f"{'detector':14s} {'E [GeV]':>7s} {'data [MeV]':>11s} {'model [MeV]':>11s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['detector']:14s} {r['energy_gev']:7.0f} {r['data_mev']:11.1f} {r['model_mev']:11.1f} "
              f"{r['ratio']:6.3f}")


if __name__ == "__main__":
    main()
