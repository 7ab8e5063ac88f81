"""Models that draw each shower's total deposit first (normaliser unit `deposit`, the default): the deposit net,
sampling, generation, what adaptation trains, and the energy resolution that a short training reproduces
(benchmarks/fidelity.md). Export parity with the deposit's noise input: tests/test_export.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calofm.config import load_config
from calofm.data.formats import write_showers
from calofm.data.synthetic import generate
from calofm.data.transforms import N_COND, Normalizer, deposit, encode_conditions
from calofm.diffusion import sample
from calofm.generate import generate_showers
from calofm.hub import load_model
from calofm.train.adapt import select_trainable
from calofm.train.pretrain import pretrain


@pytest.fixture(scope="module")
def deposit_edm(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("deposit")
    cfg = load_config(None, [f"data.dir={data_dir}", f"output_dir={out}", "train.steps=10", "train.batch_size=16",
                             "train.checkpoint_every=1000", "model.patch=[3,4,5]", "data.unit=deposit",
                             "data.log_eps=5e-6"])
    return load_model(pretrain(cfg)).eval()


def test_deposit_model_draws_the_deposit_that_its_showers_carry(deposit_edm):
    m = deposit_edm
    assert m.deposit_net is not None and m.normalizer["unit"] == "deposit"
    assert m.cond_embed[0].in_features == N_COND + m.n_slots + 1  # the shape is conditioned on the deposit
    e, theta, phi = np.full(6, 2e4, np.float32), np.full(6, 1.5, np.float32), np.full(6, 0.3, np.float32)
    cond = encode_conditions(e, theta, phi, m.slot_map["odd"], m.n_slots)
    g = torch.Generator().manual_seed(0)
    z, y = sample(m, torch.randn(6, 9, 16, 45, generator=g), cond, steps=2, generator=g)
    assert z.shape == (6, 9, 16, 45) and y.shape == (6, 1) and torch.isfinite(y).all()
    n = Normalizer.from_dict(m.normalizer)
    drawn = n.decode_deposit(y, n.expected_deposit(torch.from_numpy(e), "odd"))
    showers = n.inverse(z, drawn)  # exact but for cells that the scaling moves under the 15 keV threshold
    torch.testing.assert_close(deposit(showers), drawn, rtol=1e-2, atol=0)
    # generate_showers draws the same way: batching does not change the showers
    a = generate_showers(m, "odd", e, theta, phi, steps=2, batch_size=6)
    b = generate_showers(m, "odd", e, theta, phi, steps=2, batch_size=6)
    np.testing.assert_array_equal(a.showers, b.showers)
    assert (deposit(a.showers) > 0).all()


def test_adaptation_modes_train_the_deposit_net(deposit_edm):
    names = {n for n, p in select_trainable(deposit_edm.with_config(), "conditioning").named_parameters()
             if p.requires_grad}
    assert any(n.startswith("deposit_net.") for n in names) and not any(".attn." in n for n in names)
    lora = select_trainable(deposit_edm.with_config(), "lora", lora_rank=2, lora_alpha=4, lora_targets=["qkv"])
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert any("deposit_net" in n and "modules_to_save" in n for n in trainable)


def test_short_training_reproduces_the_deposit_mean_and_spread(tmp_path):
    """One detector at one energy: the generated total deposit's mean and relative spread match the data's.

    Bounds from measurement (tiny preset, 3x4x5 patches, 300 steps of batch 32 on 1000 par04_siw showers at
    20 GeV; 400 generated showers, 8 Heun steps for the shape): mean ratio 0.994, spread ratio 1.13. The same
    budget with unit `detector_response` (the cells alone, no deposit net) gave 2.26 and 3.57.
    """
    data = tmp_path / "data"
    kw = dict(energy=2e4, theta=np.pi / 2, phi=np.pi / 32)
    write_showers(data / "par04_siw.h5", generate("par04_siw", 1000, seed=3, **kw), attrs={"synthetic": True})
    cfg = load_config(None, [f"data.dir={data}", f"output_dir={tmp_path / 'run'}", "data.detectors=[par04_siw]",
                             "train.steps=300", "train.batch_size=32", "train.lr=2e-3", "train.checkpoint_every=1000",
                             "train.ema_max=0.99", "model.patch=[3,4,5]", "data.unit=deposit", "data.log_eps=5e-6"])
    model = load_model(pretrain(cfg))
    ref = generate("par04_siw", 400, seed=4, **kw)
    gen = generate_showers(model, "par04_siw", ref.energy, ref.theta, ref.phi, steps=8)
    d_ref, d_gen = deposit(ref.showers), deposit(gen.showers)
    mean_ratio = d_gen.mean() / d_ref.mean()
    spread_ratio = (d_gen.std() / d_gen.mean()) / (d_ref.std() / d_ref.mean())
    assert abs(mean_ratio - 1) < 0.02, mean_ratio
    assert abs(spread_ratio - 1) < 0.2, spread_ratio
