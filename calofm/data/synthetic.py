"""GFlash-parametrised synthetic showers: the embedded default data, a stand-in for Geant4.

Geant4 is not available here, so the demo, tests and benchmarks train on showers drawn from the Grindhammer &
Peters parametrisation (GFlash: NIM A 290 (1990) 469, hep-ex/0001020) with each detector's effective constants
from `calofm.geometry`. Every file written here says so: `synthetic=True` and `generator=GENERATOR`.

Per shower, in the mesh frame (z along the particle, alpha the mesh azimuth):
- longitudinal: a Gamma profile in t = depth / X0 whose (ln T, ln alpha) are correlated normals with GFlash's
  means, widths and correlation; T ~ ln(E / Ec) - 0.5 (photons).
- radial: core + tail, each f(r) = 2 r R^2 / (r^2 + R^2)^2 (CDF r^2 / (r^2 + R^2)), with GFlash's depth
  dependent R_C, R_T (Moliere radii) and core fraction p(tau), tau = t / T.
- azimuth: the incident phi places the global-phi direction at alpha = phi and the projected beam axis at
  alpha = phi + pi/2; the slant stretches the profile along the beam axis (a quadrupole, 1 - sin theta) and the
  shower centre wanders per shower (a dipole, ~ R_M / sqrt(E)), both to first order.
- slant: the layers are crossed at 1 / sin(theta) the normal rate, so the profile is compressed along z by
  sin theta.
- detector structure: `gaps_cracks` (ODD) loses every 10th z cell (dead material) and the cells along module
  crack planes, radial planes every 2 pi / 32 in global phi; `polygon` (CLD) has 12 flat staves: away from a
  stave centre the layers are crossed obliquely (compression cos delta) and the front face lies deeper;
  `turbine` (ALLEGRO) has inclined plates, so the read-out pattern drifts along global phi with depth.
- sampling: the visible energy is the sampling fraction times the energy in each cell, carried by Poisson
  spots; their number per GeV makes the mesh deposit fluctuate by sigma / mu = a / sqrt(E[GeV]) (a = the
  stochastic term), and each spot's energy spreads by SPOT_SPREAD, so cell energies are continuous. Energy
  outside the mesh (lateral and rear leakage) is lost: E_dep / E_inc = sampling fraction x containment.
- particles (`PARTICLE_SHOWERS`): photons as above; electrons start ~1 X0 earlier (PDG: the maxima of electron
  and photon showers differ by C_e - C_gamma = -1 X0); charged pions are a hadronic stand-in, not a hadronic
  parametrisation: a MIP track along the axis until the first interaction (exponential, INTERACTION_X0 mean free
  path), so a fraction punches through the mesh as a MIP, then a longer and wider shower with larger fluctuations
  and a lower visible response (e/h).

Output: `Showers` of (N, 9, 16, 45) float32 MeV in (r, phi, z) order, cells under THRESHOLD_MEV zeroed, a
deterministic function of (detector, n, seed, conditions, chunk).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import gammainc
from tqdm.auto import tqdm

from calofm.data.formats import ANGLE_ABS_TOL, ENERGY_REL_TOL, Showers, write_stream
from calofm.geometry import (
    DR_MM,
    DZ_MM,
    E_MIN_MEV,
    N_PHI,
    N_R,
    N_Z,
    PHI_RANGE,
    SHAPE,
    THETA_RANGE,
    THRESHOLD_MEV,
    Detector,
    get_detector,
)
from calofm.particles import PHOTON, particle_code

GENERATOR_VERSION = 1  # bump whenever the same seed would give different showers
GENERATOR = f"calofm GFlash-parametrised stand-in (not Geant4) v{GENERATOR_VERSION}"
SPECTRA = ("uniform", "log-uniform", "mixed")  # incident-energy spectra (`sample_conditions`)
CHUNK = 64  # showers per vectorised step: a 1.7 MB float32 cell map, so the work stays in L2 cache

# Longitudinal profile (Grindhammer & Peters, homogeneous media; y = E / Ec; T in X0).
T_OFFSET = -0.5                   # <T> = ln y - 0.5 for photons (Grindhammer & Peters)
ALPHA_A = (0.81, 0.458, 2.26)     # <ln alpha> = ln(a1 + (a2 + a3 / Z) ln y)
SIGMA_LN_T = (-1.4, 1.26)         # sigma(ln T) = 1 / (s1 + s2 ln y)
SIGMA_LN_ALPHA = (-0.58, 0.86)    # sigma(ln alpha) = 1 / (s1 + s2 ln y)
RHO_LN = (0.705, 0.023)           # corr(ln T, ln alpha) = r1 + r2 ln y
ALPHA_MIN = 1.05                  # keeps beta = (alpha - 1) / T > 0 in the far tail of the fluctuations

# Lateral asymmetries (stand-in values). The caps keep every cell's expectation positive: the quadrupole is at
# most 1 - sin(0.87) = 0.24 and a shift d changes a ring's cells by at most 2 |d| / R = 2 DIPOLE_CAP.
CENTRE_SPREAD = 0.1               # per-shower centre wander, sigma = CENTRE_SPREAD R_M / sqrt(E[GeV]) per axis
DIPOLE_CAP = 0.3                  # |shift| <= DIPOLE_CAP x (core or tail) R, where the first order holds
TURBINE_DRIFT = 0.15              # ALLEGRO: read-out shift along global phi, mm per mm of depth
ODD_MODULES = 32                  # ODD: crack planes every 2 pi / 32 in global phi ...
ODD_RADIUS_MM = 1250.0            # ... seen from the calorimeter front at this radius
CRACK_DEPTH = 0.8                 # ... a cell on a crack loses this fraction of its energy
CRACK_WIDTH_MM = 3.0              # ... Gaussian width of the loss across the crack
ODD_GAP_EVERY = 10                # ODD: z cells 9, 19, 29, 39 are dead material
CLD_STAVES = 12                   # CLD: a 12-sided polygon of flat staves
CLD_CORNER_DELAY_MM = 2 * DZ_MM   # ... front face depth at a stave corner, relative to the stave centre

SPOT_SPREAD = 0.6                 # relative spread of one spot's energy (Landau-like, as a lognormal)
MIP_MEV_PER_X0 = 7.5              # a minimum-ionising particle's loss per X0 (W 7.7, Pb 7.1 MeV; PDG tables)


@dataclass(frozen=True)
class ParticleShower:
    """How the stand-in draws a particle's shower, relative to a photon's."""
    t_offset: float = T_OFFSET              # <T> = ln y + t_offset
    depth_scale: float = 1.0                # longitudinal lengths in X0 x depth_scale
    width_scale: float = 1.0                # radii x width_scale
    response: float = 1.0                   # visible energy per GeV relative to an electromagnetic shower's
    fluctuation: float = 1.0                # stochastic term x fluctuation
    interaction_x0: float | None = None     # mean free path before the shower starts (X0); a MIP track until then


PARTICLE_SHOWERS: dict[str, ParticleShower] = {
    "photon": ParticleShower(),
    "electron": ParticleShower(t_offset=T_OFFSET - 1.0),
    # lambda_int / X0 ~ 25-30 in W and Pb; e/h ~ 0.75 for the visible energy; hadronic resolution ~2.5x worse
    "pion": ParticleShower(depth_scale=2.0, width_scale=2.0, response=0.75, fluctuation=2.5, interaction_x0=25.0),
}

_Z_EDGES = np.arange(N_Z + 1) * DZ_MM
_Z_MID = ((_Z_EDGES[:-1] + _Z_EDGES[1:]) / 2).astype(np.float32)
_R2_EDGES = ((np.arange(N_R + 1) * DR_MM) ** 2).astype(np.float32)[:, None]
_R_MID = ((np.arange(N_R) + 0.5) * DR_MM).astype(np.float32)[:, None]
_ALPHA = (np.arange(N_PHI) + 0.5) * (2 * math.pi / N_PHI)
DEAD_Z_CELLS = np.arange(ODD_GAP_EVERY - 1, N_Z, ODD_GAP_EVERY)


def effective_z(det: Detector) -> float:
    """Effective atomic number from the critical energy, Ec = 610 MeV / (Z + 1.24) (PDG, solids)."""
    return 610.0 / det.ec_mev - 1.24


def sample_conditions(detector: str, n: int, rng: np.random.Generator, spectrum: str = "uniform",
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(energy MeV, phi rad, theta rad), float32, uniform over the detector's ranges as in LEMURS; with `spectrum`
    log-uniform the energy is uniform in log E instead (as CaloChallenge dataset 2), so each decade holds the same
    number of showers: what a resolution study per energy bin needs (uniform in E leaves ~1 % of the showers
    below a tenth of the range). `mixed` draws each shower from one or the other with equal odds: the uniform
    spectrum's high-energy showers and a tenth or more below 4 GeV, where a model's total-deposit fit needs
    them to reach the data's resolution (benchmarks/fidelity.md, "The lowest energy bin's training showers")."""
    det = get_detector(detector)
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum must be one of {', '.join(SPECTRA)}, got {spectrum!r}")
    lo, hi = E_MIN_MEV, det.emax_mev
    if spectrum == "uniform":
        energy = rng.uniform(lo, hi, n)
    elif spectrum == "log-uniform":
        energy = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
    else:
        linear = rng.random(n) < 0.5
        energy = np.where(linear, rng.uniform(lo, hi, n), np.exp(rng.uniform(math.log(lo), math.log(hi), n)))
    energy = energy.astype(np.float32)
    phi = rng.uniform(*PHI_RANGE, n).astype(np.float32)
    theta = rng.uniform(*THETA_RANGE, n).astype(np.float32)
    return energy, phi, theta


