"""Preprocessing shared by every detector: threshold, log, ONE scalar mean/std; and the condition encoding.

One shared normalisation (not per detector) keeps the pretrained representation valid for a new detector: the
adapted model sees its showers through the same frozen transform.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

from calofm.geometry import CELL_X, CELL_Y, E_MIN_MEV, EMAX_GLOBAL_MEV, THRESHOLD_MEV

# Azimuthal harmonics the model sees: sin(k phi), cos(k phi). Calorimeters are built of modules repeated in phi
# (ODD: 32 with cracks between them, CLD: 12 staves), so the deposit is periodic in phi with their period; a
# small network cannot make sin(32 phi) out of sin phi and cos phi, so powers of two and three times them up to
# 64 are given (benchmarks/fidelity.md: with (1,) alone ODD's crack tail of the deposit was missing).
PHI_HARMONICS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
N_COND = 2 + 2 * len(PHI_HARMONICS)  # log-scaled E, theta/pi, then sin / cos of each harmonic of phi


UNITS = ("mev", "incident_energy", "detector_response", "deposit")


def deposit(showers):
    """E_dep: the shower's summed energy in cells above the threshold, (B,) from (B, ...) in MeV."""
    lib = torch if isinstance(showers, torch.Tensor) else np
    x = lib.where(showers < THRESHOLD_MEV, 0.0 * showers, showers)
    return x.reshape(x.shape[0], -1).sum(1)


def transverse_centre(showers, energy_mev):
    """The shower's energy-weighted transverse centre (x, y) in the mesh's frame, in mm x sqrt(E_inc / GeV), (B, 2)
    float64 numpy from (B, 9, 16, 45) MeV: where its core sits, over all its depth. Its shower-to-shower wander
    falls as 1 / sqrt(E) (the particles' number), so the factor gives it one scale at every energy."""
    x = np.where(showers < THRESHOLD_MEV, 0.0, np.asarray(showers, np.float64)).sum(3)  # (B, r, phi)
    total = np.maximum(x.sum((1, 2)), np.finfo(np.float64).tiny)
    xy = np.stack([(x * CELL_X).sum((1, 2)), (x * CELL_Y).sum((1, 2))], 1) / total[:, None]
    return xy * np.sqrt(np.asarray(energy_mev, np.float64) / 1000.0)[:, None]


