import numpy as np
import pytest
import torch

from calofm.data.transforms import (
    N_COND,
    PHI_HARMONICS,
    Normalizer,
    deposit,
    encode_conditions,
    transverse_centre,
)
from calofm.geometry import DR_MM, PHI_CENTRES, THRESHOLD_MEV


def showers(seed, n=50):
    rng = np.random.default_rng(seed)
    x = rng.lognormal(-2.0, 3.0, (n, 9, 16, 45)).astype(np.float32)
    x[rng.random(x.shape) < 0.6] = 0.0
    return x


def energies(seed, n=50):
    return np.random.default_rng(seed + 100).uniform(1e3, 1e6, n).astype(np.float32)


def test_inverse_of_forward_is_identity_above_threshold():
    x, e = showers(0), energies(0)
    for unit, eps in (("mev", 1e-6), ("incident_energy", 1e-9), ("detector_response", 1e-7)):
        norm = Normalizer.fit([(x, 0.02 * e if unit == "detector_response" else e, None, None)], eps=eps, unit=unit,
                              response={"odd": 0.02})
        u = norm.unit_mev(e, "odd")
        back = norm.inverse(norm.forward(x, u), u)
        above = x >= THRESHOLD_MEV
        np.testing.assert_allclose(back[above], x[above], rtol=2e-5)
        assert np.all(back[~above] == 0)
        # the same transform on torch tensors
        t, tu = torch.from_numpy(x), norm.unit_mev(torch.from_numpy(e), "odd")
        torch.testing.assert_close(norm.inverse(norm.forward(t, tu), tu)[torch.from_numpy(above)],
                                   t[torch.from_numpy(above)], rtol=2e-5, atol=0)


def test_units_take_the_shower_scale_and_the_detector_response_out():
    """A shower scaled with its incident energy, or with its detector's response, looks the same to the network."""
    x, e = showers(5, 4), energies(5, 4)
    x[x < THRESHOLD_MEV] = 0.0  # so that no cell crosses the threshold when scaled
    by_energy = Normalizer(mean=-12.0, std=3.0, eps=1e-9, unit="incident_energy")
    np.testing.assert_allclose(by_energy.forward(10 * x, by_energy.unit_mev(10 * e, "odd")),
                               by_energy.forward(x, by_energy.unit_mev(e, "odd")), atol=1e-4)
    by_response = Normalizer(mean=-8.0, std=3.0, eps=1e-7, unit="detector_response",
                             response={"odd": 0.015, "par04_scipb": 0.15})
    np.testing.assert_allclose(by_response.forward(10 * x, by_response.unit_mev(e, ["par04_scipb"] * 4)),
                               by_response.forward(x, by_response.unit_mev(e, ["odd"] * 4)), atol=1e-4)
    assert not np.allclose(Normalizer(-12.0, 3.0).forward(10 * x), Normalizer(-12.0, 3.0).forward(x), atol=1e-4)
    with pytest.raises(ValueError, match="needs each shower's unit"):
        by_energy.forward(x)
    with pytest.raises(ValueError, match="no detector response for 'fccee_cld'"):
        by_response.unit_mev(e, "fccee_cld")
    with pytest.raises(ValueError, match="unit 'gev' is not one of"):
        Normalizer(0.0, 1.0, unit="gev")


def test_deposit_unit_keeps_the_shape_and_the_drawn_total_exactly():
    """Unit `deposit`: cells become the shower's fractions, E_dep is encoded on its own, and inverting a shape with
    a drawn E_dep gives a shower whose cells sum to exactly that E_dep (and, with the true E_dep, the shower)."""

    x, e = showers(7), energies(7)
    x[x < THRESHOLD_MEV] = 0.0  # so that no cell crosses the threshold when scaled
    names = ["odd"] * 25 + ["par04_scipb"] * 25
    norm = Normalizer(0.0, 1.0, eps=5e-6, unit="deposit", response={"odd": 0.013, "par04_scipb": 0.067})
    expected = norm.expected_deposit(e, names)
    norm = Normalizer.fit([(x, deposit(x), expected, None)], eps=5e-6, unit="deposit", response=norm.response)
    y = norm.encode_deposit(deposit(x), expected)
    assert y.shape == (50, 1) and abs(y.mean()) < 1e-6 and y.std() == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(norm.decode_deposit(y, expected), deposit(x), rtol=1e-5)
    z = norm.forward(x, norm.unit_mev(e, names, x))
    np.testing.assert_allclose(norm.forward(10 * x, norm.unit_mev(e, names, 10 * x)), z, atol=1e-4)  # shape only
    above = x > 0
    back = norm.inverse(z, norm.generated_unit(e, names, y))
    np.testing.assert_allclose(back[above], x[above], rtol=1e-4)
    drawn = 1.7 * deposit(x)
    np.testing.assert_allclose(deposit(norm.inverse(z, drawn)), drawn, rtol=1e-5)
    tz, tdrawn = torch.from_numpy(z), torch.from_numpy(drawn)
    torch.testing.assert_close(deposit(norm.inverse(tz, tdrawn)), tdrawn, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="needs the showers"):
        norm.unit_mev(e, names)
    with pytest.raises(ValueError, match="needs the model's drawn deposit"):
        norm.generated_unit(e, names)


