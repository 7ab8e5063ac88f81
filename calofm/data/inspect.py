"""What is in a shower file: conditions, response, sparsity and mean profiles, computed streaming over chunks.

Statistics see the showers as the CaloChallenge evaluation does: cells below 15.15 keV are zeroed first.
`summarize` returns plain Python values (JSON-ready) for the CLI, the demo and tests; `format_summary` and
`plot_summary` only present them.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from calofm.data.formats import open_showers
from calofm.geometry import E_MIN_MEV, N_CELLS, N_R, N_Z, THRESHOLD_MEV
from calofm.io import atomic_path

PLOTS = ("longitudinal_profile.png", "radial_profile.png", "response_vs_energy.png")


def summarize(path: str | Path, n_energy_bins: int = 4, chunk_size: int = 1024) -> dict:
    """One pass over `path`; response E_dep/E_inc also in `n_energy_bins` log-spaced bins of [1 GeV, Emax]."""
    with open_showers(path) as f:
        n = len(f)
        edges = np.geomspace(E_MIN_MEV, f.emax_mev, n_energy_bins + 1)
        bin_n = np.zeros(n_energy_bins, np.int64)
        bin_sum = np.zeros(n_energy_bins)
        bin_sq = np.zeros(n_energy_bins)
        longitudinal = np.zeros(N_Z)
        radial = np.zeros(N_R)
        hits = 0
        ranges = {k: [np.inf, -np.inf] for k in ("energy", "theta", "phi")}
        with tqdm(total=n, unit="shower", desc=f"inspect {f.path.name}") as bar:
            for s in f.iter_chunks(chunk_size):
                x = np.where(s.showers >= THRESHOLD_MEV, s.showers, np.float32(0))
                hits += int(np.count_nonzero(x))
                longitudinal += x.sum(axis=(1, 2), dtype=np.float64).sum(axis=0)
                radial += x.sum(axis=(2, 3), dtype=np.float64).sum(axis=0)
                response = x.sum(axis=(1, 2, 3), dtype=np.float64) / s.energy
                b = np.clip(np.searchsorted(edges, s.energy, side="right") - 1, 0, n_energy_bins - 1)
                bin_n += np.bincount(b, minlength=n_energy_bins)
                bin_sum += np.bincount(b, response, minlength=n_energy_bins)
                bin_sq += np.bincount(b, response**2, minlength=n_energy_bins)
                for k, r in ranges.items():
                    v = getattr(s, k)
                    r[0], r[1] = min(r[0], float(v.min())), max(r[1], float(v.max()))
                bar.update(len(s))
        attrs, fmt, detector = f.attrs, f.format, f.detector

    def mean_std(count, total, sq):
        if count == 0:
            return None, None
        mean = total / count
        return float(mean), float(np.sqrt(max(sq / count - mean**2, 0.0)))

    mean, std = mean_std(n, bin_sum.sum(), bin_sq.sum())
    longitudinal /= n
    radial /= n
    return {
        "path": str(path),
        "format": fmt,
        "detector": detector,
        "synthetic": bool(attrs.get("synthetic", False)),
        "generator": attrs.get("generator"),
        "n": n,
        "energy_mev": ranges["energy"],
        "theta": ranges["theta"],
        "phi": ranges["phi"],
        "response_mean": mean,
        "response_std": std,
        "response_bins": [
            {"e_lo_mev": float(lo), "e_hi_mev": float(hi), "n": int(c), "mean": m, "std": sd}
            for lo, hi, c, (m, sd) in zip(edges[:-1], edges[1:], bin_n,
                                          map(mean_std, bin_n, bin_sum, bin_sq), strict=True)
        ],
        "sparsity": hits / (n * N_CELLS),
        "longitudinal_mev": longitudinal.tolist(),
        "radial_mev": radial.tolist(),
        "shower_max_layer": int(np.argmax(longitudinal)),
        "longitudinal_centroid": _centroid(longitudinal),
        "radial_centroid": _centroid(radial),
    }


def _centroid(profile: np.ndarray) -> float | None:
    """Energy-weighted mean cell index (cell centres at i + 0.5), None for an empty profile."""
    total = profile.sum()
    return float(((np.arange(len(profile)) + 0.5) * profile).sum() / total) if total > 0 else None


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_summary(s: dict) -> str:
    """The summary as aligned text lines for a terminal."""
    gen = f"yes ({s['generator']})" if s["synthetic"] else "no"
    lines = [
        f"file          {s['path']}",
        f"format        {s['format']}",
        f"detector      {s['detector'] or 'unknown'}",
        f"synthetic     {gen}",
        f"N             {s['n']}",
        f"E [GeV]       {s['energy_mev'][0] / 1e3:.4g} .. {s['energy_mev'][1] / 1e3:.4g}",
        f"theta [rad]   {s['theta'][0]:.4f} .. {s['theta'][1]:.4f}",
        f"phi [rad]     {s['phi'][0]:.4f} .. {s['phi'][1]:.4f}",
        f"E_dep/E_inc   {_fmt(s['response_mean'], '.4g')} +- {_fmt(s['response_std'], '.3g')} (std)",
        "  E bin [GeV]          n    mean        std",
    ]
    for b in s["response_bins"]:
        span = f"{b['e_lo_mev'] / 1e3:.4g} - {b['e_hi_mev'] / 1e3:.4g}"
        lines.append(f"  {span:<16}{b['n']:>7}    {_fmt(b['mean'], '.4g'):<10}  {_fmt(b['std'], '.3g')}")
    lines += [
        f"sparsity      {s['sparsity']:.4f} of cells >= {THRESHOLD_MEV * 1e3:.2f} keV",
        f"longitudinal  max at layer {s['shower_max_layer']}, centroid {_fmt(s['longitudinal_centroid'], '.2f')} "
        "layers; mean MeV per layer z:",
        _wrap(s["longitudinal_mev"]),
        f"radial        centroid {_fmt(s['radial_centroid'], '.2f')} cells; mean MeV per ring r:",
        _wrap(s["radial_mev"]),
    ]
    return "\n".join(lines)


def _wrap(values: list[float]) -> str:
    return textwrap.fill(" ".join(f"{v:.3g}" for v in values), width=108, initial_indent="  ",
                         subsequent_indent="  ")


def plot_summary(s: dict, out_dir: str | Path) -> list[Path]:
    """Write the longitudinal and radial profiles and the response vs incident energy as PNGs into `out_dir`."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    title = f"{Path(s['path']).name} ({s['detector'] or 'unknown detector'}, N={s['n']})"

    def axes(xlabel: str, ylabel: str):
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.add_subplot()
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        return fig, ax

    figs = {}
    figs[PLOTS[0]], ax = axes("layer z", "mean energy per layer [MeV]")
    ax.step(np.arange(N_Z), s["longitudinal_mev"], where="mid")
    figs[PLOTS[1]], ax = axes("radial ring r", "mean energy per ring [MeV]")
    ax.step(np.arange(N_R), s["radial_mev"], where="mid")
    figs[PLOTS[2]], ax = axes("incident energy [GeV]", "E_dep / E_inc (mean +- std)")
    bins = [b for b in s["response_bins"] if b["n"]]
    ax.set_xscale("log")
    ax.errorbar([np.sqrt(b["e_lo_mev"] * b["e_hi_mev"]) / 1e3 for b in bins], [b["mean"] for b in bins],
                yerr=[b["std"] for b in bins], fmt="o", capsize=3)

    written = []
    for name, fig in figs.items():
        path = Path(out_dir) / name
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
        written.append(path)
    return written
