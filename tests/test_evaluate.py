"""Evaluation: observables on hand-made showers, metric definitions (FPD/KPD against jetnet), data-vs-data and
data-vs-other-detector behaviour of every metric, the report folder and the `calofm evaluate` command."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from calofm.cli import app
from calofm.data.formats import Showers, write_calochallenge, write_lemurs
from calofm.data.synthetic import generate
from calofm.evaluate import observables as O
from calofm.evaluate.metrics import (
    _poly_mmd2_unbiased,
    _weighted_moments,
    auc_error,
    bootstrap,
    classifier_auc,
    fpd,
    fpd_calochallenge,
    fpd_difference,
    frechet_distance,
    kpd,
    kpd_calochallenge,
    normalise_features,
    prdc,
    separation_power,
)
from calofm.evaluate.report import DEFINITIONS, PAPER_DS2, evaluate, fixed_point_comparison
from calofm.geometry import DPHI, DR_MM, DZ_MM, N_R, N_Z, THRESHOLD_MEV

# ----------------------------------------------------------------------------------------- observables


def one_cell_shower(r: int, phi: int, z: int, mev: float = 100.0) -> np.ndarray:
    x = np.zeros((1, 9, 16, 45), np.float32)
    x[0, r, phi, z] = mev
    return x


def test_observables_of_a_hand_made_shower():
    x = one_cell_shower(2, 0, 10) + one_cell_shower(2, 8, 10)  # two cells at r = 2.5 dr, opposite in phi
    x[0, 5, 3, 30] = 0.9 * THRESHOLD_MEV                         # below the threshold: must be dropped
    obs = O.shower_observables(x, np.array([1000.0]))
    r = 2.5 * DR_MM
    assert obs["e_ratio"][0] == pytest.approx(0.2)
    assert obs["n_hit"][0] == 2
    assert obs["c_r"][0] == pytest.approx(r) and obs["w_r"][0] == pytest.approx(0, abs=1e-9)
    assert obs["c_x"][0] == pytest.approx(0, abs=1e-9)            # symmetric pair: centre on the axis
    assert obs["w_x"][0] == pytest.approx(r * math.cos(math.pi / 16), rel=1e-6)
    assert obs["c_z"][0] == pytest.approx(10.5 * DZ_MM) and obs["w_z"][0] == pytest.approx(0, abs=1e-9)
    assert np.array_equal(O.energy_profile(x, "z")[0].nonzero()[0], [10])
    assert O.energy_profile(x, "r")[0, 2] == pytest.approx(200.0)
    assert O.voxel_spectrum(x).tolist() == [100.0, 100.0]
    assert O.mean_shower(x).sum() == pytest.approx(200.0)
    low = O.low_level_features(x, np.array([1000.0]))
    assert low.shape == (1, 6481) and low[0, 0] == pytest.approx(3.0)
    assert np.count_nonzero(low[0, 1:] > np.log(1e-6) + 1) == 2


def test_high_level_features_layout():
    x = np.concatenate([one_cell_shower(0, 0, 0, 50.0), one_cell_shower(4, 4, 44, 10.0)])
    e = np.array([1000.0, 10_000.0])
    f = O.high_level_features(x, e)
    names = O.high_level_names()
    assert f.dtype == np.float64 and f.shape == (2, len(names)) == (2, 4 + 8 * O.SEGMENTS)
    col = {n: i for i, n in enumerate(names)}
    assert f[:, col["log10_e_inc"]] == pytest.approx([3.0, 4.0])
    assert f[:, col["e_ratio"]] == pytest.approx([0.05, 0.001])
    assert f[0, col["log10_e_segment[0]"]] == pytest.approx(math.log10(50.0 + THRESHOLD_MEV))
    assert f[0, col["log10_e_segment[4]"]] == pytest.approx(math.log10(THRESHOLD_MEV))  # empty: threshold floor
    assert f[1, col["c_r[4]"]] == pytest.approx(4.5 * DR_MM / 100)
    assert f[0, col["hit_fraction[0]"]] == pytest.approx(1 / (9 * 16 * N_Z // O.SEGMENTS))
    assert O.high_level_features(x, e, segments=45).shape == (2, 4 + 8 * 45)
    with pytest.raises(ValueError, match="segments = 7"):
        O.high_level_features(x, e, segments=7)
    with pytest.raises(ValueError, match=r"energy has shape \(3,\)"):
        O.high_level_features(x, np.ones(3))


def test_calochallenge_features_of_a_hand_made_shower():
    x = one_cell_shower(2, 3, 10)              # one cell lit: 100 MeV at r bin 2, alpha bin 3, layer 10
    x[0, 5, 3, 30] = THRESHOLD_MEV             # 15.15 keV: kept by calofm, below the CaloChallenge's 0.5/0.033 keV
    f = O.calochallenge_features(x, np.array([1000.0]))
    names = O.calochallenge_names()
    assert f.shape == (1, len(names)) == (1, 2 + 8 * N_Z) and len(set(names)) == len(names)
    col = {n: i for i, n in enumerate(names)}
    # XMLHandler's alpha centres start at -pi; eta, phi = r cos(alpha), r sin(alpha) of the cell centre, / 100
    r, alpha = 2.5 * DR_MM, -math.pi + 3.5 * DPHI
    assert f[0, col["log10_e_inc"]] == pytest.approx(3.0)
    assert f[0, col["log10_e_layer[10]"]] == pytest.approx(math.log10(100.0 + 1e-8))
    assert f[0, col["log10_e_tot"]] == pytest.approx(math.log10(100.0 + 1e-8))
    assert f[0, col["ec_eta[10]"]] == pytest.approx(r * math.cos(alpha) / 100, rel=1e-12)
    assert f[0, col["ec_phi[10]"]] == pytest.approx(r * math.sin(alpha) / 100, rel=1e-12)
    assert f[0, col["ec_r[10]"]] == pytest.approx(r / 100, rel=1e-12)
    for w in ("width_eta", "width_phi", "width_r"):       # one cell: zero width (up to sqrt of rounding)
        assert abs(f[0, col[f"{w}[10]"]]) < 1e-8
    assert f[0, col["sparsity[10]"]] == pytest.approx(1 - 1 / 144)
    # every other layer is empty: log10(1e-8) = -8, centres and widths 0, sparsity 1 (layer 30's cell is cut)
    others = [z for z in range(N_Z) if z != 10]
    assert f[0, [col[f"log10_e_layer[{z}]"] for z in others]] == pytest.approx(-8.0)
    assert f[0, [col[f"sparsity[{z}]"] for z in others]] == pytest.approx(1.0)
    for block in ("ec_eta", "ec_phi", "width_eta", "width_phi", "ec_r", "width_r"):
        assert not f[0, [col[f"{block}[{z}]"] for z in others]].any(), block
    # the same cell seen by calofm's observables: x, y = -eta, -phi (alpha from 0 there)
    obs = O.shower_observables(one_cell_shower(2, 3, 10), np.array([1000.0]))
    assert obs["c_x"][0] == pytest.approx(-100 * f[0, col["ec_eta[10]"]])
    assert obs["c_y"][0] == pytest.approx(-100 * f[0, col["ec_phi[10]"]])
    # two cells opposite in alpha: centre on the axis, width = |eta| of either
    y = one_cell_shower(4, 0, 7) + one_cell_shower(4, 8, 7)
    g = O.calochallenge_features(y, np.array([1000.0]))
    assert abs(g[0, col["ec_eta[7]"]]) < 1e-12 and abs(g[0, col["ec_phi[7]"]]) < 1e-12
    assert g[0, col["width_eta[7]"]] == pytest.approx(4.5 * DR_MM * abs(math.cos(-math.pi + 0.5 * DPHI)) / 100)
    assert g[0, col["sparsity[7]"]] == pytest.approx(1 - 2 / 144)
    # a layer lit in one ring only, unevenly: its width in r is exactly 0, not rounding noise (which the
    # max-|value| normalisation of FPD/KPD would divide by: FPD ~1e15 where a detector's layer is one ring)
    rings = np.concatenate([sum(one_cell_shower(r, a, 0) * (1 + k * a) ** 3 for a in range(0, 16, 3))
                            for r in range(N_R) for k in (0.5, 1.3, 2.1)])
    h = O.calochallenge_features(rings, np.full(len(rings), 1000.0))
    assert (h[:, col["width_r[0]"]] == 0.0).all() and (h[:, col["width_eta[0]"]] > 0.01).all()


# ----------------------------------------------------------------------------------------- metric definitions


def test_separation_power_limits():
    rng = np.random.default_rng(0)
    a = rng.normal(size=5000)
    assert separation_power(a, a, 20) == 0.0
    assert separation_power(a, a + 100, np.linspace(-5, 105, 50)) == pytest.approx(1.0)
    # one bin shared half/half, the rest disjoint: 1/2 [ (0.5-1)^2/1.5 + 0.5^2/0.5 ] = 1/3
    assert separation_power([0.5, 1.5], [0.5, 0.5], [0, 1, 2]) == pytest.approx(1 / 3)
    assert separation_power([5.0], [0.5], [0, 1]) == 1.0  # wholly outside the other's range: fully separated
    with pytest.raises(ValueError, match="neither sample has entries"):
        separation_power([5.0], [7.0], [0, 1])


def test_frechet_distance_closed_form():
    # Gaussians with commuting covariances: |mu1 - mu2|^2 + sum (sqrt(l1) - sqrt(l2))^2
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, 3.0])
    c1, c2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(5.0 + (1 - 3) ** 2 + (2 - 1) ** 2)
    rot = np.array([[0.6, -0.8], [0.8, 0.6]])
    c = rot @ np.diag([2.0, 0.5]) @ rot.T
    assert frechet_distance(mu1, c, mu1, c) == pytest.approx(0.0, abs=1e-12)


def toy_features(seed, n=20_000, d=12, shift=0.0, scale=1.0):
    """Seeded non-Gaussian features; the same function made the jetnet reference values below."""
    mix = np.random.default_rng(0).standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    z = np.random.default_rng(seed).standard_normal((n, d)) @ mix
    z[:, : d // 3] = np.exp(0.5 * z[:, : d // 3])
    return z * scale + shift


# Computed once with jetnet 0.2.5 (numpy 1.26) in a throwaway environment, because jetnet does not import
# beside numpy 2:
#   python3 -m venv /tmp/jetnet_ref && /tmp/jetnet_ref/bin/pip install "numpy<2" "pyarrow<18" jetnet==0.2.5
#   /tmp/jetnet_ref/bin/python - <<'EOF'
#   import numpy as np
#   from jetnet.evaluation import fpd, kpd
#   from jetnet.evaluation.gen_metrics import (_calculate_frechet_distance, _mmd_poly_quadratic_unbiased,
#                                              _normalise_features)
#   def toy_features(seed, n=20_000, d=12, shift=0.0, scale=1.0):
#       mix = np.random.default_rng(0).standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
#       z = np.random.default_rng(seed).standard_normal((n, d)) @ mix
#       z[:, : d // 3] = np.exp(0.5 * z[:, : d // 3])
#       return z * scale + shift
#   x = toy_features(1)
#   for y in (toy_features(2), toy_features(3, shift=0.1, scale=1.05)):
#       a, b = _normalise_features(x, y)
#       print(x.sum(), y.sum(),
#             _calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)),
#             _mmd_poly_quadratic_unbiased(a[:1000], b[:1000], degree=4),
#             fpd(x, y, min_samples=2000, max_samples=5000), kpd(x, y, batch_size=2000))
#   EOF
JETNET = {
    "same": {"y": (2, 0.0, 1.0), "checksum": 104596.82591915314, "fd_full": 0.00011050806275081371,
             "mmd_1000": 8.610167224887277e-05, "fpd": (5.3940383453666865e-05, 8.381149990403877e-05),
             "kpd": (-2.8420785084914968e-05, 9.888369161691684e-05)},
    "shifted": {"y": (3, 0.1, 1.05), "checksum": 133995.46451382746, "fd_full": 0.004855902206199136,
                "mmd_1000": 0.0013838350933643717, "fpd": (0.004838628288397081, 0.0002194247765228412),
                "kpd": (0.0010904231092894179, 0.00024210429401414564)},
}


def test_bootstrap_error_of_a_mean_is_its_standard_error():
    x = np.random.default_rng(3).normal(size=(400, 1))
    value, error = bootstrap(lambda a: a.mean(), x)
    assert value == pytest.approx(x.mean())
    assert error == pytest.approx(x.std() / 20, rel=0.15)  # sigma / sqrt(400); 200 resamples: ~5 % scatter

@pytest.mark.parametrize("case", JETNET)
def test_fpd_kpd_agree_with_jetnet(case):
    ref = JETNET[case]
    seed, shift, scale = ref["y"]
    x, y = toy_features(1), toy_features(seed, shift=shift, scale=scale)
    assert x.sum() == pytest.approx(104433.22414468537, rel=1e-9) and y.sum() == pytest.approx(ref["checksum"], rel=1e-9)
    # the deterministic building blocks agree to rounding
    a, b = normalise_features(x, y)
    assert frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)) == pytest.approx(
        ref["fd_full"], rel=1e-8)
    assert _poly_mmd2_unbiased(a[:1000], b[:1000]) == pytest.approx(ref["mmd_1000"], rel=1e-8)
    # the estimators draw other batches: they agree within the combined errors
    value, error = fpd(x, y, min_samples=2000, max_samples=5000, sample_error=False)
    assert abs(value - ref["fpd"][0]) < 2 * math.hypot(error, ref["fpd"][1])
    assert fpd(x, y, min_samples=2000, max_samples=5000)[1] > error  # the sample error only adds
    value, error = kpd(x, y, batch_size=2000)
    assert abs(value - ref["kpd"][0]) < 2 * math.hypot(error, ref["kpd"][1])


@pytest.mark.parametrize("coupled", [False, True])
def test_fpd_difference_is_calibrated_and_tighter_than_two_errors(coupled):
    """Two generated samples unlike the reference, independent or made row by row from the same draws (as two
    models from one noise seed): over 16 sets of samples the difference scatters as its error says (without the
    disjoint-halves term it would claim far less), and that error is below the two FPD errors in quadrature, far
    below where the rows are coupled (an unpaired estimate would equal them). Bounded features: the max-|value|
    normalisation of a fixed reference file does not move, which the error assumes (tail-heavy references
    scatter the scale itself)."""
    diffs, paired, quadrature = [], [], []
    for k in range(16):
        r = np.random.default_rng(k)
        x, a, b = r.beta(2.0, 5.0, (2000, 8)), *(0.03 + 1.1 * r.beta(2.0, 5.0, (2000, 8)) for _ in "ab")
        if coupled:
            b = 1.03 * a + 0.02 * r.normal(size=a.shape)
        value, error = fpd_difference(x, a, b, seed=k, num_batches=10)
        (fa, ea), (fb, eb) = fpd(x, a, seed=k, num_batches=10), fpd(x, b, seed=k, num_batches=10)
        diffs.append(value), paired.append(error), quadrature.append(math.hypot(ea, eb))
        assert abs(value - (fa - fb)) < 2 * math.hypot(error, quadrature[-1])  # other batches: within both errors
    scatter, error = np.std(diffs, ddof=1), np.median(paired)
    assert 0.7 < scatter / error < 1.4, (scatter, error)
    assert error < (0.3 if coupled else 0.8) * np.median(quadrature), (error, np.median(quadrature))


def test_fpd_difference_factor_and_identical_samples():
    r = np.random.default_rng(0)
    x, near, far = r.normal(size=(2000, 6)), r.normal(0.1, 1.0, (2000, 6)), r.normal(0.5, 1.2, (2000, 6))
    assert fpd_difference(x, near, near) == (0.0, 0.0)  # one sample twice: the same rows, every term cancels
    value, error = fpd_difference(x, far, near, factor=3.0)
    (f_far, e_far), (f_near, e_near) = fpd(x, far), fpd(x, near)
    assert value > 10 * error and abs(value - (f_far - 3 * f_near)) < 3 * math.hypot(e_far, 3 * e_near)
    with pytest.raises(ValueError, match="differ in size"):
        fpd_difference(x, far, near[:1000])


# Computed once with the fpd and kpd of jetnet 0.2.5's jetnet/evaluation/gen_metrics.py, taken from the PyPI
# wheel (pip download --no-deps jetnet==0.2.5) and run unmodified in a throwaway script beside this venv's numpy
# 2.4 and scipy 1.17, its unrelated imports stubbed (numba's njit as a no-op, energyflow, jetnet.utils and
# jetnet.datasets as empty modules), with the CaloChallenge's arguments:
#   x, y = toy_features(1, n=3000), toy_features(SEED, n=3000, shift=SHIFT, scale=SCALE)
#   jetnet.evaluation.fpd(x, y, min_samples=10000), jetnet.evaluation.kpd(x, y, batch_size=10000)
# The same draws (seed 42) make them agree to rounding; 40 s each there, 0.2 s here.
JETNET_CC = {
    "same": {"y": (2, 0.0, 1.0), "checksum": 15890.38738310069,
             "fpd": (0.0012684660311981515, 3.748942327232741e-05),
             "kpd": (0.00012942522407066726, 7.025470451401783e-05)},
    "shifted": {"y": (3, 0.1, 1.05), "checksum": 20288.04904953682,
                "fpd": (0.01024073629453631, 8.25511343332665e-05),
                "kpd": (0.002437316039197057, 0.00020711604522749213)},
}


@pytest.mark.parametrize("case", JETNET_CC)
def test_calochallenge_fpd_kpd_reproduce_jetnet(case):
    ref = JETNET_CC[case]
    seed, shift, scale = ref["y"]
    x, y = toy_features(1, n=3000), toy_features(seed, n=3000, shift=shift, scale=scale)
    assert x.sum() == pytest.approx(15278.166075667694, rel=1e-9) and y.sum() == pytest.approx(ref["checksum"], rel=1e-9)
    # the FD of the two nearly equal Gaussians is a small difference of large traces: sqrtm vs eigh differ at 1e-8
    assert fpd_calochallenge(x, y) == pytest.approx(ref["fpd"], rel=1e-6)
    assert kpd_calochallenge(x, y) == pytest.approx(ref["kpd"], rel=1e-8)


def test_calochallenge_estimators_match_a_direct_reimplementation():
    """jetnet's loops written out plainly (batches gathered, np.cov, scipy's sqrtm, the kernel matrices in full)
    on small sizes: the draw-count shortcuts of fpd_calochallenge / kpd_calochallenge give the same numbers."""
    from scipy.linalg import sqrtm
    from scipy.optimize import curve_fit

    x, y = toy_features(4, n=400, d=5), toy_features(5, n=300, d=5, shift=0.05)
    a, b = x / np.abs(x).max(0), y / np.abs(x).max(0)
    sizes = (1 / np.linspace(1 / 200, 1 / 900, 3)).astype(np.int32)  # batches larger and smaller than the samples
    rng, means = np.random.default_rng(7), []
    for n in sizes:
        vals = []
        for _ in range(4):
            p, q = a[rng.choice(len(a), size=n)], b[rng.choice(len(b), size=n)]
            c1, c2 = np.cov(p, rowvar=False), np.cov(q, rowvar=False)
            vals.append(((p.mean(0) - q.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * sqrtm(c1 @ c2).real))
        means.append(np.mean(vals))
    fit, cov = curve_fit(lambda t, i, s: i + s * t, 1 / sizes, means, bounds=([0, 0], [np.inf, np.inf]))
    got = fpd_calochallenge(x, y, seed=7, min_samples=200, max_samples=900, num_batches=4, num_points=3)
    assert got == pytest.approx((fit[0], math.sqrt(cov[0, 0])), rel=1e-7)

    # a feature that explodes in a few generated showers: the fit follows means of ~1e16 instead of returning its
    # start (1, 1) with zero covariance, as an unscaled fit does (par04_scipb: "1000 ± 0" x1e-3)
    y_big = y.copy()
    y_big[:3, 0] = 1e9 * np.abs(x[:, 0]).max()
    big, big_error = fpd_calochallenge(x, y_big, seed=7, min_samples=200, max_samples=900, num_batches=4, num_points=3)
    full = frechet_distance(a.mean(0), np.cov(a, rowvar=False), *(lambda v: (v.mean(0), np.cov(v, rowvar=False)))(
        y_big / np.abs(x).max(0)))
    assert big_error > 0 and big == pytest.approx(full, rel=0.5) and big > 1e15

    vals = []
    for i in range(6):
        rng = np.random.default_rng(3 + 1000 * i)
        p, q = a[rng.choice(len(a), size=700)], b[rng.choice(len(b), size=700)]
        kxx, kyy, kxy = ((u @ v.T / 5 + 1) ** 4 for u, v in ((p, p), (q, q), (p, q)))
        vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (700 * 699) - 2 * kxy.mean())
    lo, hi = np.percentile(vals, [16.275, 83.725])
    assert kpd_calochallenge(x, y, seed=3, num_batches=6, batch_size=700) == pytest.approx(
        (np.median(vals), (hi - lo) / 2), rel=1e-9)

    counts = np.bincount(np.random.default_rng(0).choice(len(a), size=5000), minlength=len(a))
    mu, c = _weighted_moments(a, counts)
    batch = np.repeat(a, counts, axis=0)
    assert np.allclose(mu, batch.mean(0), rtol=0, atol=1e-14)
    assert np.allclose(c, np.cov(batch, rowvar=False), rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------------------- data vs data


@pytest.fixture(scope="module")
def sets():
    """Two seeds of one detector (4,000 showers each) and another detector (2,000)."""
    return {"ref": generate("par04_siw", 4000, seed=1), "same": generate("par04_siw", 4000, seed=2),
            "other": generate("odd", 2000, seed=3)}


@pytest.fixture(scope="module")
def features(sets):
    return {k: O.high_level_features(s.showers, s.energy) for k, s in sets.items()}


def test_high_level_metrics_data_vs_data_and_other_detector(features):
    ref, same, other = features["ref"], features["same"], features["other"]
    assert abs(classifier_auc(ref, same, repeats=1)[0] - 0.5) < 0.03  # one classifier: the protocol, not the mean
    assert classifier_auc(ref[:2000], other, repeats=1)[0] > 0.9

    value, error = fpd(ref[:2000], ref[2000:])  # two halves of one set
    assert value <= 2 * error, (value, error)
    value, error = fpd(ref[:2000], same[:2000])  # two seeds
    assert value <= 2 * error, (value, error)
    value, error = fpd(ref[:2000], other)
    assert value > 0.3 and value > 20 * error, (value, error)

    value, error = kpd(ref[:2000], same[:2000])
    assert abs(value) < 2 * error + 1e-4, (value, error)
    value, error = kpd(ref[:2000], other)
    assert value > 0.1 and value > 20 * error, (value, error)

    p_same, p_other = prdc(ref[:2000], same[:2000]), prdc(ref[:2000], other)
    assert p_same["precision"] > 0.8 and p_same["recall"] > 0.8 and p_same["coverage"] > 0.9
    assert 0.8 < p_same["density"] < 1.2
    assert max(p_other.values()) < 0.1


def test_calochallenge_fpd_kpd_data_vs_data_and_distorted(sets):
    """The CaloChallenge definition on 2,000 vs 2,000 showers. Batches drawn with replacement keep two samples of
    one detector well above zero (measured over five seed pairs: FPD 0.34-0.40, KPD 1.0-2.1e-4, the fit errors
    ~0.002 and ~5e-5); showers put one layer (3.4 mm) deeper raise FPD to 1.8 and KPD to 0.017. (Scaling the
    showers by 1.1 moves FPD only from 0.340 to 0.344: its log10 layer energies are divided by the 8 of
    log10(1e-8) of empty layers.)"""
    ref, same = sets["ref"][:2000], sets["same"][:2000]
    f_ref, f_same = (O.calochallenge_features(s.showers, s.energy) for s in (ref, same))
    deeper = np.concatenate([np.zeros_like(same.showers[..., :1]), same.showers[..., :-1]], axis=-1)
    f_deeper = O.calochallenge_features(deeper, same.energy)

    value, error = fpd_calochallenge(f_ref, f_same)
    assert 0.2 < value < 0.6 and 0 < error < 0.02, (value, error)
    assert value > 10 * error  # not consistent with zero: the definition's finite-sample floor
    worse, worse_error = fpd_calochallenge(f_ref, f_deeper)
    assert worse > 3 * value and worse - value > 20 * math.hypot(error, worse_error), (worse, value)

    value, error = kpd_calochallenge(f_ref, f_same)
    assert 0 < value < 1e-3 and error < 2e-4, (value, error)
    worse, worse_error = kpd_calochallenge(f_ref, f_deeper)
    assert worse > 20 * value and worse > 10 * worse_error, (worse, value)


def test_separation_powers_data_vs_data_and_other_detector(sets):
    obs = {k: O.shower_observables(s.showers, s.energy) for k, s in sets.items()}
    for key in O.SHOWER_OBSERVABLES:
        assert separation_power(obs["ref"][key], obs["same"][key], 30) < 0.02, key
    assert separation_power(obs["ref"]["e_ratio"], obs["other"]["e_ratio"], 30) > 0.9  # sampling fractions differ


def test_auc_error_is_delongs_and_the_auc_of_repeated_classifiers_scatters_by_its_error():
    """DeLong's error from placements found by sorting equals the all-pairs definition, ties included. On two 4-D
    Gaussians one unit apart along one axis (true AUC Phi(1/sqrt 2) = 0.760), fresh samples of 2,000 a side each
    time, twenty times: one classifier (400 a side tested) scatters by about its DeLong error (the error counts the
    test split, the scatter also the training; measured 1.37x); the mean of five by at most the error
    `classifier_auc` gives it (1.08x); their mean over the twenty lies just below the truth. Twenty values' spread
    has an error of ~16 %."""
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounded: many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    expected = np.sqrt(psi.mean(1).var(ddof=1) / len(pos) + psi.mean(0).var(ddof=1) / len(neg))
    assert auc_error(labels, scores) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 scores of each class"):
        auc_error([1, 0, 0], [0.2, 0.1, 0.3])
    with pytest.raises(ValueError, match="repeats >= 1"):
        classifier_auc(scores[:, None], scores[:, None], repeats=0)

    truth = norm.cdf(1 / np.sqrt(2))
    for repeats, low, high in ((1, 0.015, 0.03), (5, 0.008, 0.02)):
        aucs, errors = [], []
        for seed in range(20):
            real, gen = rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))
            real[:, 0] += 1.0
            auc, error = classifier_auc(real, gen, seed=seed, repeats=repeats)
            aucs.append(auc)
            errors.append(error)
        error = np.mean(errors)
        assert low < error < high, (repeats, error)
        # no classifier beats the Bayes AUC beyond noise; a finite one falls short (measured 0.005-0.008)
        assert truth - 0.015 < np.mean(aucs) < truth + 3 * error / np.sqrt(len(aucs)), (repeats, np.mean(aucs))
        assert 0.5 < np.std(aucs, ddof=1) / error < (1.6 if repeats == 1 else 1.2), (repeats, np.std(aucs) / error)


def test_low_level_auc_data_vs_data_and_other_detector(sets):
    ref, same, other = sets["ref"][:2000], sets["same"][:2000], sets["other"]
    low = {k: O.low_level_features(s.showers, s.energy) for k, s in (("ref", ref), ("same", same), ("other", other))}
    assert abs(classifier_auc(low["ref"], low["same"], repeats=1)[0] - 0.5) < 0.03
    assert classifier_auc(low["ref"], low["other"], repeats=1)[0] > 0.9
    with pytest.raises(ValueError, match="equal width"):
        classifier_auc(low["ref"], np.zeros((100, 3)))


def test_fixed_points_compare_exact_shared_conditions():
    kw = {"energy": 20_000.0, "theta": math.pi / 2, "phi": 1.0}
    ref = Showers.concat([generate("par04_siw", 60, seed=4, **kw), generate("par04_siw", 60, seed=5, energy=5e4)])
    gen = Showers.concat([generate("par04_siw", 60, seed=6, **kw), generate("odd", 60, seed=7, energy=5e4)])
    ref_obs, gen_obs = (O.shower_observables(s.showers, s.energy) for s in (ref, gen))
    # the second group has random angles: 60 distinct conditions, too many for a fixed-point sample
    assert all(not r["exact"] for r in fixed_point_comparison(ref, gen, ref_obs, gen_obs))
    rows = fixed_point_comparison(ref[:60], gen[:60], {k: v[:60] for k, v in ref_obs.items()},
                                  {k: v[:60] for k, v in gen_obs.items()})
    assert len(rows) == 1 and rows[0]["exact"] and rows[0]["n_reference"] == rows[0]["n_generated"] == 60
    assert abs(rows[0]["observables"]["e_ratio"]["pull"]) < 4
    rows = fixed_point_comparison(ref, gen, ref_obs, gen_obs, points=[(5e4, math.pi / 2, None)])
    assert rows[0]["n_reference"] == rows[0]["n_generated"] and rows[0]["n_reference"] > 0


# ----------------------------------------------------------------------------------------- report and CLI


def test_evaluate_writes_a_report_folder(tmp_path):
    ref = generate("par04_siw", 300, seed=8)
    gen = generate("par04_siw", 300, seed=9, energy=np.random.default_rng(0).uniform(1e3, 1e5, 300))
    write_lemurs(tmp_path / "ref.h5", ref, {"detector": "par04_siw", "synthetic": True, "generator": "test"})
    write_calochallenge(tmp_path / "gen.h5", gen, {"detector": "par04_siw"})
    out = tmp_path / "eval"
    with pytest.warns(UserWarning) as caught:
        result = evaluate(tmp_path / "ref.h5", tmp_path / "gen.h5", out)
    notes = [str(w.message) for w in caught]
    assert notes == result["warnings"] and len(notes) == 2
    assert notes[0].startswith("generated incident energy E_inc covers [")
    assert "incident energy E_inc are distributed differently" in notes[1]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["reference"]["format"] == "lemurs" and saved["generated"]["format"] == "calochallenge"
    assert saved["detector"] == "par04_siw" and saved["reference"]["synthetic"]
    for key in ("auc_low", "auc_high"):
        assert 0.0 <= saved[key]["value"] <= 1.0 and 0.0 < saved[key]["error"] < 0.2
    for key in ("fpd", "kpd", "fpd_cc", "kpd_cc"):
        assert set(saved[key]) == {"value", "error", "definition"} and saved[key]["definition"] == DEFINITIONS[key]
    assert saved["fpd"]["error"] > 0 and saved["fpd_cc"]["error"] > 0 and saved["fpd_cc"]["value"] > 0
    assert saved["settings"]["calochallenge_features"] == 362 and saved["settings"]["calochallenge_seed"] == 42
    assert set(saved["prdc"]) == {"precision", "recall", "density", "coverage"}
    assert saved["separation_power"]["e_ratio"] < 0.2 and len(saved["separation_power_per_layer"]) == N_Z
    for role, s in (("reference", ref), ("generated", gen)):  # its physics: tests/test_synthetic.py
        c = saved["coherence"][role]
        assert c["value"] == pytest.approx(O.centre_coherence(O.high_level_features(s.showers, s.energy)))
        assert 0.01 < c["error"] < 0.15  # ~1 / sqrt(300) for a correlation near 0
    report = (out / "report.md").read_text()
    assert "| centre coherence across depth, generated | " in report
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert sorted(links) == sorted(saved["plots"]) and len(links) >= 15
    for link in links:
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(tmp_path / "ref.h5") in report and str(tmp_path / "gen.h5") in report
    assert "## Warnings" in report
    # the paper's FPD/KPD sit on the CaloChallenge rows only; each FPD/KPD row names its definition
    assert re.search(r"\| FPD x 10\^3 \(CaloChallenge definition: 362 CaloChallenge high-level features, jetnet.fpd "
                     rf"with replacement\) \| [0-9.]+ \| [0-9.]+ \| {PAPER_DS2['fpd_cc'][0] * 1e3:.3g} \| "
                     rf"{PAPER_DS2['fpd_cc'][1] * 1e3:.3g} \|", report)
    assert re.search(rf"\| KPD x 10\^3 \(CaloChallenge definition: .*\| {PAPER_DS2['kpd_cc'][0] * 1e3:.3g} \|", report)
    assert re.search(r"\| FPD x 10\^3 \(calofm definition: 44 calofm high-level features, batches without "
                     r"replacement; [^|]*\) \| [0-9.]+ \| [0-9.]+ \| not comparable \| not comparable \|", report)
    assert "### FPD and KPD, CaloChallenge definition" in report and "### calofm definitions" in report


def test_cli_evaluate(tmp_path):
    for name, seed in (("ref", 10), ("gen", 11)):
        write_lemurs(tmp_path / f"{name}.h5", generate("odd", 200, seed=seed), {"detector": "odd"})
    runner = CliRunner()
    args = ["evaluate", "--reference", str(tmp_path / "ref.h5"), "--generated", str(tmp_path / "gen.h5"),
            "--out", str(tmp_path / "eval"), "--metrics", "fpd,kpd", "--metrics", "fixed_points",
            "--point", "50,1.5708"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert re.search(r"fpd x 1e3: \S+ \+- \S+  \[FPD \(calofm definition: 44 calofm", res.output)
    assert "fpd_cc" not in res.output and "report:" in res.output
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["metrics"] == ["fpd", "kpd", "fixed_points"] and "auc_low" not in saved and "fpd_cc" not in saved
    res = runner.invoke(app, args[:-6] + ["--metrics", "kpd_cc,fpd_cc"])
    assert res.exit_code == 0, res.output
    assert re.search(r"fpd_cc x 1e3: \S+ \+- \S+  \[FPD \(CaloChallenge definition: 362 CaloChallenge", res.output)
    assert re.search(r"kpd_cc x 1e3: \S+ \+- \S+  \[KPD \(CaloChallenge definition", res.output)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"] == ["fpd_cc", "kpd_cc"]
    assert saved["fixed_points"][0]["energy_mev"] == 50_000.0 and saved["fixed_points"][0]["phi"] is None
    res = runner.invoke(app, args[:-4] + ["--metrics", "fpd,bogus"])
    assert res.exit_code != 0 and "'bogus'" in res.output



def test_fidelity_rows_show_the_auc_with_its_error_and_the_centre_coherence():
    """The AUC as value ± error, the coherence generated and data side by side; rows scored before either was
    measured (an older card's metrics.json) show the AUC alone and "–"."""
    from calofm.evaluate.fidelity import GOALS, card_metrics, table

    row = {"n": 2000, "mean_ratio": 1.01, "mean_ratio_error": 0.01, "spread_ratio": 0.95, "spread_ratio_error": 0.05,
           "fpd": {"value": 0.0244, "error": 0.0053}, "fpd_cc": {"value": 0.574, "error": 0.003}, "auc_high": 0.87,
           "auc_high_error": 0.02, "coherence": {"reference": {"value": 0.22, "error": 0.01}, "generated": {"value": 0.02, "error": 0.02}}}
    old = {k: v for k, v in row.items() if k not in ("coherence", "auc_high_error")}
    lines = table({"par04_siw": row, "odd": old}, goals=GOALS["edm"]).splitlines()
    assert len({line.count("|") for line in lines}) == 1  # every row has the header's columns
    assert lines[2].endswith("| 0.870 ± 0.020 | 0.02 ± 0.02 / 0.22 ± 0.01 |") and lines[3].endswith("| 0.870 | – |")
    card = card_metrics({"par04_siw": row, "odd": old})
    assert card["par04_siw"]["classifier AUC (high-level)"] == [0.87, 0.02]
    assert card["odd"]["classifier AUC (high-level)"] == 0.87
    assert card["par04_siw"]["centre coherence across depth, data"] == [0.22, 0.01]
    assert card["par04_siw"]["centre coherence across depth, generated"] == [0.02, 0.02]
    assert not any(k.startswith("centre coherence") for k in card["odd"])
