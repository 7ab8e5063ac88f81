"""The incident particles calofm knows, by name and PDG Monte Carlo code (PDG review, "Monte Carlo particle
numbering scheme"). A shower file without a particle key holds photons, as CaloDiT-2's data do."""

from __future__ import annotations

import numpy as np

PARTICLES: dict[str, int] = {"photon": 22, "electron": 11, "pion": 211}  # pion: pi+
PHOTON = "photon"
NAMES: dict[int, str] = {code: name for name, code in PARTICLES.items()}


def particle_code(name: str) -> int:
    try:
        return PARTICLES[name]
    except KeyError:
        raise ValueError(f"unknown particle {name!r}; known: {', '.join(PARTICLES)}") from None


def particle_slots(particle_map: dict[str, int], n_particle_slots: int, pdg, source: str) -> np.ndarray:
    """Each PDG code's one-hot particle slot; a model without particle slots knows photons only (slot 0, unused).
    A particle without a slot is a ValueError naming `source` (a file, the model), the particle and the known ones."""
    lookup = {PARTICLES[p]: s for p, s in particle_map.items()} if n_particle_slots else {PARTICLES[PHOTON]: 0}
    pdg = np.asarray(pdg)
    bad = ~np.isin(pdg, list(lookup))
    if bad.any():
        code = int(pdg[bad][0])
        raise ValueError(f"{source}: no particle slot for the {NAMES.get(code, code)} (PDG {code}); it knows: "
                         + ", ".join(NAMES[c] for c in lookup)
                         + ("" if n_particle_slots else " (a photon-only model; set model.particles)"))
    return np.vectorize(lookup.__getitem__, otypes=[np.int64])(pdg)
