"""Evaluation figures: histograms and profiles with a generated/reference ratio panel, mean shower images.

Figures are `matplotlib.figure.Figure` objects, not pyplot's: no global state and no backend to choose (the
caller's matplotlib setup is left alone); each is written atomically as a PNG. Histograms are
normalised to unit area, so they compare shapes; the ratio panel shows generated / reference per bin with the
Poisson error of both counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from calofm.geometry import DPHI, DR_MM, DZ_MM, N_PHI, N_R, N_Z
from calofm.io import atomic_path

COLORS = {"reference": "0.45", "generated": "tab:red"}
RATIO_RANGE = (0.5, 1.5)
DPI = 110


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _ratio_axes(title: str):
    fig = Figure(figsize=(6.4, 5.6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1), "hspace": 0.06})
    top.set_title(title, fontsize=11)
    bottom.axhline(1.0, color="0.3", lw=0.8, ls="--")
    bottom.set_ylim(*RATIO_RANGE)
    bottom.set_ylabel("gen. / ref.")
    return fig, top, bottom


def _draw_ratio(ax, x, num, num_err, den, den_err, xerr=None) -> None:
    """gen/ref with propagated errors; bins where either is empty are left out, off-scale points drawn as arrows."""
    ok = (den > 0) & (num > 0)
    ratio = np.where(ok, num / np.where(ok, den, 1), np.nan)
    err = ratio * np.sqrt((num_err / np.where(ok, num, 1)) ** 2 + (den_err / np.where(ok, den, 1)) ** 2)
    ax.errorbar(x, ratio, yerr=err, xerr=xerr, fmt="o", ms=2.5, color=COLORS["generated"], lw=0.8)
    lo, hi = RATIO_RANGE
    for y, marker in ((hi, "^"), (lo, "v")):
        off = ok & ((ratio > hi) if marker == "^" else (ratio < lo))
        ax.plot(np.asarray(x)[off], np.full(off.sum(), y - 0.03 if marker == "^" else y + 0.03), marker,
                color=COLORS["generated"], ms=4, ls="none")


def hist_ratio(path: str | Path, reference: np.ndarray, generated: np.ndarray, edges: np.ndarray, xlabel: str,
               title: str, labels: tuple[str, str] = ("reference", "generated"), log_x: bool = False,
               log_y: bool = False, entries: str = "showers") -> Path:
    """Unit-area histograms of one observable for both samples, with a ratio panel; `entries` names what
    is counted in the legend."""
    fig, top, bottom = _ratio_axes(title)
    widths = np.diff(edges)
    centres = np.sqrt(edges[1:] * edges[:-1]) if log_x else (edges[1:] + edges[:-1]) / 2
    counts = {}
    for name, values, label in (("reference", reference, labels[0]), ("generated", generated, labels[1])):
        c = np.histogram(values, edges)[0].astype(np.float64)
        area = max(c.sum(), 1.0) * widths
        counts[name] = (c / area, np.sqrt(c) / area)
        if name == "reference":
            top.stairs(c / area, edges, fill=True, color=COLORS[name], alpha=0.35,
                       label=f"{label} ({len(values):,} {entries})")
        else:
            top.stairs(c / area, edges, color=COLORS[name], lw=1.6, label=f"{label} ({len(values):,} {entries})")
    top.set_ylabel("normalised entries / bin width")
    top.legend(fontsize=8, frameon=False)
    if log_y:
        top.set_yscale("log")
    if log_x:
        top.set_xscale("log")
    _draw_ratio(bottom, centres, *counts["generated"], *counts["reference"])
    bottom.set_xlabel(xlabel)
    return _save(fig, path)


def profile_ratio(path: str | Path, edges: np.ndarray, reference: np.ndarray, generated: np.ndarray, xlabel: str,
                  ylabel: str, title: str, labels: tuple[str, str] = ("reference", "generated"),
                  log_y: bool = False) -> Path:
    """Mean per bin of a per-shower profile (N, bins), e.g. energy per layer, with errors of the mean and ratio."""
    fig, top, bottom = _ratio_axes(title)
    centres = (edges[1:] + edges[:-1]) / 2
    stats = {}
    for name, values, label in (("reference", reference, labels[0]), ("generated", generated, labels[1])):
        values = np.asarray(values, dtype=np.float64)
        mean, err = values.mean(0), values.std(0) / np.sqrt(max(len(values), 1))
        stats[name] = (mean, err)
        if name == "reference":
            top.stairs(mean, edges, fill=True, color=COLORS[name], alpha=0.35,
                       label=f"{label} ({len(values):,} showers)")
        else:
            top.errorbar(centres, mean, yerr=err, fmt="o", ms=3, color=COLORS[name], lw=1,
                         label=f"{label} ({len(values):,} showers)")
    top.set_ylabel(ylabel)
    top.legend(fontsize=8, frameon=False)
    if log_y:
        top.set_yscale("log")
    _draw_ratio(bottom, centres, *stats["generated"], *stats["reference"])
    bottom.set_xlabel(xlabel)
    return _save(fig, path)


def _log_norm(images) -> LogNorm:
    """One log colour scale for both samples' images, spanning at most 6 decades below the maximum."""
    positive = np.concatenate([a[a > 0] for a in images])
    if positive.size == 0:
        return LogNorm(vmin=1e-3, vmax=1.0)
    return LogNorm(vmin=max(positive.min(), positive.max() * 1e-6), vmax=positive.max())


