"""Several particle types in one model: a particle one-hot beside the detector's (model.particles), trained on a
file of photons and pions, generating each with its own depth; `calofm adapt --particle` adds one to a pretrained
model; a photon-only model refuses other particles by file and by name."""

import math

import numpy as np
import pytest

from calofm.config import load_config
from calofm.data.synthetic import synthesize
from calofm.generate import generate_showers
from calofm.hub import load_model
from calofm.particles import PARTICLES

FAST = ["train.checkpoint_every=1000", "train.log_every=10", "model.patch=[3,4,5]", "data.detectors=[odd]"]


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    synthesize(d, ["odd"], 600, seed=4, particles=["photon", "pion"])
    return d


def depth(showers) -> np.ndarray:
    layers = showers.sum(axis=(1, 2), dtype=np.float64)
    return layers @ np.arange(layers.shape[1]) / np.maximum(layers.sum(axis=1), 1e-12)


def test_a_model_of_photons_and_pions_makes_each_with_its_own_depth(mixed_dir, tmp_path):
    """150 steps on 600 odd showers, half pions: at 50 GeV the generated pions' mean depth lies beyond the photons'
    by more than three standard errors and a quarter of the data's difference (measured: data 15.2 layers deeper,
    generated 5.5 +- 0.5; 150 steps learn a third of it)."""
    from calofm.train.pretrain import pretrain

    cfg = load_config(None, [f"data.dir={mixed_dir}", f"output_dir={tmp_path}", "train.steps=150",
                             "train.batch_size=32", "train.lr=2e-3", "model.particles=[photon,pion]", *FAST])
    model = load_model(pretrain(cfg))
    assert model.particle_map == {"photon": 0, "pion": 1} and model.n_particle_slots == 2
    n = 128
    cond = (np.full(n, 50e3), np.full(n, math.pi / 2), np.full(n, 0.3))
    gen = {p: generate_showers(model, "odd", *cond, steps=8, seed=1, pdg=PARTICLES[p]) for p in ("photon", "pion")}
    assert (gen["pion"].pdg == 211).all()
    from calofm.data.synthetic import generate

    data = {p: generate("odd", n, 9, 50e3, 0.3, math.pi / 2, particles=[p]) for p in ("photon", "pion")}
    gap_data = depth(data["pion"].showers).mean() - depth(data["photon"].showers).mean()
    d_pi, d_g = depth(gen["pion"].showers), depth(gen["photon"].showers)
    gap_gen, error = d_pi.mean() - d_g.mean(), math.hypot(d_pi.std(), d_g.std()) / math.sqrt(n)
    assert gap_data > 10 and gap_gen > max(3 * error, 0.25 * gap_data), (gap_data, gap_gen, error)
    with pytest.raises(ValueError, match=r"this model: no particle slot for the electron \(PDG 11\); it knows: "
                                         r"photon, pion$"):
        generate_showers(model, "odd", *cond, pdg=11)


def test_adapt_adds_a_particle_and_training_refuses_particles_without_a_slot(mixed_dir, data_dir, tmp_path):
    from calofm.train.adapt import adapt
    from calofm.train.pretrain import pretrain

    cfg = load_config(None, [f"data.dir={data_dir}", f"output_dir={tmp_path / 'pre'}", "train.steps=2",
                             "train.batch_size=8", "model.particles=[photon]", "model.n_free_particle_slots=1",
                             *FAST])
    base = pretrain(cfg)
    cfg = load_config(None, [f"adapt.pretrained={base}", "adapt.detector=odd", "adapt.particle=pion",
                             f"adapt.data={mixed_dir / 'odd.h5'}", f"output_dir={tmp_path / 'ad'}", "train.steps=2",
                             "train.batch_size=8", "adapt.cd_steps=0", *FAST])
    with pytest.raises(ValueError, match=r"odd.h5: no particle slot for the pion \(PDG 211\); it knows: photon$"):
        pretrain(load_config(None, [f"data.dir={mixed_dir}", f"output_dir={tmp_path / 'x'}", "train.steps=2",
                                    "train.batch_size=8", "model.particles=[photon]", *FAST]))
    adapted = load_model(adapt(cfg) / "edm")
    assert adapted.particle_map == {"photon": 0, "pion": 1} and adapted.slot_map == load_model(base).slot_map
    s = generate_showers(adapted, "odd", [2e4], [1.5], [0.3], steps=2, pdg=211)
    assert np.isfinite(s.showers).all() and s.pdg.tolist() == [211]
    again = load_config(None, [f"adapt.pretrained={tmp_path / 'ad' / 'edm'}", "adapt.detector=odd",
                               "adapt.particle=pion", f"adapt.data={mixed_dir / 'odd.h5'}",
                               f"output_dir={tmp_path / 'ad2'}", "adapt.cd_steps=0", *FAST])
    with pytest.raises(ValueError, match=r"particle 'pion' already has slot 1 in .*adapt.continue_slot=true"):
        adapt(again)


def test_a_photon_only_model_makes_photons_only(tiny_edm):
    model = load_model(tiny_edm)
    assert model.n_particle_slots == 0 and model.particle_map == {}
    with pytest.raises(ValueError, match=r"this model: no particle slot for the pion \(PDG 211\); it knows: photon "
                                         r"\(a photon-only model; set model.particles\)"):
        generate_showers(model, "odd", [2e4], [1.5], [0.3], pdg=211)