def conditions(detector: str, n: int, rng: np.random.Generator, energy=None, phi=None, theta=None,
               spectrum: str = "uniform"):
    """Sampled conditions, with given scalars or (n,) arrays in their place (fixed-point generation), checked."""
    det = get_detector(detector)
    out = list(sample_conditions(det.name, n, rng, spectrum))
    bounds = {"energy": (E_MIN_MEV * (1 - ENERGY_REL_TOL), det.emax_mev * (1 + ENERGY_REL_TOL), "MeV"),
              "phi": (PHI_RANGE[0] - ANGLE_ABS_TOL, PHI_RANGE[1] + ANGLE_ABS_TOL, "rad"),
              "theta": (THETA_RANGE[0] - ANGLE_ABS_TOL, THETA_RANGE[1] + ANGLE_ABS_TOL, "rad")}
    for i, (name, given) in enumerate((("energy", energy), ("phi", phi), ("theta", theta))):
        if given is None:
            continue
        v = np.asarray(given, dtype=np.float32)
        if v.ndim > 1 or (v.ndim == 1 and v.shape != (n,)):
            raise ValueError(f"{name} must be a scalar or an array of shape ({n},), got shape {v.shape}")
        v = np.broadcast_to(v, (n,)).copy()
        lo, hi, unit = bounds[name]
        bad = np.flatnonzero(~((v >= lo) & (v <= hi)))  # NaN fails both
        if bad.size:
            raise ValueError(f"{name}[{bad[0]}] = {v[bad[0]]} {unit} is outside [{lo:.6g}, {hi:.6g}] {unit} "
                             f"for detector {det.name}")
        out[i] = v
    return tuple(out)


