"""LEMURS, CaloChallenge dataset-2 and point-cloud HDF5 files: streaming readers, atomic writers, conversion,
validation.

All formats hold showers on the same 9 x 16 x 45 mesh (`calofm.geometry`); in memory a batch is always a
`Showers` with arrays in (r, phi, z) order and float32 MeV.

- LEMURS: `showers` (N, 9, 16, 45), `incident_energy`, `incident_phi`, `incident_theta` (N,), all float32.
- CaloChallenge dataset-2: `incident_energies` (N, 1) float64 (the CaloChallenge classifier needs float64) and
  `showers` (N, 6480) float32, flattened in (z, alpha, r) order, i.e. flat index z*144 + alpha*9 + r. Our files
  also carry `incident_phi` / `incident_theta` (N,) float32 so LEMURS -> CaloChallenge -> LEMURS is bit-exact;
  a file without them (a real dataset-2 file) is read as normal incidence: theta = pi/2, phi = 0.
- point cloud (CaloClouds-style, `calofm.data.pointcloud`): `events` (N, 4, P) float32, one hit (x, y, z in mm,
  E in MeV) per lit cell then zero padding, and LEMURS's three condition keys.

Every format may also carry `incident_pdg` (N,) int32, the incident particle's PDG code (`calofm.particles`); a
file without it (every LEMURS and CaloChallenge file) holds photons. calofm's writers always write it.

Datasets are chunked along N (64 showers, ~1.7 MB per chunk) and gzip-compressed, so reading a slice of a
1M-shower file decompresses only the chunks it touches. Structure (keys, shapes, dtypes, lengths, the
`detector` attribute) is checked when a file is opened; values (finite, non-negative deposits, conditions in
range) are checked on every batch read, so streaming never needs a pass over the whole file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from calofm.data.pointcloud import from_points, to_points
from calofm.geometry import (
    DETECTORS,
    E_MIN_MEV,
    EMAX_GLOBAL_MEV,
    N_CELLS,
    N_PHI,
    N_R,
    N_Z,
    PHI_RANGE,
    SHAPE,
    THETA_RANGE,
)
from calofm.io import atomic_path
from calofm.particles import NAMES, PARTICLES

FORMATS = ("lemurs", "calochallenge", "pointcloud")

# On-disk key of each Showers field, per format.
KEYS = {
    "lemurs": {"showers": "showers", "energy": "incident_energy", "phi": "incident_phi", "theta": "incident_theta"},
    "calochallenge": {"showers": "showers", "energy": "incident_energies", "phi": "incident_phi",
                      "theta": "incident_theta"},
    "pointcloud": {"showers": "events", "energy": "incident_energy", "phi": "incident_phi", "theta": "incident_theta"},
}
# A real dataset-2 file has no angles: normal incidence.
CALOCHALLENGE_DEFAULT_THETA = math.pi / 2
CALOCHALLENGE_DEFAULT_PHI = 0.0
PDG_KEY = "incident_pdg"     # optional in every format; absent: photons

CHUNK_SHOWERS = 64             # HDF5 chunk along N for the showers dataset
CHUNK_HITS = 512               # ... and along the hits of a point-cloud file's `events`
CHUNK_CONDITIONS = 4096        # ... and for the (N,) condition datasets
COMPRESSION = {"compression": "gzip", "compression_opts": 4}
READ_CACHE_BYTES = 64 << 20    # h5py chunk cache: holds whole chunks so consecutive small reads stay cheap
WRITE_BLOCK = 1024             # showers transposed/written at once

# Conditions may sit on the range edges up to float rounding; these tolerances absorb it.
ENERGY_REL_TOL = 1e-3
ANGLE_ABS_TOL = 1e-4


class ShowerFormatError(ValueError):
    """A shower file (or a batch about to be written) that breaks the data contract; names file, key, value."""


@dataclass
class Showers:
    """An in-memory batch of showers: the unit every reader returns and every writer takes."""

    showers: np.ndarray  # (N, 9, 16, 45) float32 MeV, order (r, phi, z)
    energy: np.ndarray   # (N,) float32 incident energy, MeV
    phi: np.ndarray      # (N,) float32 rad
    theta: np.ndarray    # (N,) float32 rad
    pdg: np.ndarray | None = None  # (N,) int32 PDG code of the incident particle; None: photons (22)

    def __post_init__(self):
        for name in ("showers", "energy", "phi", "theta"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float32))
        n = len(self.showers)
        self.pdg = np.full(n, PARTICLES["photon"], np.int32) if self.pdg is None else np.asarray(self.pdg, np.int32)
        if self.showers.shape[1:] != SHAPE or self.showers.ndim != 4:
            raise ValueError(f"Showers.showers has shape {self.showers.shape}; expected (N, {N_R}, {N_PHI}, {N_Z})")
        for name in ("energy", "phi", "theta", "pdg"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"Showers.{name} has shape {getattr(self, name).shape}; expected ({n},)")

    def __len__(self) -> int:
        return len(self.showers)

    def __getitem__(self, idx) -> Showers:
        """Slice, index array or boolean mask on all arrays; an integer gives a batch of one."""
        if isinstance(idx, (int, np.integer)):
            idx = [idx]
        return Showers(self.showers[idx], self.energy[idx], self.phi[idx], self.theta[idx], self.pdg[idx])

    @staticmethod
    def concat(parts: list[Showers]) -> Showers:
        if not parts:
            return Showers(np.zeros((0, *SHAPE)), np.zeros(0), np.zeros(0), np.zeros(0))
        return Showers(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Showers)))


def detector_emax(detector: str | None) -> float:
    """Upper incident-energy bound: the detector's Emax, or the global 1 TeV when the detector is unknown."""
    return EMAX_GLOBAL_MEV if detector is None else DETECTORS[detector].emax_mev


