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


def test_inverse_of_forward_is_identity_above_threshold():
    x = showers(0)
    norm = Normalizer.fit([x])
    back = norm.inverse(norm.forward(x))
    above = x >= THRESHOLD_MEV
    np.testing.assert_allclose(back[above], x[above], rtol=2e-5)
    assert np.all(back[~above] == 0)
    # the same transform on torch tensors
    t = torch.from_numpy(x)
    torch.testing.assert_close(norm.inverse(norm.forward(t))[torch.from_numpy(above)], t[torch.from_numpy(above)],
                               rtol=2e-5, atol=0)


def test_generated_cells_are_capped_at_the_largest_training_deposit():
    x = showers(4)
    norm = Normalizer.fit([x])
    assert norm.log_max == pytest.approx(np.log(x.max().astype(np.float64) + 1e-6))
    z = norm.forward(x)
    z[0, 0, 0, 0] = z.max() + 5.0  # an outlier cell far above anything in the data
    assert norm.inverse(z)[0, 0, 0, 0] == pytest.approx(x.max(), rel=1e-5)


def test_streaming_statistics_equal_full_pass():
    parts = [showers(s, n) for s, n in ((1, 7), (2, 30), (3, 13))]
    streamed = Normalizer.fit(iter(parts))
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
