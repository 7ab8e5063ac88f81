import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from calofm.data.loader import ShowerStream, find_detector_files, fit_normalizer
from calofm.data.transforms import N_COND, Normalizer
from calofm.geometry import PRETRAIN_DETECTORS, default_slot_map

DETS = list(PRETRAIN_DETECTORS)


@pytest.fixture(scope="module")
def files(data_dir):
    return find_detector_files(data_dir, DETS)


def stream(files, **kw):
    args = dict(slot_map=default_slot_map(DETS), n_slots=5, normalizer=Normalizer(-10.0, 5.0), batch_size=8,
                chunk_size=32, seed=3)
    return ShowerStream(files, **{**args, **kw})


def take(s, n):
    return list(itertools.islice(iter(s), n))


def energies(batch):  # the (encoded) incident energy identifies a shower: continuous, so unique
    return set(batch["cond"][:, 0].tolist())


def test_batches_are_balanced_and_well_formed(files):
    for b in take(stream(files, batch_size=10), 4):
        assert b["x"].shape == (10, 9, 16, 45) and b["cond"].shape == (10, N_COND + 5)
        counts = np.bincount(b["slot"].numpy(), minlength=4)
        assert counts.max() - counts.min() <= 1 and counts.sum() == 10
        torch.testing.assert_close(b["cond"][:, N_COND:].argmax(1), b["slot"])


def test_ranks_see_disjoint_showers(files):
    # 200 showers per detector in 8 chunks of 25, 2 ranks: 100 per rank per epoch = 50 batches of 2 per detector
    seen = [set().union(*map(energies, take(stream(files, rank=r, world_size=2, chunk_size=25), 50)))
            for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4 * 100
    assert not seen[0] & seen[1]


def test_an_epoch_covers_every_shower_once(files):
    seen = [e for b in take(stream(files, batch_size=4), 200) for e in energies(b)]
    assert len(seen) == len(set(seen)) == 800


def test_resume_position_reproduces_the_stream(files):
    full = take(stream(files), 12)
    resumed = take(stream(files, start_batch=7), 5)
    for a, b in zip(full[7:], resumed):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["cond"], b["cond"])


def test_workers_reproduce_the_single_process_order(files):
    single = take(stream(files), 6)
    multi = list(itertools.islice(DataLoader(stream(files), batch_size=None, num_workers=2), 6))
    for a, b in zip(single, multi):
        assert torch.equal(a["x"], b["x"])


def test_missing_detector_and_slot_errors(data_dir, files):
    with pytest.raises(FileNotFoundError, match="no shower file for detector 'odd'"):
        find_detector_files(data_dir / "par04_siw.h5", ["odd"])
    with pytest.raises(ValueError, match="unknown detector 'atlas'"):
        find_detector_files(data_dir, ["atlas"])
    with pytest.raises(ValueError, match="no slot"):
        stream({"fccee_allegro": data_dir / "fccee_allegro.h5"})


def test_normaliser_is_one_scalar_over_all_detectors(files):
    n = fit_normalizer(files, max_per_detector=50)
    assert np.isfinite(n.mean) and n.std > 0
    # fitting on one detector alone gives a different transform: the shared one really pools them
    assert fit_normalizer({"odd": files["odd"]}, max_per_detector=50).mean != pytest.approx(n.mean)