@dataclass(frozen=True)
class Normalizer:
    """x -> (log(x / u + eps) - mean) / std, with ONE scalar mean and std, in one of three units u:

    - `mev`: u = 1 MeV, the paper's transform;
    - `incident_energy`: u = E_inc, which takes the shower's overall scale (six e-folds over 1 GeV-1 TeV) out of
      what the network must produce cell by cell;
    - `detector_response`: u = E_inc x the detector's mean E_dep / E_inc (`response`, measured on its training
      data), which also takes out the detectors' sampling fractions, as the paper's outlook suggests; a new
      detector brings one number, measured on its adaptation data.
    - `deposit`: u = the shower's own E_dep, so the cells hold its shape (fractions summing to one) and the total
      is a variable of its own, y = (log(E_dep / (E_inc x response)) - deposit_mean) / deposit_std, which the
      model draws first and the shape is conditioned on (as CaloFlow and CaloDREAM draw layer energies first):
      a diffusion model of the cells alone gets the mean deposit right but its shower-to-shower spread several
      times too wide (benchmarks/fidelity.md). `inverse` scales the generated shape to sum to the drawn E_dep.
      With `centre`, the shower's transverse centre (`transverse_centre`, standardised by `centre_std`) is drawn
      beside E_dep and the shape made around it: a shower's core wanders as one over its whole depth, which a
      denoiser of the cells alone draws segment by segment (benchmarks/fidelity.md).
    The last three keep shapes and inter-layer correlations (one known scalar per shower, unlike per-layer
    normalisation).
    """

    mean: float
    std: float
    threshold_mev: float = THRESHOLD_MEV
    eps: float = 1e-6
    log_max: float = math.log(EMAX_GLOBAL_MEV)  # largest log(x / u + eps) in the fitted data
    unit: str = "mev"
    response: dict[str, float] = field(default_factory=dict)  # detector -> mean E_dep / E_inc
    deposit_mean: float = 0.0  # of log(E_dep / (E_inc x response)), over all detectors (unit `deposit`)
    deposit_std: float = 1.0
    centre: bool = False  # unit `deposit` only: the transverse centre is drawn with E_dep
    centre_std: float = 1.0  # of `transverse_centre`, over both axes and all detectors

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"normalizer: unit {self.unit!r} is not one of {', '.join(UNITS)}")
        if self.centre and self.unit != "deposit":
            raise ValueError(f"normalizer: centre needs unit 'deposit' (it is drawn with E_dep), not {self.unit!r}")

    def unit_mev(self, energy_mev, detectors, showers=None):
        """Per-shower unit in MeV for showers of `detectors` (a name, or one name per shower); None for `mev`.

        Unit `deposit` needs the showers themselves (their E_dep); to invert generated ones, pass `decode_deposit`'s
        E_dep to `inverse` instead.
        """
        if self.unit == "mev":
            return None
        if self.unit == "deposit":
            if showers is None:
                raise ValueError("normalizer: unit 'deposit' needs the showers to measure each one's E_dep")
            return deposit(showers)
        return self.expected_deposit(energy_mev, detectors) if self.unit == "detector_response" else energy_mev

    @property
    def uses_response(self) -> bool:
        """Whether each detector brings its mean response (units `detector_response` and `deposit`)."""
        return self.unit in ("detector_response", "deposit")

    @property
    def has_deposit(self) -> bool:
        """Whether E_dep is a variable of its own, drawn before the shape (unit `deposit`)."""
        return self.unit == "deposit"

    @property
    def drawn(self) -> int:
        """How many numbers a shower draws before its shape: E_dep [and its centre's x, y]; 0 without unit `deposit`."""
        return (1 + 2 * self.centre) * self.has_deposit

    def encode_deposit(self, e_dep, expected_mev):
        """E_dep (B,) in MeV -> y (B, 1): the standardised log of E_dep / `expected_deposit` (E_inc x response)."""
        lib = torch if isinstance(e_dep, torch.Tensor) else np
        y = (lib.log(lib.clip(e_dep, THRESHOLD_MEV, None) / expected_mev) - self.deposit_mean) / self.deposit_std
        return y.reshape(-1, 1)

    def encode_drawn(self, e_dep, expected_mev, showers, energy_mev) -> np.ndarray:
        """What the model draws first, from real showers (numpy, MeV; `e_dep` their `deposit`, which the caller has
        as their unit): (B, `drawn`) float32, the encoded E_dep and, with `centre`, the standardised
        `transverse_centre`."""
        y = self.encode_deposit(e_dep, expected_mev)
        if self.centre:
            y = np.concatenate([y, transverse_centre(showers, energy_mev) / self.centre_std], 1)
        return y.astype(np.float32)

    def decode_deposit(self, y, expected_mev):
        """y (B, `drawn`) -> E_dep (B,) in MeV from its first column; the inverse of `encode_deposit`."""
        lib = torch if isinstance(y, torch.Tensor) else np
        return lib.exp(y[:, 0] * self.deposit_std + self.deposit_mean) * expected_mev

    def generated_unit(self, energy_mev, detectors, deposit=None):
        """The unit `inverse` needs for generated showers: E_dep decoded from the model's drawn `deposit` (unit
        `deposit`), else `unit_mev`'s."""
        if self.has_deposit:
            if deposit is None:
                raise ValueError("normalizer: unit 'deposit' needs the model's drawn deposit to invert its showers")
            return self.decode_deposit(deposit, self.expected_deposit(energy_mev, detectors))
        return self.unit_mev(energy_mev, detectors)

    def expected_deposit(self, energy_mev, detectors):
        """E_inc x the detector's mean response, in MeV: the scale of units `detector_response` and `deposit`."""
        lib = torch if isinstance(energy_mev, torch.Tensor) else np
        names = [detectors] if isinstance(detectors, str) else list(detectors)
        missing = sorted(set(names) - set(self.response))
        if missing:
            raise ValueError(f"normalizer: no detector response for {missing[0]!r}; known: {sorted(self.response)}")
        r = np.array([self.response[n] for n in names], dtype=np.float32)
        return energy_mev * (torch.from_numpy(r).to(energy_mev.device) if lib is torch else r)

    def _unit(self, u, ndim: int):
        if self.unit == "mev":
            return 1.0
        if u is None:
            raise ValueError(f"normalizer: unit {self.unit!r} needs each shower's unit (see unit_mev)")
        return u.reshape(-1, *([1] * (ndim - 1)))

    def forward(self, showers, unit_mev=None):
        """MeV -> normalised log space; works on numpy arrays and torch tensors."""
        lib = torch if isinstance(showers, torch.Tensor) else np
        x = lib.where(showers < self.threshold_mev, 0.0 * showers, showers)
        return (lib.log(x / self._unit(unit_mev, x.ndim) + self.eps) - self.mean) / self.std

    def inverse(self, z, unit_mev=None):
        """Normalised -> MeV; cells that come back under the threshold are zeroed (as Geant4 scoring would)."""
        lib = torch if isinstance(z, torch.Tensor) else np
        # no generated cell exceeds the largest deposit of the training data, as image models clamp to the
        # valid pixel range: one outlier cell would otherwise dominate the shower's energy after the exponential
        x = (lib.exp(lib.clip(z * self.std + self.mean, None, self.log_max)) - self.eps) * self._unit(unit_mev, z.ndim)
        x = lib.where(x < self.threshold_mev, 0.0 * x, x)
        if self.unit == "deposit":  # the shape carries the drawn E_dep: cells are its fractions
            total = x.reshape(x.shape[0], -1).sum(1)
            scale = unit_mev / lib.where(total > 0, total, 1.0 + 0.0 * total)
            x = x * scale.reshape(-1, *([1] * (x.ndim - 1)))
        return x

    def with_response(self, detector: str, response: float) -> Normalizer:
        return replace(self, response={**self.response, detector: float(response)})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"normalizer: unknown key {sorted(unknown)[0]!r}")
        return cls(**d)

    @classmethod
    def fit(cls, chunks: Iterable[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]],
            threshold_mev: float = THRESHOLD_MEV, eps: float = 1e-6, unit: str = "mev",
            response: dict[str, float] | None = None, centre: bool = False) -> Normalizer:
        """Streaming pass over (showers, unit_mev, expected_deposit_mev, energy_mev) chunks of all detectors
        together: exact float64 sums. The third item (E_inc x response, unit `deposit` only) fits deposit_mean /
        deposit_std; with `centre`, the showers and their E_inc fit centre_std."""
        cells, dep, xy = _Moments(), _Moments(), _Moments()
        shape = cls(0.0, 1.0, threshold_mev, eps, 0.0, unit, dict(response or {}), centre=centre)
        for showers, u, expected, energy in chunks:
            showers = np.asarray(showers, dtype=np.float64)
            cells.add(shape.forward(showers, None if u is None else np.asarray(u, np.float64)))
            if expected is not None:
                dep.add(np.log(np.clip(deposit(showers), threshold_mev, None) / np.asarray(expected, np.float64)))
            if centre:
                xy.add(transverse_centre(showers, energy))
        if cells.n == 0:
            raise ValueError("normalizer: no showers to fit on")
        return replace(shape, mean=cells.mean, std=cells.std, log_max=cells.top,
                       **({"deposit_mean": dep.mean, "deposit_std": dep.std} if dep.n else {}),
                       **({"centre_std": xy.std} if xy.n else {}))


