"""The incident particles calofm knows, by name and PDG Monte Carlo code (PDG review, "Monte Carlo particle
numbering scheme"). A shower file without a particle key holds photons, as CaloDiT-2's data do."""

from __future__ import annotations

PARTICLES: dict[str, int] = {"photon": 22, "electron": 11, "pion": 211}  # pion: pi+
PHOTON = "photon"
NAMES: dict[int, str] = {code: name for name, code in PARTICLES.items()}


def particle_code(name: str) -> int:
    try:
        return PARTICLES[name]
    except KeyError:
        raise ValueError(f"unknown particle {name!r}; known: {', '.join(PARTICLES)}") from None