def test_the_centre_is_the_energy_weighted_core_position_drawn_with_the_deposit():
    # two cells of one shower: 3 MeV at (r 0, phi 0) and 1 MeV at (r 2, phi 4): the weighted mean of their centres
    x = np.zeros((2, 9, 16, 45), np.float32)
    x[0, 0, 0, 3], x[0, 2, 4, 10], x[0, 2, 4, 11] = 3.0, 0.5, 0.5
    x[1, 1, 8, 0] = 2.0
    x[1, 5, 0, 0] = THRESHOLD_MEV / 2  # under the threshold: not part of the shower
    e = np.array([4000.0, 100000.0], np.float32)  # 4 and 100 GeV: factors 2 and 10

    def cell(r, p):
        return (r + 0.5) * DR_MM * np.array([np.cos(PHI_CENTRES[p]), np.sin(PHI_CENTRES[p])])

    expected = np.stack([(3 * cell(0, 0) + cell(2, 4)) / 4 * 2, cell(1, 8) * 10])
    np.testing.assert_allclose(transverse_centre(x, e), expected, rtol=1e-12)

    x, e = showers(3), energies(3)
    norm = Normalizer.fit([(x, deposit(x), 0.02 * e, e)], eps=1e-7, unit="deposit", response={"odd": 0.02},
                          centre=True)
    y = norm.encode_drawn(deposit(x), 0.02 * e, x, e)
    assert y.shape == (50, 3) and y.dtype == np.float32
    assert np.sqrt(np.mean(np.square(y[:, 1:] - y[:, 1:].mean()))) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(norm.decode_deposit(y, 0.02 * e), deposit(x), rtol=1e-5)  # the first column
    assert Normalizer.from_dict(norm.to_dict()) == norm
    with pytest.raises(ValueError, match="centre needs unit 'deposit'"):
        Normalizer(0.0, 1.0, unit="mev", centre=True)


def test_generated_cells_are_capped_at_the_largest_training_deposit():
    x = showers(4)
    norm = Normalizer.fit([(x, None, None, None)])
    assert norm.log_max == pytest.approx(np.log(x.max().astype(np.float64) + 1e-6))
    z = norm.forward(x)
    z[0, 0, 0, 0] = z.max() + 5.0  # an outlier cell far above anything in the data
    assert norm.inverse(z)[0, 0, 0, 0] == pytest.approx(x.max(), rel=1e-5)


def test_streaming_statistics_equal_full_pass():
    parts = [showers(s, n) for s, n in ((1, 7), (2, 30), (3, 13))]
    streamed = Normalizer.fit((p, None, None, None) for p in parts)
    full = np.log(np.where(np.concatenate(parts) < THRESHOLD_MEV, 0, np.concatenate(parts)).astype(np.float64) + 1e-6)
    assert streamed.mean == pytest.approx(full.mean(), rel=1e-12)
    assert streamed.std == pytest.approx(full.std(), rel=1e-9)


def test_normalizer_serialises_and_rejects_unknown_keys():
    n = Normalizer(mean=-3.0, std=4.0)
    assert Normalizer.from_dict(n.to_dict()) == n
    with pytest.raises(ValueError, match="unknown key 'scale'"):
        Normalizer.from_dict({"mean": 0, "std": 1, "scale": 2})


def test_condition_encoding():
    c = encode_conditions([1e5, 1e6], [np.pi / 2, np.pi], [0.0, np.pi / 2], 2, 5)
    k = torch.tensor(PHI_HARMONICS, dtype=torch.float64)
    phi = torch.tensor([[0.0], [np.pi / 2]], dtype=torch.float64) * k
    expected = torch.cat([torch.tensor([[2 / 3, 0.5], [1.0, 1.0]], dtype=torch.float64),  # ln E scaled, theta / pi
                          torch.sin(phi), torch.cos(phi), torch.tensor([[0, 0, 1, 0, 0]] * 2)], 1).float()
    assert c.shape == (2, N_COND + 5) and expected[1, 2] == 1.0 and expected[1, 2 + len(k)] < 1e-6  # sin, cos pi/2
    torch.testing.assert_close(c, expected, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="slot 5 outside"):
        encode_conditions([1e5], [1.0], [0.0], 5, 5)
