"""Preprocessing shared by every detector: threshold, log, ONE scalar mean/std; and the condition encoding.

One shared normalisation (not per detector) keeps the pretrained representation valid for a new detector: the
adapted model sees its showers through the same frozen transform.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from calofm.geometry import E_MIN_MEV, EMAX_GLOBAL_MEV, THRESHOLD_MEV

N_COND = 4  # E/Emax, theta/pi, sin phi, cos phi


@dataclass(frozen=True)
class Normalizer:
    mean: float
    std: float
    threshold_mev: float = THRESHOLD_MEV
    eps: float = 1e-6
    log_max: float = math.log(EMAX_GLOBAL_MEV)  # largest log(x + eps) in the fitted data

    def forward(self, showers):
        """MeV -> normalised log space; works on numpy arrays and torch tensors."""
        lib = torch if isinstance(showers, torch.Tensor) else np
        x = lib.where(showers < self.threshold_mev, 0.0 * showers, showers)
        return (lib.log(x + self.eps) - self.mean) / self.std

    def inverse(self, z):
        """Normalised -> MeV; cells that come back under the threshold are zeroed (as Geant4 scoring would)."""
        lib = torch if isinstance(z, torch.Tensor) else np
        # no generated cell exceeds the largest deposit of the training data, as image models clamp to the
        # valid pixel range: one outlier cell would otherwise dominate the shower's energy after the exponential
        x = lib.exp(lib.clip(z * self.std + self.mean, None, self.log_max)) - self.eps
        return lib.where(x < self.threshold_mev, 0.0 * x, x)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        unknown = set(d) - {"mean", "std", "threshold_mev", "eps", "log_max"}
        if unknown:
            raise ValueError(f"normalizer: unknown key {sorted(unknown)[0]!r}")
        return cls(**d)

    @classmethod
    def fit(cls, chunks: Iterable[np.ndarray], threshold_mev: float = THRESHOLD_MEV, eps: float = 1e-6) -> Normalizer:
        """Streaming pass over chunks of showers (all detectors together): exact float64 sums, no data in memory."""
        n, s, s2, top = 0, 0.0, 0.0, -math.inf
        for chunk in chunks:
            x = np.asarray(chunk, dtype=np.float64)
            y = np.log(np.where(x < threshold_mev, 0.0, x) + eps)
            n += y.size
            s += y.sum()
            s2 += np.square(y).sum()
            top = max(top, float(y.max()))
        if n == 0:
            raise ValueError("normalizer: no showers to fit on")
        mean = s / n
        std = math.sqrt(max(s2 / n - mean * mean, 0.0))
        return cls(mean=float(mean), std=float(std), threshold_mev=threshold_mev, eps=eps, log_max=top)


def kinematics(energy_mev: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """[ln(E/1 GeV)/ln 1000, theta/pi, sin phi, cos phi], (B, 4): the incident particle as the model sees it.

    The energy enters on a log scale over [1 GeV, 1 TeV] -> [0, 1]: E/1 TeV (DESIGN.md) squeezes the whole FCC-ee
    range into [0.001, 0.1], which a small model takes thousands of steps to resolve.
    """
    log_e = torch.log(energy_mev / E_MIN_MEV) / math.log(EMAX_GLOBAL_MEV / E_MIN_MEV)
    return torch.stack([log_e, theta / math.pi, torch.sin(phi), torch.cos(phi)], 1)


def encode_conditions(energy_mev, theta, phi, slot, n_slots: int) -> torch.Tensor:
    """kinematics + one-hot(slot): the model's condition vector, (B, 4 + n_slots)."""
    e = torch.as_tensor(energy_mev, dtype=torch.float32).reshape(-1)
    t = torch.as_tensor(theta, dtype=torch.float32).reshape(-1)
    p = torch.as_tensor(phi, dtype=torch.float32).reshape(-1)
    s = torch.as_tensor(slot, dtype=torch.long).reshape(-1).expand(e.shape[0])
    if (s < 0).any() or (s >= n_slots).any():
        raise ValueError(f"detector slot {s.max().item()} outside the model's {n_slots} one-hot slots")
    return torch.cat([kinematics(e, t, p), torch.nn.functional.one_hot(s, n_slots).float()], 1)
