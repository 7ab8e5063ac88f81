"""Showers as point clouds (CaloClouds-style): one hit (x, y, z, E) per lit cell of the mesh, and back.

A hit sits at its cell's centre (`calofm.geometry` R/PHI/Z_CENTRES): x = r cos(phi), y = r sin(phi) in the plane
transverse to the particle, z the depth from the calorimeter front face, all in mm; E in MeV. Back to the mesh,
each hit's energy goes into the cell that contains its position, hits sharing a cell summed, so a point cloud
from any generator (hits anywhere inside the mesh) becomes a shower, and shower -> points -> shower is exact.

On disk (`calofm.data.formats`, format `pointcloud`) a batch is `events` (N, 4, P) float32, rows x, y, z, E,
as CaloClouds II's `events`: each shower's hits first (in the mesh's (r, phi, z) order), then zero padding
(E = 0), P the most hits of any shower in the file.
"""

from __future__ import annotations

import math

import numpy as np

from calofm.geometry import DPHI, DR_MM, DZ_MM, N_PHI, N_R, N_Z, PHI_CENTRES, R_CENTRES, SHAPE, Z_CENTRES

_X = np.outer(R_CENTRES, np.cos(PHI_CENTRES)).astype(np.float32)  # (r, phi)
_Y = np.outer(R_CENTRES, np.sin(PHI_CENTRES)).astype(np.float32)
_Z = np.array(Z_CENTRES, dtype=np.float32)


def to_points(showers: np.ndarray) -> np.ndarray:
    """(N, 9, 16, 45) MeV -> events (N, 4, P) float32: every cell with E > 0 as a hit at its centre."""
    lit = showers > 0
    n_hits = lit.reshape(len(showers), -1).sum(axis=1)
    events = np.zeros((len(showers), 4, int(n_hits.max(initial=0))), np.float32)
    n, ir, ip, iz = np.nonzero(lit)  # row-major: shower by shower, cells in (r, phi, z) order
    slot = np.arange(len(n)) - np.repeat(np.cumsum(n_hits) - n_hits, n_hits)
    events[n, 0, slot], events[n, 1, slot], events[n, 2, slot] = _X[ir, ip], _Y[ir, ip], _Z[iz]
    events[n, 3, slot] = showers[lit]
    return events


def from_points(events: np.ndarray, source: str = "events") -> np.ndarray:
    """events (N, 4, P) -> showers (N, 9, 16, 45) float32 MeV: each hit with E > 0 summed into its cell.

    A hit outside the mesh (r >= 9 x 4.65 mm, or z outside [0, 45 x 3.4) mm) is a ValueError naming `source`, the
    shower and the hit: its energy would otherwise be lost."""
    events = np.asarray(events, dtype=np.float32)
    if events.ndim != 3 or events.shape[1] != 4:
        raise ValueError(f"{source}: expected point clouds of shape (N, 4, P) (rows x, y, z, E), got {events.shape}")
    n, k = np.nonzero(events[:, 3] > 0)
    x, y, z, e = (events[n, row, k] for row in range(4))
    ir = np.floor(np.hypot(x, y, dtype=np.float64) / DR_MM).astype(np.int64)
    ip = np.floor(np.mod(np.arctan2(y, x, dtype=np.float64), 2 * math.pi) / DPHI).astype(np.int64) % N_PHI
    iz = np.floor(z.astype(np.float64) / DZ_MM).astype(np.int64)
    outside = (ir >= N_R) | (iz < 0) | (iz >= N_Z)
    if outside.any():
        i = int(np.argmax(outside))
        raise ValueError(f"{source}: shower {n[i]}, hit {k[i]} at (x, y, z) = ({x[i]:.4g}, {y[i]:.4g}, {z[i]:.4g}) mm "
                         f"lies outside the mesh (r < {N_R * DR_MM:.4g} mm, 0 <= z < {N_Z * DZ_MM:.4g} mm)")
    showers = np.zeros((len(events), *SHAPE), np.float32)
    np.add.at(showers, (n, ir, ip, iz), e)
    return showers
