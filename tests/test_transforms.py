import numpy as np
import pytest
import torch

from calofm.data.transforms import Normalizer, encode_conditions
from calofm.geometry import THRESHOLD_MEV


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
        norm = Normalizer.fit([(x, 0.02 * e if unit == "detector_response" else e)], eps=eps, unit=unit,
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


def test_generated_cells_are_capped_at_the_largest_training_deposit():
    x = showers(4)
    norm = Normalizer.fit([(x, None)])
    assert norm.log_max == pytest.approx(np.log(x.max().astype(np.float64) + 1e-6))
    z = norm.forward(x)
    z[0, 0, 0, 0] = z.max() + 5.0  # an outlier cell far above anything in the data
    assert norm.inverse(z)[0, 0, 0, 0] == pytest.approx(x.max(), rel=1e-5)


def test_streaming_statistics_equal_full_pass():
    parts = [showers(s, n) for s, n in ((1, 7), (2, 30), (3, 13))]
    streamed = Normalizer.fit((p, None) for p in parts)
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
    expected = torch.tensor([[2 / 3, 0.5, 0.0, 1.0, 0, 0, 1, 0, 0], [1.0, 1.0, 1.0, 0.0, 0, 0, 1, 0, 0]])  # ln E scaled
    torch.testing.assert_close(c, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="slot 5 outside"):
        encode_conditions([1e5], [1.0], [0.0], 5, 5)
