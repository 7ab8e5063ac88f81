"""`evaluate`: compare generated showers with reference showers into one folder (metrics.json, PNGs, report.md).

The folder is self-contained: report.md links the PNGs beside it by relative paths, and metrics.json holds every
number of the report (and the settings that produced it), so studies read it instead of parsing markdown.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import ks_2samp
from tqdm.auto import tqdm

from calofm.data.formats import Showers, open_showers
from calofm.evaluate import metrics as M
from calofm.evaluate import observables as O
from calofm.evaluate import plots as P
from calofm.evaluate.response import response_table
from calofm.geometry import DETECTORS, DPHI, DR_MM, DZ_MM, N_PHI, N_R, N_Z
from calofm.io import atomic_write_text
from calofm.templates import render

METRICS = ("response", "observables", "fpd", "kpd", "fpd_cc", "kpd_cc", "auc_low", "auc_high", "coherence",
           "prdc", "fixed_points")
# CaloDiT-2 on CaloChallenge dataset 2 (its paper, Table 1): (EDM, CD). Its FPD and KPD are the
# CaloChallenge evaluation's, so they sit beside fpd_cc / kpd_cc, not beside calofm's own fpd / kpd.
PAPER_DS2 = {"auc_low": (0.594, 0.598), "auc_high": (0.560, 0.695), "fpd_cc": (20.1e-3, 68.8e-3),
             "kpd_cc": (0.089e-3, 0.39e-3)}
CC_FEATURES = len(O.calochallenge_names())
# Which definition each FPD/KPD number is: written beside every value (metrics.json, report.md, the CLI).
DEFINITIONS = {
    "fpd": f"FPD (calofm definition: {len(O.high_level_names())} calofm high-level features, batches without "
           "replacement; not comparable with CaloChallenge numbers)",
    "kpd": f"KPD (calofm definition: {len(O.high_level_names())} calofm high-level features, batches without "
           "replacement; not comparable with CaloChallenge numbers)",
    "fpd_cc": f"FPD (CaloChallenge definition: {CC_FEATURES} CaloChallenge high-level features, jetnet.fpd with "
              "replacement)",
    "kpd_cc": f"KPD (CaloChallenge definition: {CC_FEATURES} CaloChallenge high-level features, jetnet.kpd with "
              "replacement)",
}
MAX_CLASSIFIER_SHOWERS = 20_000  # per sample: the low-level input is 6,481 floats a shower
MAX_SPECTRUM_SHOWERS = 5_000     # per sample: the voxel spectrum holds every hit cell
MIN_FIXED_POINT_SHOWERS = 10
# Windows around a chosen (E, theta, phi) when conditions are continuous: |ln(E/E0)| < 0.2, |theta - theta0| <
# 0.1 rad, and (when phi0 is given) an azimuthal distance < 0.2 rad.
FIXED_POINT_WINDOW = {"ln_energy": 0.2, "theta": 0.1, "phi": 0.2}
DEFAULT_FIXED_POINTS = ((10_000.0, math.pi / 2, None), (50_000.0, math.pi / 2, None), (50_000.0, 1.2, None))
MAX_DISCRETE_POINTS = 20  # a sample with at most this many distinct conditions is a fixed-point sample
CONDITION_KS_PVALUE = 1e-3
CONDITION_RANGE_TOL = 0.05  # fraction of the reference range an edge may be short of

_CONDITIONS = {"energy": ("incident energy E_inc", "MeV", True), "theta": ("polar angle theta", "rad", False),
               "phi": ("azimuth phi", "rad", False)}


@dataclass
class _Sample:
    role: str
    source: str
    showers: Showers
    format: str | None = None
    detector: str | None = None
    attrs: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"source": self.source, "n": len(self.showers), "format": self.format, "detector": self.detector,
                "synthetic": bool(self.attrs.get("synthetic", False)), "generator": self.attrs.get("generator")}


def _load(x, role: str, max_showers: int | None) -> _Sample:
    if isinstance(x, Showers):
        s = x if max_showers is None else x[:max_showers]
        return _Sample(role, "<in-memory Showers>", s)
    with open_showers(x) as f:
        return _Sample(role, str(x), f.read(0, max_showers), f.format, f.detector, dict(f.attrs))


# ------------------------------------------------------------------------------------------------- conditions


def check_conditions(reference: Showers, generated: Showers) -> tuple[dict, list[str]]:
    """Ranges and a two-sample KS test of E, theta, phi; warnings where the generated conditions do not cover
    the reference ones (or go beyond them) or are distributed differently: the metrics then compare unlike."""
    out, notes = {}, []
    for name, (label, unit, _) in _CONDITIONS.items():
        r, g = getattr(reference, name).astype(np.float64), getattr(generated, name).astype(np.float64)
        rng_r, rng_g = (float(r.min()), float(r.max())), (float(g.min()), float(g.max()))
        tol = CONDITION_RANGE_TOL * (rng_r[1] - rng_r[0]) or 1e-3 * max(abs(rng_r[1]), 1e-6)
        p = float(ks_2samp(r, g).pvalue)
        out[name] = {"reference": list(rng_r), "generated": list(rng_g), "ks_pvalue": p, "unit": unit}
        if rng_g[0] > rng_r[0] + tol or rng_g[1] < rng_r[1] - tol:
            notes.append(f"generated {label} covers [{rng_g[0]:.4g}, {rng_g[1]:.4g}] {unit}, less than the "
                         f"reference [{rng_r[0]:.4g}, {rng_r[1]:.4g}] {unit}")
        if rng_g[0] < rng_r[0] - tol or rng_g[1] > rng_r[1] + tol:
            notes.append(f"generated {label} reaches beyond the reference range [{rng_r[0]:.4g}, {rng_r[1]:.4g}] "
                         f"{unit}: [{rng_g[0]:.4g}, {rng_g[1]:.4g}] {unit}")
        if p < CONDITION_KS_PVALUE:
            notes.append(f"generated and reference {label} are distributed differently (KS p-value {p:.2g})")
    return out, notes


# ------------------------------------------------------------------------------------------------- fixed points


def _distinct_conditions(s: Showers) -> np.ndarray:
    return np.unique(np.stack([s.energy, s.theta, s.phi], axis=1), axis=0)


def _in_window(s: Showers, point: tuple[float, float, float | None], exact: bool) -> np.ndarray:
    e0, theta0, phi0 = point
    if exact:
        return (np.isclose(s.energy, e0, rtol=1e-5) & np.isclose(s.theta, theta0, atol=1e-5)
                & np.isclose(s.phi, phi0, atol=1e-5))
    keep = (np.abs(np.log(s.energy / e0)) < FIXED_POINT_WINDOW["ln_energy"]) & (
        np.abs(s.theta - theta0) < FIXED_POINT_WINDOW["theta"])
    if phi0 is not None:
        keep &= np.abs((s.phi - phi0 + math.pi) % (2 * math.pi) - math.pi) < FIXED_POINT_WINDOW["phi"]
    return keep


def fixed_point_comparison(reference: Showers, generated: Showers, ref_obs: dict, gen_obs: dict,
                           points=None) -> list[dict]:
    """Per chosen (E [MeV], theta, phi or None) point: mean and spread of every shower observable in both samples
    and the pull of the means. A reference with few distinct conditions (a fixed-point validation set) is
    compared exactly at the conditions both samples share; otherwise within `FIXED_POINT_WINDOW`."""
    exact = points is None and len(_distinct_conditions(reference)) <= MAX_DISCRETE_POINTS
    if exact:
        gen_points = {tuple(np.round(c, 5)) for c in _distinct_conditions(generated)}
        points = [tuple(map(float, c)) for c in _distinct_conditions(reference) if tuple(np.round(c, 5)) in gen_points]
    elif points is None:
        points = DEFAULT_FIXED_POINTS
    rows = []
    for point in points:
        sel_r, sel_g = _in_window(reference, point, exact), _in_window(generated, point, exact)
        row = {"energy_mev": point[0], "theta": point[1], "phi": point[2], "exact": exact,
               "n_reference": int(sel_r.sum()), "n_generated": int(sel_g.sum()), "observables": {}}
        if min(row["n_reference"], row["n_generated"]) >= MIN_FIXED_POINT_SHOWERS:
            for key in O.SHOWER_OBSERVABLES:
                a, b = ref_obs[key][sel_r], gen_obs[key][sel_g]
                err = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
                row["observables"][key] = {
                    "reference_mean": float(a.mean()), "reference_std": float(a.std(ddof=1)),
                    "generated_mean": float(b.mean()), "generated_std": float(b.std(ddof=1)),
                    "pull": float((b.mean() - a.mean()) / err) if err > 0 else 0.0}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- evaluate


def _selected(metrics) -> list[str]:
    if metrics is None:
        return list(METRICS)
    names = [m.strip() for item in ([metrics] if isinstance(metrics, str) else metrics) for m in item.split(",")]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(METRICS)}")
    return [m for m in METRICS if m in names]


def _subsample(s: Showers, n: int, seed: int) -> Showers:
    if len(s) <= n:
        return s
    return s[np.sort(np.random.default_rng(seed).choice(len(s), n, replace=False))]


def _observable_plots(out: Path, ref: Showers, gen: Showers, ref_obs: dict, gen_obs: dict, labels, seed: int,
                      result: dict) -> None:
    sep, plots = {}, []
    for key, (label, unit) in O.SHOWER_OBSERVABLES.items():
        a, b = ref_obs[key], gen_obs[key]
        edges = M.histogram_edges(a, b)
        sep[key] = M.separation_power(a, b, edges)
        xlabel = f"{label} [{unit}]" if unit else label
        plots.append(P.hist_ratio(out / f"obs_{key}.png", a, b, edges, xlabel,
                                  f"{label}: separation power {sep[key]:.2g}", labels))
    va = O.voxel_spectrum(_subsample(ref, MAX_SPECTRUM_SHOWERS, seed).showers)
    vb = O.voxel_spectrum(_subsample(gen, MAX_SPECTRUM_SHOWERS, seed + 1).showers)
    edges = M.histogram_edges(va, vb, bins=50, log=True, quantiles=(0.0, 1.0))
    sep["voxel_energy"] = M.separation_power(va, vb, edges)
    plots.append(P.hist_ratio(out / "obs_voxel_energy.png", va, vb, edges, "cell energy [MeV]",
                              f"voxel energy spectrum (cells > 15.15 keV): separation power "
                              f"{sep['voxel_energy']:.2g}", labels, log_x=True, log_y=True, entries="cells"))
    layers = {k: O.energy_profile(s.showers, "z") for k, s in (("reference", ref), ("generated", gen))}
    layer_sep = []
    for z in range(N_Z):
        a, b = layers["reference"][:, z], layers["generated"][:, z]
        layer_sep.append(M.separation_power(a, b, M.histogram_edges(a, b, log=True))
                         if (a > 0).any() and (b > 0).any() else float("nan"))
    sep["e_layer_mean"] = float(np.nanmean(layer_sep))
    sep["e_layer_max"] = float(np.nanmax(layer_sep))
    result["separation_power_per_layer"] = [None if math.isnan(v) else v for v in layer_sep]
    for axis, n_bins, width, xlabel in (("z", N_Z, DZ_MM, "depth z [mm]"), ("r", N_R, DR_MM, "radius r [mm]"),
                                        ("phi", N_PHI, DPHI, "azimuth phi [rad]")):
        profiles = layers if axis == "z" else {k: O.energy_profile(s.showers, axis)
                                               for k, s in (("reference", ref), ("generated", gen))}
        plots.append(P.profile_ratio(out / f"profile_{axis}.png", np.arange(n_bins + 1) * width,
                                     profiles["reference"], profiles["generated"], xlabel,
                                     "mean energy per bin [MeV]", f"mean energy profile along {axis}", labels,
                                     log_y=axis != "phi"))
    plots.append(P.mean_images(out / "mean_shower.png", O.mean_shower(ref.showers), O.mean_shower(gen.showers),
                               f"mean shower (cells > 15.15 keV): {labels[0]} vs {labels[1]}"))
    result["separation_power"] = sep
    result["plots"] += [p.name for p in plots]


def evaluate(reference, generated, out_dir, metrics=None, detector: str | None = None, *, fixed_points=None,
             max_showers: int | None = None, seed: int = 0) -> dict:
    """Compare `generated` with `reference` (paths to LEMURS / CaloChallenge files, or `Showers`) and write
    `out_dir`/metrics.json, PNG plots and report.md; returns the metrics dict.

    `metrics`: names from `METRICS` (a list or a comma-separated string; default all). `detector` labels the
    report (default: the files' `detector` attribute). `fixed_points`: (E [MeV], theta, phi or None) triples
    (default: the shared conditions of a fixed-point sample, else `DEFAULT_FIXED_POINTS`). `max_showers` reads
    only the first N showers of each sample.
    """
    selected = _selected(metrics)
    if detector is not None and detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; known: {', '.join(DETECTORS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref, gen = _load(reference, "reference", max_showers), _load(generated, "generated", max_showers)
    for s in (ref, gen):
        if len(s.showers) < 10:
            raise ValueError(f"{s.role} {s.source} has {len(s.showers)} showers; evaluation needs at least 10")
    result: dict = {"reference": ref.describe(), "generated": gen.describe(),
                    "detector": detector or ref.detector or gen.detector, "metrics": selected, "plots": [],
                    "settings": {"seed": seed, "max_showers": max_showers, "segments": O.SEGMENTS,
                                 "high_level_features": len(O.high_level_names()),
                                 "calochallenge_features": CC_FEATURES, "calochallenge_seed": M.CC_SEED + seed,
                                 "calochallenge_fpd": M.CC_FPD, "calochallenge_kpd": M.CC_KPD,
                                 "max_classifier_showers": MAX_CLASSIFIER_SHOWERS,
                                 "classifier_repeats": M.CLASSIFIER_REPEATS}, "timing_s": {}}
    notes = []
    if ref.detector and gen.detector and ref.detector != gen.detector:
        notes.append(f"the files are of different detectors: reference {ref.detector}, generated {gen.detector}")
    if detector and ref.detector and detector != ref.detector:
        notes.append(f"--detector {detector} differs from the reference file's detector {ref.detector}")
    result["conditions"], cond_notes = check_conditions(ref.showers, gen.showers)
    notes += cond_notes
    labels = tuple(s.role if s.format is None else f"{s.role} ({Path(s.source).name})" for s in (ref, gen))
    for name, (label, unit, log) in _CONDITIONS.items():
        a, b = getattr(ref.showers, name), getattr(gen.showers, name)
        edges = M.histogram_edges(a, b, bins=30, log=log, quantiles=(0.0, 1.0))
        result["plots"].append(P.hist_ratio(out / f"condition_{name}.png", a, b, edges, f"{label} [{unit}]",
                                            f"condition: {label}", labels, log_x=log).name)

    need_obs = {"observables", "fixed_points"} & set(selected)
    ref_obs = O.shower_observables(ref.showers.showers, ref.showers.energy) if need_obs else None
    gen_obs = O.shower_observables(gen.showers.showers, gen.showers.energy) if need_obs else None
    hl = None
    if {"fpd", "kpd", "auc_high", "coherence", "prdc"} & set(selected):
        hl = [O.high_level_features(s.showers.showers, s.showers.energy) for s in (ref, gen)]
    cc = None
    if {"fpd_cc", "kpd_cc"} & set(selected):
        cc = [O.calochallenge_features(s.showers.showers, s.showers.energy) for s in (ref, gen)]

    steps = tqdm(selected, desc="evaluate", unit="metric")
    for name in steps:
        steps.set_postfix_str(name)
        t0 = time.perf_counter()
        if name == "observables":
            _observable_plots(out, ref.showers, gen.showers, ref_obs, gen_obs, labels, seed, result)
        elif name in ("fpd", "kpd"):
            value, error = (M.fpd if name == "fpd" else M.kpd)(hl[0], hl[1], seed=seed)
            result[name] = {"value": value, "error": error, "definition": DEFINITIONS[name]}
        elif name in ("fpd_cc", "kpd_cc"):
            # seed 0 (the default) draws the CaloChallenge's own batches: jetnet's seed 42
            fn = M.fpd_calochallenge if name == "fpd_cc" else M.kpd_calochallenge
            value, error = fn(cc[0], cc[1], seed=M.CC_SEED + seed)
            result[name] = {"value": value, "error": error, "definition": DEFINITIONS[name]}
        elif name == "auc_high":
            result[name] = dict(zip(("value", "error"), M.classifier_auc(hl[0], hl[1], seed=seed)))
        elif name == "auc_low":
            a = _subsample(ref.showers, MAX_CLASSIFIER_SHOWERS, seed)
            b = _subsample(gen.showers, MAX_CLASSIFIER_SHOWERS, seed + 1)
            result[name] = dict(zip(("value", "error"), M.classifier_auc(
                O.low_level_features(a.showers, a.energy), O.low_level_features(b.showers, b.energy), seed=seed)))
        elif name == "coherence":
            result[name] = {role: dict(zip(("value", "error"), M.bootstrap(O.centre_coherence, f, seed)))
                            for role, f in zip(("reference", "generated"), hl)}
        elif name == "prdc":
            result[name] = M.prdc(hl[0], hl[1])
        elif name == "fixed_points":
            result[name] = fixed_point_comparison(ref.showers, gen.showers, ref_obs, gen_obs, fixed_points)
        elif name == "response":
            result[name] = response_table(ref.showers.showers, ref.showers.energy, gen.showers.showers,
                                          gen.showers.energy)
        result["timing_s"][name] = round(time.perf_counter() - t0, 3)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    result["warnings"] = notes
    atomic_write_text(out / "metrics.json", json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.md", render_report(result))
    return result


def _json_safe(obj):
    """`obj` with every non-finite float as null: strict JSON for other readers (a model that deposits nothing
    in a bin has an infinite spread ratio; the returned dict and report.md keep the inf)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


# ------------------------------------------------------------------------------------------------- report.md


def render_report(result: dict) -> str:
    """report.md from the metrics dict (`calofm/templates/report.md.j2`): files compared, warnings, metrics with
    errors, plots."""
    labels = {k: v[0] for k, v in O.SHOWER_OBSERVABLES.items()}
    labels |= {"voxel_energy": "voxel energy spectrum", "e_layer_mean": "energy per layer (mean over layers)",
               "e_layer_max": "energy per layer (worst layer)"}
    return render("report.md.j2", r=result, paper=PAPER_DS2, definitions=DEFINITIONS, cc_features=CC_FEATURES,
                  cc_seed=M.CC_SEED, labels=labels,
                  generators=sorted({result[k]["generator"] for k in ("reference", "generated") if result[k]["generator"]}),
                  timing=", ".join(f"{k} {v:.1f} s" for k, v in result["timing_s"].items()))
