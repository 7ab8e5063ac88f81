"""Shower observables of the CaloChallenge evaluation, on the shared (r, phi, z) mesh.

Every function first zeroes cells below 15.15 keV (`THRESHOLD_MEV`), as the CaloChallenge evaluation does, so
generated and reference showers are seen alike. Transverse positions are the Cartesian coordinates of the cell
centres, x = r cos(phi) and y = r sin(phi) (the "eta/phi-like" axes of the CaloChallenge dataset-2 features),
plus the radius r; z is the depth along the particle direction. Lengths are in mm, energies in MeV.

`high_level_features` is the feature vector of FPD, KPD, the high-level classifier and PRDC: log10 E_inc,
E_dep/E_inc, the longitudinal centre and width, and for each of `segments` longitudinal segments (groups of
consecutive z layers) log10 of its energy, its centres and widths in x, y and r (in units of 100 mm, the
CaloChallenge scaling) and its fraction of hit cells: 4 + 8 x segments columns. The CaloChallenge uses every
layer (segments=45, 364 columns here); FPD's extrapolation to N = inf is only unbiased for N >> D (at N = 2,000
two samples of one distribution give an FPD many errors above zero with 45 segments, consistent with zero with
5), so the default is 5 segments of 9 layers (~30 mm, ~7 X0 in SiW): 44 columns, sound from ~1,000 showers.

`calochallenge_features` is instead the CaloChallenge evaluation's own FPD/KPD input for dataset 2, column for
column (362 columns); `metrics.fpd_calochallenge` / `kpd_calochallenge` score it the CaloChallenge's way.
"""

from __future__ import annotations

import numpy as np

from calofm import geometry
from calofm.geometry import N_CELLS, N_PHI, N_R, N_Z, SHAPE, THRESHOLD_MEV

R_CENTRES = np.array(geometry.R_CENTRES)
PHI_CENTRES = np.array(geometry.PHI_CENTRES)
Z_CENTRES = np.array(geometry.Z_CENTRES)
_X, _Y = geometry.CELL_X, geometry.CELL_Y  # (r, phi)
_R = np.broadcast_to(R_CENTRES[:, None], (N_R, N_PHI)).astype(np.float64)

# Offset inside log10 of segment energies (MeV): the cell threshold, so an empty segment reads log10(0.01515)
# = -1.8, just below the smallest deposit, not an outlier (the CaloChallenge's 1e-8 MeV puts it at -8, and
# FPD/KPD then hinge on whether a sample happens to hold one shower with an empty segment).
LOG_EPS = THRESHOLD_MEV
# Offset inside the log of voxel energies (MeV) for the low-level classifier, as in the model's preprocessing.
VOXEL_LOG_EPS = 1e-6
CHUNK = 1024

# Per-shower scalar observables: key -> (axis label, unit). The order is the order of plots and tables.
SHOWER_OBSERVABLES: dict[str, tuple[str, str]] = {
    "e_ratio": ("E_dep / E_inc", ""),
    "n_hit": ("number of hit cells", ""),
    "c_x": ("centre of energy in x", "mm"),
    "c_y": ("centre of energy in y", "mm"),
    "c_r": ("centre of energy in r", "mm"),
    "c_z": ("centre of energy in z (depth)", "mm"),
    "w_x": ("width in x", "mm"),
    "w_y": ("width in y", "mm"),
    "w_r": ("width in r", "mm"),
    "w_z": ("width in z (depth)", "mm"),
}

SEGMENTS = 5
_SEGMENT_BLOCKS = ("log10_e_segment", "c_x", "c_y", "w_x", "w_y", "c_r", "w_r", "hit_fraction")


def high_level_names(segments: int = SEGMENTS) -> list[str]:
    """Column names of `high_level_features(..., segments)`."""
    return ["log10_e_inc", "e_ratio", "c_z", "w_z"] + [
        f"{block}[{i}]" for block in _SEGMENT_BLOCKS for i in range(segments)]


def apply_threshold(showers: np.ndarray) -> np.ndarray:
    """Zero every cell below 15.15 keV (returns a new float32 array)."""
    showers = np.asarray(showers, dtype=np.float32)
    return np.where(showers >= THRESHOLD_MEV, showers, np.float32(0))


