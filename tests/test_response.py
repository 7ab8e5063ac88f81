"""Energy response and resolution per E_inc bin (calofm.evaluate.response)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calofm.evaluate.response import response_table


def showers_with_response(mean: float, rel: float, energy: np.ndarray, seed: int) -> np.ndarray:
    """One lit cell a shower holding E_dep = E_inc x N(mean, rel x mean)."""
    x = np.zeros((len(energy), 9, 16, 45), np.float32)
    x[:, 0, 0, 10] = energy * np.random.default_rng(seed).normal(mean, rel * mean, len(energy))
    return x


def test_ratios_and_errors_of_known_distributions():
    rng = np.random.default_rng(0)
    e_ref, e_gen = np.exp(rng.uniform(np.log(1e3), np.log(1e6), 5000)), np.exp(rng.uniform(np.log(1e3), np.log(1e6), 5000))
    ref = showers_with_response(0.02, 0.05, e_ref, 1)
    gen = showers_with_response(0.021, 0.10, e_gen, 2)  # 5% high, twice the spread
    rows = response_table(ref, e_ref, gen, e_gen)
    assert len(rows) == 5
    assert rows[0]["e_low_mev"] == pytest.approx(e_ref.min()) and rows[-1]["e_high_mev"] == pytest.approx(e_ref.max())
    for r in rows:
        assert r["reference"]["mean"] == pytest.approx(0.02, rel=0.01)
        assert r["mean_ratio"] == pytest.approx(1.05, abs=4 * r["mean_ratio_error"])
        assert r["spread_ratio"] == pytest.approx(2.0, abs=4 * r["spread_ratio_error"])
        # errors of ~1000 showers a bin: sigma/sqrt(n) of the mean, ~1/sqrt(2n) of the spread
        assert 0.001 < r["mean_ratio_error"] < 0.006 and 0.04 < r["spread_ratio_error"] < 0.12
    same = response_table(ref, e_ref, showers_with_response(0.02, 0.05, e_gen, 3), e_gen)
    assert all(abs(r["mean_ratio"] - 1) < 4 * r["mean_ratio_error"] for r in same)
    assert all(abs(r["spread_ratio"] - 1) < 4 * r["spread_ratio_error"] for r in same)


def test_sparse_bins_are_left_out():
    e = np.array([1e3] * 50 + [1e6] * 50, np.float64)
    rows = response_table(showers_with_response(0.02, 0.05, e, 0), e, showers_with_response(0.02, 0.05, e, 1), e)
    assert len(rows) == 2  # the three middle bins are empty


def test_a_model_that_deposits_nothing_gets_an_infinite_spread_ratio_not_a_crash():
    e = np.full(50, 1e4)
    rows = response_table(showers_with_response(0.02, 0.05, e, 0), e, np.zeros((50, 9, 16, 45), np.float32), e)
    assert rows[0]["mean_ratio"] == 0.0 and rows[0]["spread_ratio"] == np.inf


def test_evaluate_writes_an_infinite_spread_ratio_as_null(tmp_path):
    from calofm.data.formats import Showers
    from calofm.evaluate.report import evaluate

    e, zeros = np.full(50, 1e4, np.float32), np.zeros(50, np.float32)
    ref = Showers(showers_with_response(0.02, 0.05, e, 0), e, zeros, zeros + 1.5)
    result = evaluate(ref, Showers(np.zeros((50, 9, 16, 45)), e, zeros, zeros + 1.5), tmp_path, metrics=["response"])
    assert result["response"][0]["spread_ratio"] == np.inf
    assert json.loads((tmp_path / "metrics.json").read_text())["response"][0]["spread_ratio"] is None
    assert "inf" in (tmp_path / "report.md").read_text()