def mean_images(path: str | Path, reference: np.ndarray, generated: np.ndarray, title: str) -> Path:
    """Mean shower (r, phi, z) of both samples: side view (z, r) summed over phi and front view (phi, r) summed
    over z, each with the generated / reference ratio."""
    fig = Figure(figsize=(14, 8.5))
    fig.suptitle(title, fontsize=12)
    z_edges, r_edges = np.arange(N_Z + 1) * DZ_MM, np.arange(N_R + 1) * DR_MM
    phi_edges = np.arange(N_PHI + 1) * DPHI
    samples = {"reference": reference, "generated": generated}
    views = {"side": ({k: v.sum(axis=1) for k, v in samples.items()}, "sum over phi"),  # (r, z)
             "front": ({k: v.sum(axis=2) for k, v in samples.items()}, "sum over z")}   # (r, phi)
    for row, (view, (images, how)) in enumerate(views.items()):
        norm = _log_norm(images.values())
        den = images["reference"]
        ratio = np.where(den > 0, images["generated"] / np.where(den > 0, den, 1), np.nan)
        panels = [(images["reference"], norm, "viridis", f"reference: {view} view ({how})"),
                  (images["generated"], norm, "viridis", f"generated: {view} view ({how})"),
                  (ratio, Normalize(*RATIO_RANGE), "coolwarm", f"generated / reference: {view} view")]
        for col, (img, img_norm, cmap, name) in enumerate(panels):
            if view == "side":
                ax = fig.add_subplot(2, 3, 3 * row + col + 1)
                mesh = ax.pcolormesh(z_edges, r_edges, np.ma.masked_invalid(img), norm=img_norm, cmap=cmap)
                ax.set_xlabel("depth z [mm]")
                ax.set_ylabel("radius r [mm]")
            else:
                ax = fig.add_subplot(2, 3, 3 * row + col + 1, projection="polar")
                mesh = ax.pcolormesh(phi_edges, r_edges, np.ma.masked_invalid(img), norm=img_norm, cmap=cmap)
                ax.set_yticks(r_edges[3::3], [f"{r:.0f} mm" for r in r_edges[3::3]], fontsize=7)
                ax.set_rlabel_position(67.5)
                ax.tick_params(axis="x", labelsize=7)
            ax.set_title(name, fontsize=9.5, pad=12 if view == "front" else 6)
            fig.colorbar(mesh, ax=ax, shrink=0.8, pad=0.1 if view == "front" else 0.03,
                         label="ratio" if cmap == "coolwarm" else "mean energy [MeV]")
    fig.subplots_adjust(hspace=0.4, wspace=0.45)
    return _save(fig, path)
