"""Multi-detector training stream: balanced across detectors, streamed from HDF5 in chunks, sharded by rank.

The stream is a pure function of (seed, rank, world size, position): chunk order and in-chunk order are seeded
permutations, so a resumed run skips to its position by index arithmetic alone, without reading what it skips,
and every process reads only its own chunks. Accelerate is deliberately not asked to shard it: its
IterableDataset sharding reads the whole batch on every process and slices it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from calofm.data.formats import ShowerFile, Showers, open_showers
from calofm.data.transforms import Normalizer, deposit, encode_conditions
from calofm.geometry import get_detector
from calofm.particles import particle_slots


def find_detector_files(source: str | Path, detectors: list[str]) -> dict[str, Path]:
    """Map each detector to its file: `<dir>/<detector>.h5`, else any file whose `detector` attribute matches.

    `source` may be a folder, a single file (its `detector` attribute names it) or a Hub dataset repo id.
    """
    from calofm.data.sources import resolve

    for name in detectors:
        get_detector(name)
    root = resolve(str(source))
    files = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.suffix in (".h5", ".hdf5"))
    found: dict[str, Path] = {}
    for name in detectors:
        exact = [p for p in files if p.stem == name]
        if exact:
            found[name] = exact[0]
            continue
        for p in files:
            with open_showers(p) as f:
                if f.detector == name:
                    found[name] = p
                    break
        else:
            raise FileNotFoundError(f"{root}: no shower file for detector {name!r} (looked for {name}.h5 and "
                                    f"files whose 'detector' attribute is {name!r})")
    return found


def _chunks(path: Path, max_showers: int | None, chunk_size: int) -> Iterator[Showers]:
    with open_showers(path) as f:
        n = min(len(f), max_showers or len(f))
        for start in range(0, n, chunk_size):
            yield f.read(start, min(start + chunk_size, n))


def detector_response(path: Path, max_showers: int | None = None, chunk_size: int = 1024) -> float:
    """Mean E_dep / E_inc over a detector's file (cells under the threshold left out): its sampling fraction times
    its containment, the one number `detector_response` normalisation needs from a detector."""
    total, n = 0.0, 0
    for s in _chunks(path, max_showers, chunk_size):
        total += float((deposit(s.showers.astype(np.float64)) / s.energy).sum())
        n += len(s.energy)
    if n == 0 or total <= 0:
        raise ValueError(f"{path}: no deposited energy to measure the detector response on")
    return total / n


def fit_normalizer(files: dict[str, Path], max_per_detector: int | None = None, chunk_size: int = 1024,
                   eps: float = 1e-6, unit: str = "mev", centre: bool = False) -> Normalizer:
    """ONE scalar mean/std over all given detectors together, in one streaming pass (two for units that need the
    detector response); with `centre`, the scale of the showers' transverse centre too."""
    response = ({name: detector_response(p, max_per_detector, chunk_size) for name, p in files.items()}
                if unit in ("detector_response", "deposit") else {})
    units = Normalizer(0.0, 1.0, eps=eps, unit=unit, response=response)

    def chunks():
        for name, path in files.items():
            for s in _chunks(path, max_per_detector, chunk_size):
                names = [name] * len(s.energy)
                yield (s.showers, units.unit_mev(s.energy, names, s.showers),
                       units.expected_deposit(s.energy, names) if units.has_deposit else None, s.energy)

    return Normalizer.fit(chunks(), eps=eps, unit=unit, response=response, centre=centre)


def even_counts(total: int, k: int, rotation: int) -> list[int]:
    """`total` split evenly over k detectors, the remainder going to the detectors from `rotation` on (mod k), so
    over consecutive batches every detector gets the same share."""
    base, rem = divmod(total, k)
    return [base + ((d - rotation) % k < rem) for d in range(k)]