@dataclass
class _Moments:
    """Running float64 count, mean, std and maximum."""

    n: int = 0
    s: float = 0.0
    s2: float = 0.0
    top: float = -math.inf

    def add(self, y: np.ndarray) -> None:
        self.n += y.size
        self.s += float(y.sum())
        self.s2 += float(np.square(y).sum())
        self.top = max(self.top, float(y.max()))

    @property
    def mean(self) -> float:
        return self.s / self.n

    @property
    def std(self) -> float:
        return math.sqrt(max(self.s2 / self.n - self.mean**2, 0.0))


def kinematics(energy_mev: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """[ln(E/1 GeV)/ln 1000, theta/pi, sin k phi, cos k phi for k in PHI_HARMONICS], (B, N_COND): the incident
    particle as the model sees it.

    The energy enters on a log scale over [1 GeV, 1 TeV] -> [0, 1]: E/1 TeV (the Par04 contract's input, `calofm/export.py`) squeezes the whole FCC-ee
    range into [0.001, 0.1], which a small model takes thousands of steps to resolve.
    """
    log_e = torch.log(energy_mev / E_MIN_MEV) / math.log(EMAX_GLOBAL_MEV / E_MIN_MEV)
    k_phi = torch.stack([k * phi for k in PHI_HARMONICS], 1)  # scalar constants keep an exported graph device-free
    return torch.cat([log_e[:, None], theta[:, None] / math.pi, torch.sin(k_phi), torch.cos(k_phi)], 1)


def encode_conditions(energy_mev, theta, phi, slot, n_slots: int, particle=None,
                      n_particle_slots: int = 0) -> torch.Tensor:
    """kinematics + one-hot(detector slot) [+ one-hot(particle slot), for a model with particle slots]: the
    model's condition vector, (B, N_COND + n_slots + n_particle_slots)."""
    e = torch.as_tensor(energy_mev, dtype=torch.float32).reshape(-1)
    t = torch.as_tensor(theta, dtype=torch.float32).reshape(-1)
    p = torch.as_tensor(phi, dtype=torch.float32).reshape(-1)
    parts = [kinematics(e, t, p)]
    for what, index, n in (("detector", slot, n_slots), ("particle", particle, n_particle_slots)):
        if what == "particle" and not n:
            break
        s = torch.as_tensor(index, dtype=torch.long).reshape(-1).expand(e.shape[0])
        if (s < 0).any() or (s >= n).any():
            raise ValueError(f"{what} slot {s.max().item()} outside the model's {n} one-hot slots")
        parts.append(torch.nn.functional.one_hot(s, n).float())
    return torch.cat(parts, 1)
