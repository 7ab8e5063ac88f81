"""Energy response and resolution per incident-energy bin: the first thing a calorimeter physicist checks.

For each of `bins` log-spaced bins of E_inc (edges from the reference sample), the mean of R = E_dep / E_inc and its
relative spread sigma(R) / mean(R), in the reference and the generated sample, and their ratios generated /
reference, each with its statistical error (standard error of the mean; of the standard deviation,
sigma / sqrt(2 (n - 1)), exact for a Gaussian), propagated into the ratios. E_dep counts cells above the
15.15 keV threshold, as everywhere in calofm.evaluate.
"""

from __future__ import annotations

import numpy as np

from calofm.data.transforms import deposit

N_BINS = 5
MIN_SHOWERS_PER_BIN = 10


def response(showers: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """R = E_dep / E_inc per shower, from (N, ...) cell energies and (N,) incident energies, both in MeV."""
    return deposit(np.asarray(showers, dtype=np.float64)) / np.asarray(energy, dtype=np.float64)


def _stats(r: np.ndarray) -> dict:
    n = len(r)
    mean, std = float(r.mean()), float(r.std(ddof=1))
    mean_err, std_err = std / np.sqrt(n), std / np.sqrt(2 * (n - 1))
    if mean <= 0:  # nothing deposited in the whole bin (a broken model): no relative spread to compare
        return {"n": n, "mean": mean, "mean_error": mean_err, "rel_spread": np.inf, "rel_spread_error": np.inf}
    rel = std / mean
    rel_err = rel * np.hypot(std_err / std, mean_err / mean) if std > 0 else 0.0
    return {"n": n, "mean": mean, "mean_error": mean_err, "rel_spread": rel, "rel_spread_error": float(rel_err)}


def _ratio(a: float, a_err: float, b: float, b_err: float) -> tuple[float, float]:
    q = a / b
    if not np.isfinite(q):
        return float(q), np.inf
    return q, abs(q) * float(np.hypot(a_err / a if a else 0.0, b_err / b))


def energy_bins(ref_energy: np.ndarray, bins: int = N_BINS) -> np.ndarray:
    """`bins` + 1 log-spaced E_inc edges spanning the reference sample; the last edge nudged up so that its
    highest energy falls inside."""
    edges = np.geomspace(ref_energy.min(), ref_energy.max(), bins + 1)
    edges[-1] = np.nextafter(edges[-1], np.inf)
    return edges


def response_table(ref_showers, ref_energy, gen_showers, gen_energy, bins: int = N_BINS) -> list[dict]:
    """One row per log-spaced E_inc bin: reference and generated mean response and relative spread, and the
    ratios generated / reference with errors. Bins with fewer than MIN_SHOWERS_PER_BIN showers in either sample
    are left out."""
    ref_energy, gen_energy = np.asarray(ref_energy, np.float64), np.asarray(gen_energy, np.float64)
    r_ref, r_gen = response(ref_showers, ref_energy), response(gen_showers, gen_energy)
    edges = energy_bins(ref_energy, bins)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        a, b = r_ref[(ref_energy >= lo) & (ref_energy < hi)], r_gen[(gen_energy >= lo) & (gen_energy < hi)]
        if min(len(a), len(b)) < MIN_SHOWERS_PER_BIN:
            continue
        ref, gen = _stats(a), _stats(b)
        mean_ratio = _ratio(gen["mean"], gen["mean_error"], ref["mean"], ref["mean_error"])
        spread_ratio = _ratio(gen["rel_spread"], gen["rel_spread_error"], ref["rel_spread"], ref["rel_spread_error"])
        rows.append({"e_low_mev": float(lo), "e_high_mev": float(min(hi, ref_energy.max())), "reference": ref,
                     "generated": gen, "mean_ratio": mean_ratio[0], "mean_ratio_error": mean_ratio[1],
                     "spread_ratio": spread_ratio[0], "spread_ratio_error": spread_ratio[1]})
    return rows