def check_values(s: Showers, file, keys: dict[str, str], emax_mev: float, index: np.ndarray) -> None:
    """Raise ShowerFormatError on the first non-finite or negative deposit or out-of-range condition.

    `index[i]` is the file index of row i, so the message points at the offending shower in the file.
    """
    if len(s) == 0:
        return
    x = s.showers
    lo, hi = x.min(), x.max()  # one cheap pass each; a NaN propagates into both
    if not (lo >= 0 and hi < np.inf):
        i, r, p, z = np.unravel_index(np.flatnonzero(~(np.isfinite(x) & (x >= 0)))[0], x.shape)
        why = "not finite" if not np.isfinite(x[i, r, p, z]) else "negative"
        raise ShowerFormatError(
            f"{file}: {keys['showers']}[{index[i]}] has deposit {x[i, r, p, z]} MeV at (r, phi, z) = "
            f"({r}, {p}, {z}): {why}; deposits must be finite and >= 0 MeV")
    unknown = np.flatnonzero(~np.isin(s.pdg, list(NAMES)))
    if unknown.size:
        i = unknown[0]
        raise ShowerFormatError(f"{file}: {PDG_KEY}[{index[i]}] = {s.pdg[i]} is not a known particle's PDG code; "
                                f"known: {', '.join(f'{c} ({n})' for c, n in NAMES.items())}")
    bounds = {
        "energy": (E_MIN_MEV * (1 - ENERGY_REL_TOL), emax_mev * (1 + ENERGY_REL_TOL), "MeV"),
        "theta": (THETA_RANGE[0] - ANGLE_ABS_TOL, THETA_RANGE[1] + ANGLE_ABS_TOL, "rad"),
        "phi": (PHI_RANGE[0] - ANGLE_ABS_TOL, PHI_RANGE[1] + ANGLE_ABS_TOL, "rad"),
    }
    for name, (low, high, unit) in bounds.items():
        v = getattr(s, name)
        bad = np.flatnonzero(~((v >= low) & (v <= high)))  # NaN fails both comparisons
        if bad.size:
            i = bad[0]
            raise ShowerFormatError(
                f"{file}: {keys[name]}[{index[i]}] = {v[i]} {unit} is outside [{low:.6g}, {high:.6g}] {unit}")