@dataclass
class _Cursor:
    """Position in one detector's infinite, per-rank sample sequence: epochs of seeded chunk permutations."""

    n: int
    chunk_size: int
    seed: int
    rank: int
    world: int

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """This rank's sample indices for `epoch`, as a list of (chunk-local, shuffled) index arrays."""
        n_chunks = -(-self.n // self.chunk_size)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n_chunks)
        if n_chunks >= self.world:
            mine = order[self.rank :: self.world]
            idx = [np.arange(c * self.chunk_size, min((c + 1) * self.chunk_size, self.n)) for c in mine]
        else:  # fewer chunks than processes: split samples instead so ranks stay disjoint
            idx = [np.array_split(rng.permutation(self.n), self.world)[self.rank]]
        return [rng.permutation(i) for i in idx]


class ShowerStream(IterableDataset):
    """Infinite stream of batches {x, cond, slot[, deposit]}: x normalised (B, 9, 16, 45), cond (B, N_COND + n_slots
    [+ n_particle_slots]), and for a normaliser with unit `deposit` what the model draws first (B, 1 [+ 2]): the
    encoded E_dep [and transverse centre] (`Normalizer.encode_drawn`). A model without
    particle slots learns photons only; any other particle in its files is an error naming the file."""

    def __init__(self, files: dict[str, Path], slot_map: dict[str, int], n_slots: int, normalizer: Normalizer,
                 batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, start_batch: int = 0,
                 chunk_size: int = 512, max_per_detector: int | None = None,
                 particle_map: dict[str, int] | None = None, n_particle_slots: int = 0):
        missing = [d for d in files if d not in slot_map]
        if missing:
            raise ValueError(f"detector {missing[0]!r} has no slot in the model's slot map {slot_map}")
        self.files, self.slot_map, self.n_slots, self.normalizer = files, slot_map, n_slots, normalizer
        self.particle_map, self.n_particle_slots = dict(particle_map or {}), n_particle_slots
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.start_batch, self.chunk_size = start_batch, chunk_size
        self.names = list(files)
        self.sizes = {}
        for name, path in files.items():
            with open_showers(path) as f:
                self.sizes[name] = min(len(f), max_per_detector or len(f))
            if self.sizes[name] == 0:
                raise ValueError(f"{path}: no showers for detector {name!r}")

    def counts(self, batch: int) -> list[int]:
        """Showers per detector in batch number `batch` (`even_counts`)."""
        return even_counts(self.batch_size, len(self.names), batch)

    def deposit_table(self) -> dict[str, torch.Tensor]:
        """{cond, deposit, slot} of every shower the stream draws from, in file order (needs unit `deposit`):
        what the deposit net's own fit trains on (calofm/train/deposit.py). Conditions and E_dep [and centre], so a few
        hundred bytes a shower."""
        if not self.normalizer.has_deposit:
            raise ValueError(f"the normaliser's unit is {self.normalizer.unit!r}: no deposit to tabulate")
        parts = []
        for name, path in self.files.items():
            parts += [self._encode([(name, s)], with_x=False) for s in _chunks(path, self.sizes[name], self.chunk_size)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _samples(self, d: int, name: str, skip: int) -> Iterator[tuple[ShowerFile, np.ndarray]]:
        """Yield (file, index-array) pieces of detector `name`'s sequence, starting `skip` samples in."""
        cur = _Cursor(self.sizes[name], self.chunk_size, self.seed * 1000 + d, self.rank, self.world)
        with open_showers(self.files[name]) as f:
            epoch = 0
            while True:
                for idx in cur.epoch_plan(epoch):
                    if skip >= len(idx):
                        skip -= len(idx)
                        continue
                    yield f, idx[skip:]
                    skip = 0
                epoch += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        consumed = np.zeros(len(self.names), dtype=np.int64)
        for b in range(self.start_batch):
            consumed += self.counts(b)
        streams = [_Buffered(self._samples(d, n, int(consumed[d]))) for d, n in enumerate(self.names)]
        batch = self.start_batch
        try:
            while True:
                counts = self.counts(batch)
                mine = batch % n_workers == worker
                parts = [s.take(c, read=mine) for s, c in zip(streams, counts)]
                if mine:
                    yield self._collate(parts, counts)
                batch += 1
        finally:  # close the HDF5 files now, not at interpreter shutdown
            for s in streams:
                s.pieces.close()

    def _collate(self, parts: list[Showers], counts: list[int]) -> dict[str, torch.Tensor]:
        return self._encode([(n, p) for n, p, c in zip(self.names, parts, counts) if c])

    def _encode(self, parts: list[tuple[str, Showers]], with_x: bool = True) -> dict[str, torch.Tensor]:
        """The batch of (detector name, showers) pieces; without the normalised cells `x` for `with_x=False`."""
        s = Showers.concat([p for _, p in parts])
        names = [n for n, p in parts for _ in range(len(p.energy))]
        slots = np.array([self.slot_map[n] for n in names], dtype=np.int64)
        unit = self.normalizer.unit_mev(s.energy, names, s.showers)
        particles = torch.from_numpy(np.concatenate([
            particle_slots(self.particle_map, self.n_particle_slots, p.pdg, str(self.files[n])) for n, p in parts]))
        cond = encode_conditions(s.energy, s.theta, s.phi, torch.from_numpy(slots), self.n_slots, particles,
                                 self.n_particle_slots)
        batch = {"cond": cond, "slot": torch.from_numpy(slots)}
        if with_x:
            batch["x"] = torch.from_numpy(self.normalizer.forward(s.showers, unit).astype(np.float32))
        if self.normalizer.has_deposit:
            expected = self.normalizer.expected_deposit(s.energy, names)
            batch["deposit"] = torch.from_numpy(self.normalizer.encode_drawn(unit, expected, s.showers, s.energy))
        return batch


class _Buffered:
    """Hands out `take(m)` samples in the shuffled order; a piece is read (once, as one block) only when needed."""

    def __init__(self, pieces: Iterator[tuple[ShowerFile, np.ndarray]]):
        self.pieces = pieces
        self.f, self.idx, self.pos, self.data = None, np.empty(0, dtype=np.int64), 0, None

    def take(self, m: int, read: bool = True) -> Showers | None:
        out, need = [], m
        while need > 0:
            if self.pos == len(self.idx):
                (self.f, self.idx), self.pos, self.data = next(self.pieces), 0, None
            k = min(need, len(self.idx) - self.pos)
            if read:
                if self.data is None:
                    self.data = _read_shuffled(self.f, self.idx)
                out.append(self.data[self.pos : self.pos + k])
            self.pos += k
            need -= k
        return Showers.concat(out) if out else None


def _read_shuffled(f: ShowerFile, idx: np.ndarray) -> Showers:
    lo, hi = int(idx.min()), int(idx.max()) + 1
    block = f.read(lo, hi)  # one contiguous HDF5 read, then the shuffled order in memory
    return block[idx - lo]
