"""Detector registry and the shared virtual mesh.

Every detector is seen through the same cylindrical scoring mesh (the CaloChallenge dataset-2 mesh), so one
model can learn them all; a detector differs only by its one-hot slot and by the physics it puts on the mesh.
The physics constants below are effective stand-in values (per mm of the mesh's z axis) that give each detector
the response, resolution and shower shape of its kind (sampling or homogeneous, its X0 and Moliere radius);
README.md, "The embedded data are a stand-in".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The mesh: (r, phi, z) cells, order of every shower array in memory.
N_R, N_PHI, N_Z = 9, 16, 45
SHAPE = (N_R, N_PHI, N_Z)
N_CELLS = N_R * N_PHI * N_Z
DR_MM = 4.65
DZ_MM = 3.4
DPHI = 2 * math.pi / N_PHI
# Cell centres (mm, rad): r and z from the shower axis and the calorimeter front face, phi from the mesh's x axis.
R_CENTRES = tuple((i + 0.5) * DR_MM for i in range(N_R))
PHI_CENTRES = tuple((j + 0.5) * DPHI for j in range(N_PHI))
Z_CENTRES = tuple((k + 0.5) * DZ_MM for k in range(N_Z))
# Transverse position (mm) of each (r, phi) cell centre in the mesh's frame, float64 (N_R, N_PHI).
CELL_X = np.outer(R_CENTRES, np.cos(PHI_CENTRES))
CELL_Y = np.outer(R_CENTRES, np.sin(PHI_CENTRES))

# Condition ranges shared by all detectors (MeV, rad).
E_MIN_MEV = 1_000.0
EMAX_GLOBAL_MEV = 1_000_000.0
THETA_RANGE = (0.87, 2.27)
PHI_RANGE = (0.0, 2 * math.pi)

# Voxels below this are noise in Geant4 scoring (and in the CaloChallenge evaluation).
THRESHOLD_MEV = 15.15e-3


@dataclass(frozen=True)
class Detector:
    name: str
    x0_mm: float            # radiation length
    rm_mm: float            # Moliere radius
    ec_mev: float           # critical energy
    sampling_fraction: float
    stochastic_term: float  # a in sigma_E / E = a / sqrt(E[GeV])
    emax_mev: float
    structure: str          # uniform | gaps_cracks | polygon | turbine
    pretrain: bool          # one of the K pretraining detectors (fixed slot) or held out for adaptation


DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in (
        Detector("par04_siw", 4.4, 12.0, 9.0, 0.020, 0.17, 1e6, "uniform", True),
        Detector("par04_scipb", 9.0, 25.0, 10.0, 0.080, 0.12, 1e6, "uniform", True),
        Detector("odd", 5.5, 14.0, 9.0, 0.015, 0.18, 1e6, "gaps_cracks", True),
        Detector("fccee_cld", 5.0, 15.0, 9.0, 0.018, 0.15, 1e5, "polygon", True),
        Detector("fccee_allegro", 12.0, 35.0, 11.0, 0.144, 0.08, 1e5, "turbine", False),
    )
}

PRETRAIN_DETECTORS: tuple[str, ...] = tuple(n for n, d in DETECTORS.items() if d.pretrain)
NEW_DETECTOR = "fccee_allegro"


def get_detector(name: str) -> Detector:
    try:
        return DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}") from None


def default_slot_map(detectors: tuple[str, ...] | list[str] = PRETRAIN_DETECTORS) -> dict[str, int]:
    """Slots 0..K-1 for the pretraining detectors, in the Par04 contract's order."""
    return {name: i for i, name in enumerate(detectors)}
