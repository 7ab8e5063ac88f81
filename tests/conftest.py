"""Shared fixtures: a small synthetic data folder and a briefly trained tiny model, built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """200 synthetic showers for each of the five detectors: `<dir>/<detector>.h5`."""
    from calofm.data.synthetic import synthesize
    from calofm.geometry import DETECTORS

    d = tmp_path_factory.mktemp("data")
    synthesize(d, list(DETECTORS), 200, seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_edm(tmp_path_factory, data_dir):
    """A tiny EDM model pretrained for a few steps on the four pretraining detectors (a model folder); coarse
    3x4x5 patches (108 tokens) keep the tests that train or sample from it fast."""
    from calofm.config import load_config
    from calofm.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(None, [f"data.dir={data_dir}", f"output_dir={out}", "train.steps=40", "train.batch_size=16",
                             "train.checkpoint_every=1000", "train.lr=2e-3", "train.log_every=1",
                             "model.patch=[3,4,5]"])
    return pretrain(cfg)
