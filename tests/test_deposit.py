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
    20 GeV; 400 generated showers, 8 Heun steps for the shape): mean ratio 0.995, spread ratio 1.09 (the
    statistical error of the latter ~0.05), the same with deposit.epochs=0: at one energy the net trained beside
    the transformer has it already; across energies it does not (test above). The same budget with unit
    `detector_response` (the cells alone, no deposit net) gave 2.26 and 3.57.
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


def test_short_training_puts_the_shape_around_the_drawn_centre(tmp_path):
    """`data.centre`: after a short training on one detector at one energy, the same noise generated with the centre
    set to +2 and -2 of its standard deviation along x gives showers whose own centres (`transverse_centre`) are that
    far apart; with the dipole term zeroed they do not move (a condition alone is ignored: benchmarks/fidelity.md).

    Measured (tiny preset, 3x4x5 patches, 300 steps of batch 32 on 1000 par04_scipb showers at 20 GeV, 26 s on 2
    cores; 200 showers, 8 Heun steps): moved 3.55 of 4 along x, 0.01 along y; zeroed 0.00.
    """
    from calofm.data.transforms import transverse_centre
    from calofm.diffusion import denoiser, sampler_params, shape_conditions
    from calofm.diffusion.edm import heun_sample

    data = tmp_path / "data"
    kw = dict(energy=2e4, theta=np.pi / 2, phi=np.pi / 32)
    write_showers(data / "par04_scipb.h5", generate("par04_scipb", 1000, seed=3, **kw), attrs={"synthetic": True})
    cfg = load_config(None, [f"data.dir={data}", f"output_dir={tmp_path / 'run'}", "data.detectors=[par04_scipb]",
                             "train.steps=300", "train.batch_size=32", "train.lr=2e-3", "train.checkpoint_every=1000",
                             "train.ema_max=0.99", "model.patch=[3,4,5]", "data.centre=true"])
    model = load_model(pretrain(cfg)).eval()
    norm = Normalizer.from_dict(model.normalizer)
    assert model.deposit_net.dim == 3 and model.cond_embed[0].in_features == N_COND + model.n_slots + 3
    n = 200
    e = torch.full((n,), kw["energy"])
    cond = encode_conditions(e, np.full(n, kw["theta"]), np.full(n, kw["phi"]), 0, model.n_slots)
    noise = torch.randn((n, 9, 16, 45), generator=torch.Generator().manual_seed(0))
    params = sampler_params(model)

    def centre_at(x: float) -> np.ndarray:
        drawn = torch.tensor([[0.0, x, 0.0]]).expand(n, 3)
        with torch.no_grad():
            z = heun_sample(denoiser(model, params), noise, shape_conditions(cond, drawn), params, 8)
        showers = norm.inverse(z, norm.decode_deposit(drawn, norm.expected_deposit(e, "par04_scipb")))
        return transverse_centre(showers.numpy(), e.numpy()).mean(0) / norm.centre_std

    moved = centre_at(2.0) - centre_at(-2.0)
    assert 0.7 * 4 < moved[0] < 1.2 * 4 and abs(moved[1]) < 0.2, moved
    with torch.no_grad():
        model.dipole.weight.zero_()
        model.dipole.bias.zero_()
    assert np.abs(centre_at(2.0) - centre_at(-2.0)).max() < 0.2


def _fit_and_draw(epochs: float, seed: int = 0):
    """A DepositNet fitted by `fit_deposit` on y ~ N(x / 2 + offset_s, sigma_s^2), x ~ U(-1, 1), two detector
    slots s with sigma 0.1 and 0.5; returns the net's holder and its draws at x = 0.5, 2,000 a slot."""
    from calofm.config import DepositConfig
    from calofm.diffusion import DEPOSIT_PARAMS, deposit_denoiser
    from calofm.diffusion.edm import heun_sample
    from calofm.models.dit import DepositNet
    from calofm.train.deposit import fit_deposit

    g = torch.Generator().manual_seed(1)
    n = 4000
    x, slot = torch.rand(n, generator=g) * 2 - 1, torch.arange(n) % 2
    offset, sigma = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.5])
    y = x / 2 + offset[slot] + sigma[slot] * torch.randn(n, generator=g)
    cond = torch.cat([x[:, None], torch.nn.functional.one_hot(slot, 2).float()], 1)
    holder = torch.nn.Module()
    torch.manual_seed(seed)
    holder.deposit_net = DepositNet(3, width=64)
    holder.deposit_net.requires_grad_(False)  # as a frozen CD student's: the fit trains it all the same
    fit_deposit(holder, {"cond": cond, "deposit": y[:, None], "slot": slot},
                DepositConfig(epochs=epochs, batch_size=256), seed=seed, show=False)
    assert not any(p.requires_grad for p in holder.deposit_net.parameters())  # flags restored
    draws = []
    for s in (0, 1):
        c = torch.tensor([[0.5, 1.0 - s, float(s)]]).expand(2000, 3)
        with torch.no_grad():
            draws.append(heun_sample(deposit_denoiser(holder), torch.randn(2000, 1, generator=g), c, DEPOSIT_PARAMS,
                                     16).view(-1))
    return holder, draws, offset + 0.25, sigma


def test_deposit_fit_learns_each_detectors_mean_and_spread():
    """Bounds from measurement (100 epochs = 1,563 steps of 256): means 0.15 and 0.11 sigma off the truth, spreads
    5% and 11% wide (2,000 draws: statistical errors 0.02 sigma and 1.6%); the unfitted net misses the spreads by
    2x and 10x."""
    _, draws, mean, sigma = _fit_and_draw(100)
    for d, m, s in zip(draws, mean, sigma):
        assert abs(d.mean() - m) < 0.25 * s, (d.mean(), m)
        assert abs(d.std() / s - 1) < 0.15, (d.std(), s)
    _, raw, _, _ = _fit_and_draw(0)
    assert min(d.std() / s for d, s in zip(raw, sigma)) > 1.5
    a, _, _, _ = _fit_and_draw(2, seed=3)
    b, _, _, _ = _fit_and_draw(2, seed=3)
    for p, q in zip(a.deposit_net.parameters(), b.deposit_net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # deterministic given the seed