def _attr(value):
    """HDF5 attribute -> plain Python value (str, bool, number) so attrs compare and print naturally."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_detector(file, attrs: dict) -> str | None:
    detector = attrs.get("detector")
    if detector is not None and detector not in DETECTORS:
        raise ShowerFormatError(
            f"{file}: attribute 'detector' = {detector!r} is not a known detector; known: {', '.join(DETECTORS)}")
    return detector


def _first_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return text.splitlines()[0] if text else type(e).__name__


class ShowerFile:
    """Lazy reader of a LEMURS, CaloChallenge-DS2 or point-cloud file (format detected from its keys); reads only
    what is asked. A point-cloud file reads as showers on the mesh (`calofm.data.pointcloud.from_points`).

    A CaloChallenge file without `incident_theta` / `incident_phi` (a real dataset-2 file) reads as normal
    incidence, theta = pi/2 and phi = 0.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such shower file")
        try:
            self._h5 = h5py.File(self.path, "r", rdcc_nbytes=READ_CACHE_BYTES)
        except OSError as e:
            raise ShowerFormatError(f"{self.path}: not a readable HDF5 file ({e})") from None
        try:
            self._open()
        except ShowerFormatError:
            self._h5.close()
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:  # h5py on damaged metadata
            self._h5.close()
            raise ShowerFormatError(f"{self.path}: damaged HDF5 metadata ({_first_line(e)})") from None
        except BaseException:
            self._h5.close()
            raise

    def _open(self) -> None:
        h5, file = self._h5, self.path
        found = sorted(h5.keys())
        lemurs, cc = set(KEYS["lemurs"].values()), {"showers", "incident_energies"}
        if "events" in h5 and "showers" not in h5:
            self.format = "pointcloud"
            required = set(KEYS["pointcloud"].values())
        elif "incident_energies" in h5 and "incident_energy" not in h5:
            self.format = "calochallenge"
            required = cc
        elif "incident_energy" in h5 and "incident_energies" not in h5:
            self.format = "lemurs"
            required = lemurs
        else:
            raise ShowerFormatError(
                f"{file}: not a shower file: expected keys {sorted(lemurs)} (LEMURS), {sorted(cc)} "
                f"(CaloChallenge dataset-2) or {sorted(KEYS['pointcloud'].values())} (point cloud); found {found}")
        missing = sorted(required - set(found))
        if missing:
            raise ShowerFormatError(
                f"{file}: {self.format} file lacks key {missing[0]!r}: expected {sorted(required)}, found {found}")
        keys = {**KEYS[self.format], "pdg": PDG_KEY}
        self.keys = keys
        self._ds = {name: h5[key] for name, key in keys.items() if key in h5}
        for name, ds in self._ds.items():
            if not isinstance(ds, h5py.Dataset):
                raise ShowerFormatError(f"{file}: key {keys[name]!r} is a group, expected a dataset")
            kind, what = (np.integer, "integer") if name == "pdg" else (np.floating, "floating point")
            if not np.issubdtype(ds.dtype, kind):
                raise ShowerFormatError(f"{file}: key {keys[name]!r} has dtype {ds.dtype}; expected {what}")
        n = self._ds["showers"].shape[0] if self._ds["showers"].ndim else 0
        hits = self._ds["showers"].shape[2] if self._ds["showers"].ndim == 3 else 0
        expected = {
            "showers": {"lemurs": (n, *SHAPE), "calochallenge": (n, N_CELLS), "pointcloud": (n, 4, hits)}[self.format],
            "energy": (n, 1) if self.format == "calochallenge" else (n,),
            "phi": (n,),
            "theta": (n,),
            "pdg": (n,),
        }
        for name, ds in self._ds.items():
            if ds.shape != expected[name]:
                if name != "showers" and ds.ndim == len(expected[name]) and ds.shape[1:] == expected[name][1:]:
                    raise ShowerFormatError(
                        f"{file}: key {keys[name]!r} has {ds.shape[0]} entries but 'showers' has {n}")
                raise ShowerFormatError(
                    f"{file}: key {keys[name]!r} has shape {ds.shape}; expected {expected[name]}")
        if n == 0:
            raise ShowerFormatError(f"{file}: key 'showers' holds no showers")
        self._n = n
        self.attrs = {k: _attr(v) for k, v in self._h5.attrs.items()}
        self.detector = _check_detector(file, self.attrs)
        self.emax_mev = detector_emax(self.detector)

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"ShowerFile({str(self.path)!r}, format={self.format!r}, detector={self.detector!r}, n={self._n})"

    def _get(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one dataset; a damaged chunk is an error naming the file, key and showers."""
        ds = self._ds[key]
        try:
            return ds[start:stop]
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise OSError(f"{self.path}: key {ds.name.lstrip('/')!r}, showers {start}-{stop - 1}: cannot be read "
                          f"({_first_line(e)}); the file is damaged") from None

    def _read_slice(self, start: int, stop: int) -> Showers:
        n = stop - start
        x, energy = self._get("showers", start, stop), self._get("energy", start, stop)
        if self.format == "calochallenge":  # (n, z*alpha*r) -> (n, r, alpha, z)
            x, energy = x.reshape(n, N_Z, N_PHI, N_R).transpose(0, 3, 2, 1), energy[:, 0]
        elif self.format == "pointcloud":
            try:
                x = from_points(x, f"{self.path}: key 'events'")
            except ValueError as e:
                raise ShowerFormatError(f"{e} (showers counted from {start})") from None
        phi = self._get("phi", start, stop) if "phi" in self._ds else np.full(n, CALOCHALLENGE_DEFAULT_PHI)
        theta = self._get("theta", start, stop) if "theta" in self._ds else np.full(n, CALOCHALLENGE_DEFAULT_THETA)
        pdg = self._get("pdg", start, stop) if "pdg" in self._ds else None
        return Showers(np.ascontiguousarray(x, dtype=np.float32), energy, phi, theta, pdg)

    def read(self, start: int = 0, stop: int | None = None) -> Showers:
        """Showers [start, stop) (Python slice semantics), validated."""
        start, stop, _ = slice(start, stop).indices(self._n)
        stop = max(start, stop)
        s = self._read_slice(start, stop)
        check_values(s, self.path, self.keys, self.emax_mev, np.arange(start, stop))
        return s

    def read_indices(self, idx) -> Showers:
        """Showers at any indices (any order, repeats and negatives allowed), validated.

        Sorted unique indices are grouped into contiguous runs, one slice read per run (h5py fancy indexing
        is slow on long index lists).
        """
        idx = np.asarray(idx)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise ValueError(f"{self.path}: indices must be a 1-D integer array, got shape {idx.shape} {idx.dtype}")
        idx = idx.astype(np.int64)
        out = (idx < -self._n) | (idx >= self._n)
        if out.any():
            raise IndexError(f"{self.path}: index {idx[out][0]} out of range for {self._n} showers")
        idx = np.where(idx < 0, idx + self._n, idx)
        uniq, inverse = np.unique(idx, return_inverse=True)
        runs = np.split(uniq, np.flatnonzero(np.diff(uniq) != 1) + 1) if uniq.size else []
        s = Showers.concat([self._read_slice(int(r[0]), int(r[-1]) + 1) for r in runs])[inverse]
        check_values(s, self.path, self.keys, self.emax_mev, idx)
        return s

    def iter_chunks(self, chunk_size: int = 1024) -> Iterator[Showers]:
        """Consecutive validated batches of `chunk_size` showers (the last may be shorter)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        for start in range(0, self._n, chunk_size):
            yield self.read(start, start + chunk_size)

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> ShowerFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_showers(path: str | Path) -> ShowerFile:
    return ShowerFile(path)


def read_showers(path: str | Path) -> Showers:
    """The whole file in memory: small files only (1M showers are 26 GB); stream big ones with iter_chunks."""
    with open_showers(path) as f:
        return f.read()


def write_stream(path: str | Path, fmt: str, n: int, attrs: dict | None, parts: Iterable[Showers]) -> None:
    """Create the datasets for `n` showers, fill them from `parts` in order (validated), rename into place.

    Memory is one part at a time, so files of any size can be written from a generator."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown shower format {fmt!r}; expected one of {', '.join(FORMATS)}")
    path, attrs = Path(path), dict(attrs or {})
    if n == 0:
        raise ShowerFormatError(f"{path}: refusing to write a file with no showers")
    emax = detector_emax(_check_detector(path, attrs))
    keys = KEYS[fmt]
    shower_shape = {"lemurs": SHAPE, "calochallenge": (N_CELLS,), "pointcloud": (4, 0)}[fmt]
    hits = {"maxshape": (n, 4, None), "chunks": (min(n, CHUNK_SHOWERS), 4, CHUNK_HITS)} if fmt == "pointcloud" else {
        "chunks": (min(n, CHUNK_SHOWERS), *shower_shape)}
    cond = {"chunks": (min(n, CHUNK_CONDITIONS),), **COMPRESSION}
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as h5:
        for k, v in attrs.items():
            try:
                h5.attrs[k] = v
            except (TypeError, ValueError) as e:
                raise ShowerFormatError(f"{path}: attribute {k!r} = {v!r} cannot be stored in HDF5 ({e})") from None
        ds = {
            "showers": h5.create_dataset(keys["showers"], (n, *shower_shape), np.float32, **hits, **COMPRESSION),
            "energy": (h5.create_dataset("incident_energy", (n,), np.float32, **cond) if fmt != "calochallenge" else
                       h5.create_dataset("incident_energies", (n, 1), np.float64,
                                         chunks=(min(n, CHUNK_CONDITIONS), 1), **COMPRESSION)),
            "phi": h5.create_dataset("incident_phi", (n,), np.float32, **cond),
            "theta": h5.create_dataset("incident_theta", (n,), np.float32, **cond),
            "pdg": h5.create_dataset(PDG_KEY, (n,), np.int32, **cond),
        }
        start = 0
        for s in parts:
            stop = start + len(s)
            if stop > n:
                raise ValueError(f"{path}: got more than the {n} showers announced")
            check_values(s, path, {**keys, "pdg": PDG_KEY}, emax, np.arange(start, stop))
            if fmt == "lemurs":
                ds["showers"][start:stop] = s.showers
            elif fmt == "calochallenge":  # (m, r, alpha, z) -> (m, z*alpha*r)
                ds["showers"][start:stop] = s.showers.transpose(0, 3, 2, 1).reshape(len(s), N_CELLS)
            else:  # the hits dimension grows to the most hits seen so far; the rest stays zero padding
                events = to_points(s.showers)
                if events.shape[2] > ds["showers"].shape[2]:
                    ds["showers"].resize(events.shape[2], axis=2)
                ds["showers"][start:stop, :, :events.shape[2]] = events
            if fmt == "calochallenge":
                ds["energy"][start:stop, 0] = s.energy
            else:
                ds["energy"][start:stop] = s.energy
            ds["phi"][start:stop] = s.phi
            ds["theta"][start:stop] = s.theta
            ds["pdg"][start:stop] = s.pdg
            start = stop
        if start != n:
            raise ValueError(f"{path}: got {start} showers, {n} announced")


def write_showers(path: str | Path, s: Showers, fmt: str = "lemurs", attrs: dict | None = None) -> None:
    """Write `s` atomically in format `fmt`, validated first: a writer never makes a file the reader rejects."""
    write_stream(path, fmt, len(s), attrs, (s[i:i + WRITE_BLOCK] for i in range(0, len(s), WRITE_BLOCK)))


def write_lemurs(path: str | Path, s: Showers, attrs: dict | None = None) -> None:
    write_showers(path, s, "lemurs", attrs)


def write_calochallenge(path: str | Path, s: Showers, attrs: dict | None = None) -> None:
    """Dataset-2 keys plus `incident_phi` / `incident_theta`, so conversion back to LEMURS is bit-exact."""
    write_showers(path, s, "calochallenge", attrs)


def convert(src: str | Path, dst: str | Path, to: str, chunk_size: int = 1024) -> None:
    """Stream `src` (either format) into `dst` in format `to`, copying the file attributes."""
    if to not in FORMATS:
        raise ValueError(f"unknown shower format {to!r}; expected one of {', '.join(FORMATS)}")
    with open_showers(src) as f, tqdm(total=len(f), unit="shower", desc=f"convert {f.path.name} -> {to}") as bar:

        def chunks() -> Iterator[Showers]:
            for s in f.iter_chunks(chunk_size):
                yield s
                bar.update(len(s))

        write_stream(dst, to, len(f), f.attrs, chunks())