def _fractions(det: Detector, e_mev, phi, theta, normals: np.ndarray | None,
               centre: np.ndarray | None, part: ParticleShower = PARTICLE_SHOWERS[PHOTON],
               start_mm: np.ndarray | None = None) -> np.ndarray:
    """Expected fraction of the incident energy in each mesh cell, (n, 9, 16, 45) float32.

    `normals` (n, 2) are the standard normals behind (ln T, ln alpha) and `centre` (n, 2) the shift of the
    shower centre in mm; None gives the mean shower (no fluctuation), as `containment` uses. `start_mm` (n,) is the
    depth where the shower starts (a hadron's first interaction; None: the front face).
    """
    n = len(e_mev)
    e_mev, phi, theta = (np.asarray(a, np.float64) for a in (e_mev, phi, theta))
    z_eff = effective_z(det)
    ln_y = np.log(e_mev / det.ec_mev)

    # Longitudinal Gamma profile with correlated (ln T, ln alpha).
    mu_t = np.log(ln_y + part.t_offset)
    mu_a = np.log(ALPHA_A[0] + (ALPHA_A[1] + ALPHA_A[2] / z_eff) * ln_y)
    if normals is not None:
        sig_t = 1.0 / (SIGMA_LN_T[0] + SIGMA_LN_T[1] * ln_y)
        sig_a = 1.0 / (SIGMA_LN_ALPHA[0] + SIGMA_LN_ALPHA[1] * ln_y)
        rho = np.minimum(RHO_LN[0] + RHO_LN[1] * ln_y, 0.99)
        mu_t = mu_t + sig_t * normals[:, 0]
        mu_a = mu_a + sig_a * (rho * normals[:, 0] + np.sqrt(1 - rho**2) * normals[:, 1])
    t_max, alpha = np.exp(mu_t), np.maximum(np.exp(mu_a), ALPHA_MIN)
    beta = (alpha - 1) / t_max

    # Depth in X0 along the mesh axis: the slant (and CLD's oblique staves) compress; CLD's face may lie deeper.
    compress = np.sin(theta)
    front = np.zeros(n)
    if det.structure == "polygon":
        half = math.pi / CLD_STAVES
        delta = np.mod(phi + half, 2 * half) - half
        compress = compress * np.cos(delta)
        front = CLD_CORNER_DELAY_MM * (1 / np.cos(delta) - 1) / (1 / math.cos(half) - 1)
    if start_mm is not None:
        front = front + start_mm
    scale = 1.0 / (det.x0_mm * part.depth_scale * compress)[:, None]
    t_edges = np.maximum(_Z_EDGES - front[:, None], 0.0) * scale
    longitudinal = np.diff(gammainc(alpha[:, None], beta[:, None] * t_edges), axis=1).astype(np.float32)
    if det.structure == "gaps_cracks":
        longitudinal[:, DEAD_Z_CELLS] = 0.0
    tau = (np.maximum(_Z_MID - front[:, None], 0.0) * scale / t_max[:, None]).astype(np.float32)  # (n, 45)

    # Radial core and tail (GFlash; E in GeV, radii in Moliere radii).
    ln_e = np.log(e_mev / 1000.0).astype(np.float32)[:, None]
    r_core = det.rm_mm * part.width_scale * ((0.0251 + 0.00319 * ln_e) + (0.1162 - 0.000381 * z_eff) * tau)
    k4 = 0.3585 + 0.0421 * ln_e
    r_tail = det.rm_mm * part.width_scale * (0.659 - 0.00309 * z_eff) * (np.exp(-2.59 * (tau - 0.645)) + np.exp(k4 * (tau - 0.645)))
    x = ((0.401 + 0.00187 * z_eff) - tau) / (1.313 - 0.0686 * ln_e)
    p_core = np.clip((2.632 - 0.00094 * z_eff) * np.exp(x - np.exp(x)), 0.0, 1.0)

    # Per (r, z) ring: terms[:, :, 0] its energy; terms[:, :, 1:] the change a centre shift d makes to first
    # order, d . e_alpha x 4 r / (r^2 + R^2) x ring, split along the mesh x and y axes.
    shift = np.zeros((n, 2, N_Z), np.float32)
    if centre is not None:
        shift += centre.astype(np.float32)[:, :, None]
    if det.structure == "turbine":  # the read-out drifts along global phi (mesh direction alpha = phi)
        shift += TURBINE_DRIFT * _Z_MID * np.stack([np.cos(phi), np.sin(phi)], 1).astype(np.float32)[:, :, None]
    size = np.maximum(np.hypot(shift[:, 0], shift[:, 1]), 1e-12)  # (n, 45)
    terms = np.zeros((n, N_R, 3, N_Z), np.float32)
    for weight, radius in ((p_core, r_core), (1 - p_core, r_tail)):
        r2 = (radius**2)[:, None, :]
        ring = np.diff(_R2_EDGES / (_R2_EDGES + r2), axis=1) * (weight * longitudinal)[:, None, :]  # (n, 9, 45)
        capped = shift * np.minimum(1.0, DIPOLE_CAP * radius / size)[:, None, :]  # (n, 2, 45)
        terms[:, :, 0] += ring
        terms[:, :, 1:] += (ring * (4 * _R_MID / (_R_MID**2 + r2)))[:, :, None, :] * capped[:, None, :, :]

    # Azimuthal weights of the three terms: the slant's quadrupole about the beam axis, then cos / sin alpha
    # for the dipole; ODD's cracks scale whole (r, alpha) cells.
    rel = _ALPHA - phi[:, None]  # (n, 16)
    weights = np.empty((n, 1, N_PHI, 3))
    weights[:, 0, :, 0] = 1.0 - (1.0 - np.sin(theta))[:, None] * np.cos(2 * rel)
    weights[:, 0, :, 1], weights[:, 0, :, 2] = np.cos(_ALPHA), np.sin(_ALPHA)
    if det.structure == "gaps_cracks":  # crack planes at global phi = 2 pi k / 32: at `offset` mm along e_phi
        half = math.pi / ODD_MODULES
        offset = -ODD_RADIUS_MM * np.sin(np.mod(phi + half, 2 * half) - half)
        along = _R_MID * np.cos(rel)[:, None, :]  # (n, 9, 16)
        crack = 1.0 - CRACK_DEPTH * np.exp(-0.5 * ((along - offset[:, None, None]) / CRACK_WIDTH_MM) ** 2)
        weights = weights * crack[..., None]
    weights /= N_PHI
    # (n, 1|9, 16, 3) @ (n, 9, 3, 45) -> (n, 9, 16, 45): the whole cell map in one batched product.
    return np.matmul(weights.astype(np.float32), terms)