def _check(showers: np.ndarray, energy: np.ndarray | None = None) -> None:
    if showers.ndim != 4 or showers.shape[1:] != SHAPE:
        raise ValueError(f"showers have shape {showers.shape}; expected (N, {N_R}, {N_PHI}, {N_Z})")
    if energy is not None and np.shape(energy) != (len(showers),):
        raise ValueError(f"energy has shape {np.shape(energy)}; expected ({len(showers)},)")


def _moments(weights: np.ndarray, coord: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Energy-weighted centre and width of `coord` (broadcast against `weights`); 0 where no energy."""
    total = weights.sum(axis=axes)
    safe = np.where(total > 0, total, 1.0)
    m1 = (weights * coord).sum(axis=axes) / safe
    m2 = (weights * coord**2).sum(axis=axes) / safe
    return m1, np.sqrt(np.clip(m2 - m1**2, 0.0, None))


_PROFILE_AXES = {"r": (N_R, (2, 3)), "phi": (N_PHI, (1, 3)), "z": (N_Z, (1, 2))}


def energy_profile(showers: np.ndarray, axis: str) -> np.ndarray:
    """Energy per bin of one mesh axis, "r", "phi" or "z" (N, bins) in MeV, after the threshold.

    axis="z" gives the energy per layer, the source of the longitudinal profile."""
    showers = np.asarray(showers)
    _check(showers)
    if axis not in _PROFILE_AXES:
        raise ValueError(f"axis = {axis!r}; expected one of {', '.join(_PROFILE_AXES)}")
    bins, summed = _PROFILE_AXES[axis]
    out = np.zeros((len(showers), bins))
    for i in range(0, len(showers), CHUNK):
        out[i:i + CHUNK] = apply_threshold(showers[i:i + CHUNK]).sum(axis=summed, dtype=np.float64)
    return out


def _global_observables(x: np.ndarray, e_inc: np.ndarray) -> dict[str, np.ndarray]:
    """`SHOWER_OBSERVABLES` of one chunk of thresholded float64 showers x (n, r, phi, z)."""
    out = {"e_ratio": x.sum(axis=(1, 2, 3)) / e_inc,
           "n_hit": np.count_nonzero(x, axis=(1, 2, 3)).astype(np.float64)}
    for name, coord in (("x", _X[:, :, None]), ("y", _Y[:, :, None]), ("r", _R[:, :, None]),
                        ("z", Z_CENTRES[None, None, :])):
        out[f"c_{name}"], out[f"w_{name}"] = _moments(x, coord[None], (1, 2, 3))
    return out


def shower_observables(showers: np.ndarray, energy: np.ndarray) -> dict[str, np.ndarray]:
    """The per-shower scalars of `SHOWER_OBSERVABLES`, each (N,) float64, computed in chunks."""
    showers = np.asarray(showers)
    _check(showers, energy)
    energy = np.asarray(energy, dtype=np.float64)
    parts = [_global_observables(apply_threshold(showers[i:i + CHUNK]).astype(np.float64), energy[i:i + CHUNK])
             for i in range(0, len(showers), CHUNK)]
    return {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in SHOWER_OBSERVABLES}


def high_level_features(showers: np.ndarray, energy: np.ndarray, segments: int = SEGMENTS) -> np.ndarray:
    """High-level features (N, 4 + 8 x segments) float64 for FPD/KPD/AUC/PRDC; names in `high_level_names`."""
    showers = np.asarray(showers)
    energy = np.asarray(energy, dtype=np.float64)
    _check(showers, energy)
    if segments < 1 or N_Z % segments:
        raise ValueError(f"segments = {segments} must divide the {N_Z} z layers (1, 3, 5, 9, 15 or 45)")
    depth = N_Z // segments
    rows = []
    for i in range(0, len(showers), CHUNK):
        x = apply_threshold(showers[i:i + CHUNK]).astype(np.float64)
        e_inc = energy[i:i + CHUNK]
        seg = x.reshape(len(x), N_R, N_PHI, segments, depth)
        e_seg = seg.sum(axis=4)  # (n, r, phi, segment)
        glob = _global_observables(x, e_inc)
        cols = [np.log10(e_inc)[:, None], glob["e_ratio"][:, None], glob["c_z"][:, None] / 100.0,
                glob["w_z"][:, None] / 100.0]
        cols.append(np.log10(e_seg.sum(axis=(1, 2)) + LOG_EPS))
        moments = {name: _moments(e_seg, coord[None, :, :, None], (1, 2)) for name, coord in
                   (("x", _X), ("y", _Y), ("r", _R))}
        cols += [moments[a][0] / 100.0 for a in "xy"] + [moments[a][1] / 100.0 for a in "xy"]
        cols += [m / 100.0 for m in moments["r"]]
        cols.append(np.count_nonzero(seg, axis=(1, 2, 4)) / (N_R * N_PHI * depth))
        rows.append(np.concatenate(cols, axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 4 + 8 * segments))


def adjacent_correlation(blocks: np.ndarray) -> float:
    """(N, k, segments): the correlation between adjacent segments of each of the k quantities, averaged over the
    k x (segments - 1) pairs."""
    return float(np.mean([np.corrcoef(blocks[:, a, i], blocks[:, a, i + 1])[0, 1]
                          for a in range(blocks.shape[1]) for i in range(blocks.shape[2] - 1)]))


def centre_coherence(features: np.ndarray, segments: int = SEGMENTS) -> float:
    """How much a shower's transverse centre holds across depth: the correlation of c_x (and c_y) between adjacent
    segments of `high_level_features`, averaged over the 2 x (segments - 1) pairs.

    A shower whose centre wanders as one scores well above 0; segments drawn on their own score ~0 while every
    1-D distribution may still be right (benchmarks/fidelity.md: what the classifier finds with 2,000 showers).
    """
    names = high_level_names(segments)
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != len(names) or len(features) < 3:
        raise ValueError(f"centre_coherence needs (N >= 3, {len(names)}) high-level features; got {features.shape}")
    columns = [[names.index(f"{b}[{i}]") for i in range(segments)] for b in ("c_x", "c_y")]
    return adjacent_correlation(features[:, columns])


# ------------------------------------------------------------------------- the CaloChallenge's FPD/KPD input

# The CaloChallenge evaluation (github.com/CaloChallenge/homepage, code/evaluate.py, code/HighLevelFeatures.py and
# code/XMLHandler.py; read at commit 9b41df7, 2025) on dataset 2, whose mesh is ours, 45 layers x 16 alpha x 9 r.
# Its cell threshold is 0.5 keV / 0.033 (a hair above THRESHOLD_MEV) and the offset inside log10 of energies 1e-8
# MeV. XMLHandler puts the alpha bin centres at -pi + (j + 0.5) 2 pi / 16 for the file's alpha index j (= our phi
# index: see calofm.data.formats), so its "eta" and "phi" are -x and -y of `_X`, `_Y`: the centres change sign,
# the widths and FPD/KPD (invariant under flipping a feature) do not. They are kept as the CaloChallenge has them.
CC_THRESHOLD_MEV = 0.5e-3 / 0.033
CC_LOG_EPS = 1e-8
_CC_ALPHA = PHI_CENTRES - np.pi
_CC_ETA = R_CENTRES[:, None] * np.cos(_CC_ALPHA)[None, :]  # (r, alpha)
_CC_PHI = R_CENTRES[:, None] * np.sin(_CC_ALPHA)[None, :]
_CC_R = np.broadcast_to(R_CENTRES[:, None], (N_R, N_PHI))
_VAR_ROUNDING = 1e-12  # relative: ~5,000 float64 eps, the sums' rounding over a layer's 144 cells, with margin
_CC_PER_LAYER = ("log10_e_layer", "ec_eta", "ec_phi", "width_eta", "width_phi")


def calochallenge_names() -> list[str]:
    """Column names of `calochallenge_features` ([l] = layer l of 45)."""
    per_layer = [f"{block}[{z}]" for block in _CC_PER_LAYER for z in range(N_Z)]
    tail = [f"{block}[{z}]" for block in ("sparsity", "ec_r", "width_r") for z in range(N_Z)]
    return ["log10_e_inc"] + per_layer + ["log10_e_tot"] + tail


def _cc_centre_width(x: np.ndarray, coord: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HighLevelFeatures.GetECandWidths per layer: energy-weighted mean and width of `coord` (r, alpha), with
    the CaloChallenge's 1e-16 MeV in the denominators (centre 0 and width 0 in an empty layer).

    A variance m2 - m1^2 below the rounding error of that difference is zero: a layer whose energy lies in one
    ring has width 0, not rounding noise (~1e-9) that the max-|value| normalisation of FPD/KPD would divide by."""
    m1 = np.einsum("nraz,ra->nz", x, coord) / (total + 1e-16)
    m2 = np.einsum("nraz,ra->nz", x, coord * coord) / (total + 1e-16)
    var = m2 - m1**2
    return m1, np.sqrt(np.where(var > _VAR_ROUNDING * m2, var, 0.0))


def calochallenge_features(showers: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """The CaloChallenge evaluation's high-level features of dataset 2 (N, 362) float64, as its
    `prepare_high_data_for_classifier` builds the FPD/KPD (and high-level classifier) input.

    Cells below 0.5 keV / 0.033 = 15.15 keV are zeroed first; then, in order (names in `calochallenge_names`):
    log10 E_inc; log10(E_layer + 1e-8) for the 45 layers; per layer the centres of energy in eta and in phi and
    the widths in eta and in phi (eta, phi = r cos alpha, r sin alpha of the cell centres, mm), each / 100;
    log10(E_tot + 1e-8); per layer the sparsity (fraction of cells without energy); per layer the centre and
    the width in r, / 100. Energies in MeV. No E_tot/E_inc column: the CaloChallenge uses log10 E_tot.
    Computed in float64 (the CaloChallenge in the files' dtype).
    """
    showers = np.asarray(showers)
    energy = np.asarray(energy, dtype=np.float64)
    _check(showers, energy)
    rows = []
    for i in range(0, len(showers), CHUNK):
        x = showers[i:i + CHUNK].astype(np.float64)
        x = np.where(x >= CC_THRESHOLD_MEV, x, 0.0)  # evaluate.py: np.where(shower < min_energy, 0, shower)
        e_layer = x.sum(axis=(1, 2))  # (n, z)
        ec_eta, w_eta = _cc_centre_width(x, _CC_ETA, e_layer)
        ec_phi, w_phi = _cc_centre_width(x, _CC_PHI, e_layer)
        ec_r, w_r = _cc_centre_width(x, _CC_R, e_layer)
        sparsity = 1.0 - (x > 0).mean(axis=(1, 2))
        rows.append(np.concatenate([
            np.log10(energy[i:i + CHUNK])[:, None], np.log10(e_layer + CC_LOG_EPS),
            ec_eta / 1e2, ec_phi / 1e2, w_eta / 1e2, w_phi / 1e2,
            np.log10(e_layer.sum(axis=1) + CC_LOG_EPS)[:, None], sparsity, ec_r / 1e2, w_r / 1e2], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 2 + 8 * N_Z))


def low_level_features(showers: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """Classifier input on voxels (N, 1 + 6480) float32: log10 E_inc and log(cell + 1e-6 MeV) per cell."""
    showers = np.asarray(showers)
    _check(showers, energy)
    out = np.empty((len(showers), 1 + N_CELLS), np.float32)
    out[:, 0] = np.log10(np.asarray(energy, dtype=np.float64))
    for i in range(0, len(showers), CHUNK):
        x = apply_threshold(showers[i:i + CHUNK])
        out[i:i + CHUNK, 1:] = np.log(x.reshape(len(x), -1) + np.float32(VOXEL_LOG_EPS))
    return out


def voxel_spectrum(showers: np.ndarray) -> np.ndarray:
    """Energies (MeV) of all cells above the threshold, flattened: the voxel energy spectrum."""
    showers = np.asarray(showers)
    _check(showers)
    parts = [showers[i:i + CHUNK].ravel() for i in range(0, len(showers), CHUNK)]
    return np.concatenate([v[v >= THRESHOLD_MEV] for v in parts] or [np.zeros(0, np.float32)])


def mean_shower(showers: np.ndarray) -> np.ndarray:
    """Mean thresholded shower (r, phi, z) in MeV: the source of the mean shower images and profiles."""
    showers = np.asarray(showers)
    _check(showers)
    if len(showers) == 0:
        raise ValueError("mean_shower needs at least one shower")
    total = np.zeros(SHAPE)
    for i in range(0, len(showers), CHUNK):
        total += apply_threshold(showers[i:i + CHUNK]).sum(axis=0, dtype=np.float64)
    return total / len(showers)