def containment(detector: str, energy, phi, theta) -> np.ndarray:
    """Fraction of the incident energy inside the mesh (and outside dead material) for the mean shower."""
    det = get_detector(detector)
    e, p, t = np.broadcast_arrays(*(np.atleast_1d(np.asarray(a, np.float64)) for a in (energy, phi, theta)))
    return _fractions(det, e, p, t, None, None).sum(axis=(1, 2, 3), dtype=np.float64)


def _spot_energy(lam: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Compound-Poisson draw for flat expected spot counts `lam`: (indices of hit cells, their energy in spots).

    A cell is empty with the Poisson probability exp(-lambda) exactly (one uniform per cell). A hit cell's
    energy, in units of the mean spot energy, is lognormal with the compound Poisson's mean and variance given
    n >= 1 (spots spread by SPOT_SPREAD), so the total keeps variance (1 + spread^2) sum(lambda).
    """
    u = rng.random(lam.size, dtype=np.float32)
    hit = np.flatnonzero(u >= np.exp(-lam))
    lam = lam[hit]
    p_hit = -np.expm1(-lam)
    ratio = p_hit * (np.float32(1 + SPOT_SPREAD**2) + lam) / lam  # E[S^2 | hit] / E[S | hit]^2
    z = rng.standard_normal(hit.size, dtype=np.float32)
    z *= np.sqrt(np.log(ratio))
    return hit, lam / (p_hit * np.sqrt(ratio)) * np.exp(z)  # median x exp(sigma z)


def _sample_chunk(det: Detector, e_mev: np.ndarray, phi: np.ndarray, theta: np.ndarray,
                  rng: np.random.Generator, out: np.ndarray, particle: str = PHOTON) -> None:
    """Fill `out` (n, 9, 16, 45) float32 with `particle` showers at the given conditions."""
    part = PARTICLE_SHOWERS[particle]
    n = len(e_mev)
    e_gev = np.asarray(e_mev, np.float64) / 1000.0
    normals = rng.standard_normal((n, 2))
    centre = rng.standard_normal((n, 2)) * (CENTRE_SPREAD * det.rm_mm * part.width_scale / np.sqrt(e_gev))[:, None]
    start = None  # depth (mm) of a hadron's first interaction: the path length times sin(theta)
    if part.interaction_x0 is not None:
        start = rng.exponential(part.interaction_x0 * det.x0_mm, n) * np.sin(np.asarray(theta, np.float64))
    lam = _fractions(det, e_mev, phi, theta, normals, centre, part, start).reshape(n, -1)
    contained = lam.sum(axis=1, dtype=np.float64)
    # (1 + spread^2) E / a^2 spots inside the mesh give sigma / mu = a / sqrt(E) for the deposit.
    spots = (1 + SPOT_SPREAD**2) * e_gev / (det.stochastic_term * part.fluctuation) ** 2
    lam *= np.divide(spots, contained, out=np.zeros(n), where=contained > 0).astype(np.float32)[:, None]
    hit, energy = _spot_energy(lam.reshape(-1), rng)
    spot_mev = (det.sampling_fraction * part.response * e_gev * 1000.0 * contained / spots).astype(np.float32)
    energy *= np.repeat(spot_mev, np.diff(np.searchsorted(hit, np.arange(n + 1) * lam.shape[1])))
    flat = out.reshape(-1)
    flat[:] = 0.0
    flat[hit] = energy
    if start is not None:
        _add_mip_track(det, theta, start, rng, out)
    flat[flat < THRESHOLD_MEV] = 0.0


def _add_mip_track(det: Detector, theta, start_mm: np.ndarray, rng: np.random.Generator, out: np.ndarray) -> None:
    """A charged hadron's ionisation before its first interaction: MIP_MEV_PER_X0 per X0 of path, visible by the
    sampling fraction and spread like a spot, in the axis cells (r = 0, one phi cell a shower) of the layers in
    front of `start_mm`."""
    n = len(start_mm)
    path_x0 = DZ_MM / (np.sin(np.asarray(theta, np.float64)) * det.x0_mm)  # X0 crossed per layer
    mean = (MIP_MEV_PER_X0 * det.sampling_fraction * path_x0).astype(np.float32)
    track = (_Z_MID[None, :] < start_mm[:, None]).astype(np.float32)  # (n, 45)
    if det.structure == "gaps_cracks":
        track[:, DEAD_Z_CELLS] = 0.0
    spread = rng.standard_normal((n, N_Z), dtype=np.float32) * np.float32(math.sqrt(math.log(1 + SPOT_SPREAD**2)))
    loss = mean[:, None] * np.exp(spread - spread.dtype.type(0.5 * math.log(1 + SPOT_SPREAD**2))) * track
    column = rng.integers(0, N_PHI, n)
    out[np.arange(n), 0, column, :] += loss


def iter_generate(detector: str, n: int, seed: int, energy=None, phi=None, theta=None, chunk: int = CHUNK,
                  progress: Callable[[int], object] | None = None,
                  particles: Iterable[str] = (PHOTON,), spectrum: str = "uniform") -> Iterator[Showers]:
    """`n` synthetic showers for `detector`, yielded `chunk` at a time (memory stays bounded for any n).

    energy (MeV), phi and theta (rad) given as scalars or (n,) arrays are used as they are (fixed-point
    generation); missing ones are drawn uniformly over the detector's ranges (the energy per `spectrum`,
    `sample_conditions`). Each shower's particle is drawn
    uniformly from `particles` (photons only: the same showers as before particles existed). `progress(k)` is
    called after each chunk of k showers (a tqdm bar's `update`).
    """
    det = get_detector(detector)
    particles = list(particles)
    codes = np.array([particle_code(p) for p in particles], np.int32)
    if n < 0 or chunk < 1 or not particles:
        raise ValueError(f"need n >= 0, chunk >= 1 and a particle, got n={n}, chunk={chunk}, particles={particles}")
    cond_seed, shower_seed = np.random.SeedSequence(seed).spawn(2)
    cond_rng = np.random.default_rng(cond_seed)
    energy, phi, theta = conditions(det.name, n, cond_rng, energy, phi, theta, spectrum)
    which = cond_rng.integers(0, len(particles), n) if len(particles) > 1 else np.zeros(n, np.int64)
    rng = np.random.default_rng(shower_seed)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        showers = np.empty((sl.stop - start, *SHAPE), np.float32)
        for k, particle in enumerate(particles):
            m = which[sl] == k
            if m.all():
                _sample_chunk(det, energy[sl], phi[sl], theta[sl], rng, showers, particle)
            elif m.any():
                part = np.empty((int(m.sum()), *SHAPE), np.float32)
                _sample_chunk(det, energy[sl][m], phi[sl][m], theta[sl][m], rng, part, particle)
                showers[m] = part
        if progress is not None:
            progress(sl.stop - start)
        yield Showers(showers, energy[sl], phi[sl], theta[sl], codes[which[sl]])


def generate(detector: str, n: int, seed: int, energy=None, phi=None, theta=None, chunk: int = CHUNK,
             progress: Callable[[int], object] | None = None, particles: Iterable[str] = (PHOTON,),
             spectrum: str = "uniform") -> Showers:
    """`n` synthetic showers in memory (see `iter_generate`)."""
    parts = list(iter_generate(detector, n, seed, energy, phi, theta, chunk, progress, particles, spectrum))
    if not parts:
        return Showers(np.empty((0, *SHAPE), np.float32), *(np.empty(0, np.float32) for _ in range(3)))
    return Showers.concat(parts)


def detector_seed(seed: int, detector: str) -> int:
    """Seed of one detector's file: depends on the run seed and the detector's name only, not on the others."""
    return int(np.random.SeedSequence([seed, zlib.crc32(detector.encode())]).generate_state(1)[0])


def synthesize(out_dir: str | Path, detectors: Iterable[str], n: int, seed: int,
               progress: bool = False, particles: Iterable[str] = (PHOTON,), spectrum: str = "uniform") -> list[Path]:
    """Write `out_dir/<detector>.h5` (LEMURS) with `n` showers of each detector, labelled as synthetic, each
    shower's particle drawn from `particles` (its PDG code in the file) and its energy from `spectrum`
    (`sample_conditions`; recorded in the file's attributes).

    `progress` shows one tqdm bar over all showers.
    """
    particles = list(particles)
    detectors = [get_detector(name).name for name in detectors]
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    paths = []
    quiet = {} if progress else {"disable": True}  # an explicit `disable` would override TQDM_DISABLE
    with tqdm(total=n * len(detectors), unit="shower", desc="synth", **quiet) as bar:
        for name in detectors:
            path = Path(out_dir) / f"{name}.h5"
            write_stream(path, "lemurs", n,
                         {"detector": name, "synthetic": True, "generator": GENERATOR, "seed": seed,
                          "energy_spectrum": spectrum},
                         iter_generate(name, n, detector_seed(seed, name), progress=bar.update, particles=particles,
                                       spectrum=spectrum))
            paths.append(path)
    return paths
