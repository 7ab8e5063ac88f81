"""Distances between a reference and a generated sample: separation power, FPD, KPD, classifier AUC, PRDC.

FPD and KPD follow the definitions of Kansal et al. (arXiv:2211.10295) as implemented in jetnet 0.2.5, the
reference the CaloChallenge and the CaloDiT-2 paper score with:
- each feature is divided by its maximum |value| in the reference sample (jetnet's `normalise=True`; the
  CaloChallenge applies it to its pre-scaled features, as `observables.high_level_features` pre-scales ours);
- FPD: the Fréchet distance of Gaussians fitted to batches of N showers, averaged over `num_batches` batches at
  `num_points` values of N spaced regularly in 1/N, extrapolated linearly in 1/N to N = inf (intercept and
  slope bounded at >= 0); the error is the fit's standard error on the intercept;
- KPD: the unbiased quadratic-time MMD^2 with the polynomial kernel k(x, y) = (x.y / d + 1)^4 (jetnet uses
  degree 4), on `num_batches` batches; the value is the median, the error half the 16-84 percentile range.
Three deliberate differences, all for samples smaller than jetnet's recommended 50,000: batches are drawn
without replacement (a batch with repeated showers is not an independent sample: with replacement the
extrapolated FPD of two samples of one distribution stays above zero and the "unbiased" MMD^2 is biased up);
batch sizes are capped (FPD's largest batch at the smaller sample, keeping jetnet's min/max ratio of 0.4, KPD's
batch at half the smaller sample so that batches differ); and FPD's error also counts the fluctuation of the
two samples themselves (see `fpd`). `fpd_difference` scores two generated samples against one reference with the
error of their difference, from which what they share cancels (the reference's fluctuation, and their own where
they come from one noise seed). For samples much larger than the batches the values are jetnet's, which
tests/test_evaluate.py checks against numbers computed with jetnet itself.

`fpd_calochallenge` and `kpd_calochallenge` are instead the CaloChallenge evaluation's FPD and KPD, without
those differences: jetnet 0.2.5's estimators with its defaults and the CaloChallenge's arguments, batches drawn
WITH replacement (see their docstrings). They score `observables.calochallenge_features`, and only their values
are comparable with CaloChallenge and CaloDiT-2 numbers; on two finite samples of one distribution they stay
above zero by construction.

Scale: FPD and KPD depend on the reference sample through the max-|value| normalisation (an extreme-value
statistic), so studies compare generated samples against one fixed reference file. Standardising instead
(mean/std) was tried and is worse here: near-constant features blow up the distances of unlike samples.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import curve_fit
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

KPD_DEGREE = 4
# FPD, KPD and PRDC run many small matrix products; BLAS threads do not pay off there and, when they contend
# with other processes for the cores, slow them down 3-15x (measured on 2 cores). They run on one BLAS thread.
ONE_BLAS_THREAD = {"limits": 1, "user_api": "blas"}
_DIST_CHUNK_ELEMENTS = 4_000_000  # pairwise distances held at once in PRDC


def _as_features(name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name} features must be a 2-D array (N >= 2, D); got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))[0]
        raise ValueError(f"{name} features contain NaN or inf (first in row {bad})")
    return x


def _pair(real, gen) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_features("real", real), _as_features("generated", gen)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"real and generated features differ in width: {x.shape[1]} vs {y.shape[1]}")
    return x, y


def normalise_features(real: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Divide each feature by its max |value| over the reference sample (constant-zero features left as is)."""
    scale = np.abs(real).max(axis=0)
    scale[scale == 0] = 1.0
    return real / scale, gen / scale


# --------------------------------------------------------------------------------------------- histograms


def histogram_edges(reference: np.ndarray, generated: np.ndarray, bins: int = 40, log: bool = False,
                    quantiles: tuple[float, float] = (0.001, 0.999)) -> np.ndarray:
    """Common bin edges covering the bulk of both samples (a few outliers must not squash the histogram)."""
    both = np.concatenate([np.ravel(reference), np.ravel(generated)]).astype(np.float64)
    both = both[np.isfinite(both) & ((both > 0) if log else True)]
    if both.size == 0:
        raise ValueError("histogram_edges: no finite values" + (" above zero" if log else ""))
    lo, hi = np.quantile(both, quantiles)
    if hi <= lo:
        lo, hi = (lo / 2, lo * 2) if log else (lo - 0.5, hi + 0.5)
    return np.geomspace(lo, hi, bins + 1) if log else np.linspace(lo, hi, bins + 1)


def separation_power(a: np.ndarray, b: np.ndarray, bins) -> float:
    """1/2 sum_i (h1_i - h2_i)^2 / (h1_i + h2_i) of unit-normalised histograms: 0 identical, 1 disjoint.

    `bins` is an int (common edges over both samples) or an array of edges; values outside the edges are left out.
    """
    a, b = np.ravel(a), np.ravel(b)
    edges = np.histogram_bin_edges(np.concatenate([a, b]), bins) if np.ndim(bins) == 0 else np.asarray(bins)
    h1 = np.histogram(a, edges)[0].astype(np.float64)
    h2 = np.histogram(b, edges)[0].astype(np.float64)
    if h1.sum() == 0 and h2.sum() == 0:
        raise ValueError(f"separation_power: neither sample has entries inside [{edges[0]:.4g}, {edges[-1]:.4g}]")
    if h1.sum() == 0 or h2.sum() == 0:  # one sample lies wholly outside the other's range: fully separated
        return 1.0
    h1, h2 = h1 / h1.sum(), h2 / h2.sum()
    total = h1 + h2
    keep = total > 0
    return float(0.5 * np.sum((h1 - h2)[keep] ** 2 / total[keep]))


# --------------------------------------------------------------------------------------------- FPD, KPD


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) of two Gaussians.

    tr (C1 C2)^(1/2) is the sum of square roots of the eigenvalues of C1^(1/2) C2 C1^(1/2), which is symmetric
    positive semi-definite: no complex square roots, stable for the near-singular covariances of correlated
    shower features.
    """
    w, v = np.linalg.eigh(cov1)
    s1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = s1 @ cov2 @ s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def _linear(x, intercept, slope):
    return intercept + slope * x


def _sample_fd(x: np.ndarray, y: np.ndarray) -> float:
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


def fpd(real_feats, gen_feats, seed: int = 0, *, min_samples: int = 20_000, max_samples: int = 50_000,
        num_batches: int = 20, num_points: int = 10, normalise: bool = True,
        sample_error: bool = True) -> tuple[float, float]:
    """Fréchet physics distance extrapolated to infinite N, and its error (see the module docstring).

    jetnet's error is the fit's alone. Every batch is drawn from the same two samples, so the fit cannot see
    how much the two samples themselves fluctuate, and for samples of a few thousand showers that fluctuation
    dominates: FPDs of pairs of independent samples of one distribution scatter by several fit errors. With
    `sample_error` (default) it is added in quadrature, estimated from disjoint halves: for random splits of
    both samples into halves (A1, A2) and (B1, B2), the FDs of (A1, B1) and (A2, B2) are independent, so half
    the mean squared difference is the variance of the FD at N/2, scaled to N as 1/N (conservative; it falls
    as 1/N^2 where the distributions agree). `sample_error=False` gives jetnet's error.
    """
    x, y = _pair(real_feats, gen_feats)
    if normalise:
        x, y = normalise_features(x, y)
    with threadpool_limits(**ONE_BLAS_THREAD):
        return _fpd(x, [y], [1.0], _fpd_sizes(len(x), len(y), min_samples, max_samples, num_points),
                    np.random.default_rng(seed), num_batches, sample_error)


def fpd_difference(real_feats, gen_a, gen_b, seed: int = 0, *, factor: float = 1.0, min_samples: int = 20_000,
                   max_samples: int = 50_000, num_batches: int = 20, num_points: int = 10) -> tuple[float, float]:
    """FPD(real, a) - factor x FPD(real, b) and its error, the two scored against one reference sample.

    Row i of `gen_a` and of `gen_b` are taken together in every batch and half: two models generated from one seed
    at one list of conditions (as `calofm generate` and the cards do) make much the same shower from the same
    noise, so most of the generated samples' fluctuation, which dominates `fpd`'s error, is common to both
    FPDs and cancels from their difference, as does the reference's (one set of reference showers a batch). For
    unrelated samples the pairing costs nothing. The extrapolation and the disjoint-halves sample error are
    those of the difference itself. `factor` = 3 tests "a within 3x of b" (a distilled model against its
    teacher) as the sign of FPD(a) - 3 FPD(b). Features are normalised by the reference, as in `fpd`.
    """
    x, a = _pair(real_feats, gen_a)
    b = _pair(x, gen_b)[1]
    if len(a) != len(b):
        raise ValueError(f"the two generated samples differ in size: {len(a)} vs {len(b)} showers")
    (xn, a), b = normalise_features(x, a), normalise_features(x, b)[1]
    with threadpool_limits(**ONE_BLAS_THREAD):
        return _fpd(xn, [a, b], [1.0, -factor], _fpd_sizes(len(x), len(a), min_samples, max_samples, num_points),
                    np.random.default_rng(seed), num_batches, sample_error=True)


def _fpd_sizes(n_real: int, n_gen: int, min_samples: int, max_samples: int, num_points: int) -> np.ndarray:
    """The batch sizes N of `fpd`, regular in 1/N, the largest capped at the smaller sample."""
    n_max = min(max_samples, n_real, n_gen)
    n_min = max(2, min(min_samples, round(n_max * min_samples / max_samples)))
    return (1.0 / np.linspace(1.0 / n_min, 1.0 / n_max, num_points)).astype(np.int64)


def _fpd(x: np.ndarray, ys: list[np.ndarray], weights: list[float], sizes: np.ndarray, rng: np.random.Generator,
         num_batches: int, sample_error: bool) -> tuple[float, float]:
    """The batch loop, fit and errors of sum_i w_i FD(x, y_i) on normalised features, every term on the same
    reference rows and the same rows of the equally long y_i: `fpd` (one sample, w = 1) and `fpd_difference`.
    The fit's intercept and slope are bounded at >= 0 (as jetnet's) when every w_i is, as a sum of distances
    cannot be negative; a difference can."""
    def combined(ix, iy) -> float:
        return sum(w * _sample_fd(x[ix], y[iy]) for w, y in zip(weights, ys))

    means = []
    for n in tqdm(sizes, desc="FPD", unit="N", leave=False):
        means.append(np.mean([combined(rng.choice(len(x), size=n, replace=False),
                                       rng.choice(len(ys[0]), size=n, replace=False)) for _ in range(num_batches)]))
    if not np.any(means):  # every batch scored exactly 0: one sample twice in a difference
        return 0.0, 0.0
    bounds = ([0.0, 0.0], [np.inf, np.inf]) if min(weights) >= 0 else (-np.inf, np.inf)
    params, cov = curve_fit(_linear, 1.0 / sizes, means, bounds=bounds)
    error = float(np.sqrt(cov[0, 0]))
    if sample_error:
        hx, hy = len(x) // 2, len(ys[0]) // 2
        diffs = []
        for _ in range(num_batches):
            px, py = rng.permutation(len(x)), rng.permutation(len(ys[0]))
            diffs.append(combined(px[:hx], py[:hy]) - combined(px[hx:2 * hx], py[hy:2 * hy]))
        var_half = np.mean(np.square(diffs)) / 2.0
        error = float(np.sqrt(error**2 + var_half / 2.0))
    return float(params[0]), error


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(a_i, b_j) = (a_i.b_j / d + 1)^4, (len(a), len(b)): jetnet's polynomial kernel (gamma = 1/d, degree 4)."""
    k = a @ b.T
    k /= a.shape[1]
    k += 1.0
    k **= KPD_DEGREE
    return k


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^4: diagonal terms k(x_i, x_i) left out of the XX, YY means."""

    def mean_kernel(a, b, same):
        k = _poly_kernel(a, b)
        n = len(a)
        return (k.sum() - np.trace(k)) / (n * (n - 1)) if same else k.mean()

    return float(mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2.0 * mean_kernel(x, y, False))


def kpd(real_feats, gen_feats, seed: int = 0, *, num_batches: int = 10, batch_size: int = 5_000,
        normalise: bool = True) -> tuple[float, float]:
    """Kernel physics distance: median of batch MMD^2 and half its 16-84 percentile range."""
    x, y = _pair(real_feats, gen_feats)
    if normalise:
        x, y = normalise_features(x, y)
    n = max(2, min(batch_size, len(x) // 2, len(y) // 2))
    rng = np.random.default_rng(seed)
    with threadpool_limits(**ONE_BLAS_THREAD):
        vals = [_poly_mmd2_unbiased(x[rng.choice(len(x), n, replace=False)],
                                    y[rng.choice(len(y), n, replace=False)])
                for _ in tqdm(range(num_batches), desc="KPD", unit="batch", leave=False)]
    lo, hi = np.percentile(vals, [16.275, 83.725])
    return float(np.median(vals)), float((hi - lo) / 2)


# --------------------------------------------------------------------------------------------- CaloChallenge FPD, KPD

# What the CaloChallenge evaluation (github.com/CaloChallenge/homepage, code/evaluate.py) runs on its high-level
# features, reference first: jetnet.evaluation.fpd(reference, generated, min_samples=10000) and
# jetnet.evaluation.kpd(reference, generated, batch_size=10000), every other argument at jetnet 0.2.5's default.
# jetnet (MIT licence, Raghav Kansal) is not a dependency: it needs torch, coffea, energyflow and numpy < 2. The
# estimators below follow jetnet/evaluation/gen_metrics.py of v0.2.5 (fpd, kpd, _kpd_batches), written anew.
CC_SEED = 42  # jetnet's default seed, kept by the CaloChallenge
CC_FPD = {"min_samples": 10_000, "max_samples": 50_000, "num_batches": 20, "num_points": 10}
CC_KPD = {"num_batches": 10, "batch_size": 10_000}
_KERNEL_CHUNK_ELEMENTS = 4_000_000  # kernel entries held at once in kpd_calochallenge


def _draw_counts(rng: np.random.Generator, n_rows: int, size: int) -> np.ndarray:
    """jetnet's batch, rng.choice(n_rows, size=size) (with replacement), as how often each row was drawn."""
    return np.bincount(rng.choice(n_rows, size=size), minlength=n_rows)


def _weighted_moments(x: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.mean and np.cov (ddof 1) of the batch that holds row i of x counts[i] times, in O(rows drawn x d^2)
    however large the batch (equal to gathering the batch, to rounding)."""
    used = np.flatnonzero(counts)
    w = counts[used].astype(np.float64)
    rows = x[used]
    n = w.sum()
    mu = w @ rows / n
    d = rows - mu
    cov = (d * w[:, None]).T @ d / (n - 1)
    return mu, (cov + cov.T) / 2


def fpd_calochallenge(real_feats, gen_feats, seed: int = CC_SEED, *, min_samples: int = CC_FPD["min_samples"],
                      max_samples: int = CC_FPD["max_samples"], num_batches: int = CC_FPD["num_batches"],
                      num_points: int = CC_FPD["num_points"], normalise: bool = True) -> tuple[float, float]:
    """FPD as the CaloChallenge evaluates it: jetnet.evaluation.fpd (v0.2.5) with min_samples=10,000.

    Features divided by their max |value| in the reference; batch sizes N = int(1 / linspace(1/min_samples,
    1/max_samples, num_points)); for each N, num_batches pairs of batches of N rows drawn WITH replacement from
    each sample (one np.random.default_rng(seed) for all draws, reference batch first, as jetnet draws them, so
    the same features and seed draw the same batches); the mean Fréchet distance per N is fitted linearly in 1/N
    (intercept and slope bounded at >= 0; redone in units of the largest mean where jetnet's fit does not move
    from its start); returns the intercept and the fit's standard error on it. Batches may
    be larger than the samples (50,000 drawn from 2,000 showers): a batch is handled as draw counts per row, which
    gives its mean and covariance exactly at the cost of the sample, not of the batch. Differences from jetnet:
    the Fréchet distance comes from `frechet_distance` (eigenvalues) rather than scipy.linalg.sqrtm, and all
    sums are in float64; both change the value at the level of rounding.
    """
    x, y = _pair(real_feats, gen_feats)
    if normalise:
        x, y = normalise_features(x, y)
    sizes = (1 / np.linspace(1.0 / min_samples, 1.0 / max_samples, num_points)).astype(np.int32)
    rng = np.random.default_rng(seed)
    means = []
    with threadpool_limits(**ONE_BLAS_THREAD):
        for n in tqdm(sizes, desc="FPD (CaloChallenge)", unit="N", leave=False):
            vals = []
            for _ in range(num_batches):
                cx = _draw_counts(rng, len(x), int(n))
                cy = _draw_counts(rng, len(y), int(n))
                vals.append(frechet_distance(*_weighted_moments(x, cx), *_weighted_moments(y, cy)))
            means.append(np.mean(vals))
    bounds = ([0.0, 0.0], [np.inf, np.inf])
    params, cov = curve_fit(_linear, 1 / sizes, means, bounds=bounds)
    if not cov.any():  # means of ~1e16 (a feature exploding in a few showers) never move the fit from its start
        scale = float(np.max(np.abs(means)))  # (1, 1), zero covariance, as in jetnet: fit them in its units instead
        params, cov = curve_fit(_linear, 1 / sizes, np.asarray(means) / scale, bounds=bounds)
        params, cov = params * scale, cov * scale**2
    return float(params[0]), float(np.sqrt(cov[0, 0]))


def _kernel_quadratic_forms(a: np.ndarray, ca: np.ndarray, b: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """sum_ij ca[k, i] k(a_i, b_j) cb[k, j] for every row k of the count matrices ca (K, len(a)), cb (K, len(b)):
    the kernel sums of K batches at once, over the rows drawn at all, in chunks of the kernel matrix."""
    ua, ub = np.flatnonzero(ca.any(axis=0)), np.flatnonzero(cb.any(axis=0))
    a, ca, b, cb = a[ua], ca[:, ua], b[ub], cb[:, ub]
    out = np.zeros(len(ca))
    step = max(1, _KERNEL_CHUNK_ELEMENTS // max(1, len(b)))
    for i in range(0, len(a), step):
        t = _poly_kernel(a[i:i + step], b) @ cb.T  # (chunk, K)
        out += np.einsum("kc,ck->k", ca[:, i:i + step], t)
    return out


def kpd_calochallenge(real_feats, gen_feats, seed: int = CC_SEED, *, num_batches: int = CC_KPD["num_batches"],
                      batch_size: int = CC_KPD["batch_size"], normalise: bool = True) -> tuple[float, float]:
    """KPD as the CaloChallenge evaluates it: jetnet.evaluation.kpd (v0.2.5) with batch_size=10,000.

    Features divided by their max |value| in the reference; batch i draws batch_size rows WITH replacement from
    each sample with np.random.default_rng(seed + 1000 i) (reference first: jetnet's `_kpd_batches`); its value
    is the "unbiased" quadratic-time MMD^2 with k(x, y) = (x.y / d + 1)^4, whose XX and YY means leave out only
    the diagonal (a row drawn twice still meets itself, so same-distribution samples give a positive value);
    returns the median over batches and half the 16.275-83.725 percentile range. Each batch is handled as draw
    counts per row: its kernel sums are quadratic forms of the counts with the kernel matrix of the rows drawn,
    equal to jetnet's (batch_size x batch_size matrices) to rounding, for a fraction of the cost when the samples
    are smaller than the batches.
    """
    x, y = _pair(real_feats, gen_feats)
    if normalise:
        x, y = normalise_features(x, y)
    cx, cy = np.zeros((num_batches, len(x))), np.zeros((num_batches, len(y)))
    for i in range(num_batches):
        rng = np.random.default_rng(seed + i * 1000)
        cx[i], cy[i] = _draw_counts(rng, len(x), batch_size), _draw_counts(rng, len(y), batch_size)
    m = float(batch_size)
    d = x.shape[1]
    with threadpool_limits(**ONE_BLAS_THREAD):
        xx = _kernel_quadratic_forms(x, cx, x, cx) - cx @ ((x * x).sum(1) / d + 1.0) ** KPD_DEGREE
        yy = _kernel_quadratic_forms(y, cy, y, cy) - cy @ ((y * y).sum(1) / d + 1.0) ** KPD_DEGREE
        xy = _kernel_quadratic_forms(x, cx, y, cy)
    vals = xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (m * m)
    lo, hi = np.percentile(vals, [16.275, 83.725])
    return float(np.median(vals)), float((hi - lo) / 2)


def bootstrap(statistic: Callable[[np.ndarray], float], x, seed: int = 0, *, boot: int = 200) -> tuple[float, float]:
    """`statistic(x)` over the rows of x, and its error: the std of it over `boot` resamples with replacement."""
    x = np.asarray(x)
    rng = np.random.default_rng(seed)
    return float(statistic(x)), float(np.std([statistic(x[rng.integers(0, len(x), len(x))]) for _ in range(boot)]))


# --------------------------------------------------------------------------------------------- classifier


CLASSIFIER_REPEATS = 5  # classifiers averaged per AUC (`classifier_auc`): ~10 s more for 2,000 showers a side


def classifier_auc(real, gen, seed: int = 0, *, repeats: int = CLASSIFIER_REPEATS, hidden: int = 128,
                   epochs: int = 30, patience: int = 4, batch_size: int = 256,
                   lr: float = 1e-3) -> tuple[float, float]:
    """ROC AUC of an MLP telling reference (label 1) from generated (0), and its error: 0.5 means indistinguishable.

    The CaloChallenge protocol: equal numbers of each class, a 60/20/20 train/validation/test split per class,
    features standardised on the training split, early stopping on the validation loss (best epoch kept),
    isotonic calibration of the output on the validation split, then AUC on the test split. One such classifier's
    AUC scatters from split to split by ~2x its test split's statistical error (0.036 at AUC 0.69 and 2,000 showers
    a side, benchmarks/fidelity.md, "The classifier AUC's error"), so the value is the mean of `repeats` of them,
    each with its own split and initialisation (seeds `seed` ... `seed + repeats - 1`; `seed` alone is the
    CaloChallenge's single run). The error adds in quadrature the repeats' standard error and the two samples' own
    fluctuation, which no repeat on them removes: DeLong's error of a test split (`auc_error`) scaled to the whole
    sample; with one repeat, that test split's error. Seeded; leaves torch's global random state and thread count
    untouched.
    """
    x_real, x_gen = np.asarray(real, dtype=np.float32), np.asarray(gen, dtype=np.float32)
    if x_real.ndim != 2 or x_gen.ndim != 2 or x_real.shape[1] != x_gen.shape[1]:
        raise ValueError(f"classifier_auc needs 2-D arrays of equal width; got {x_real.shape} and {x_gen.shape}")
    n = min(len(x_real), len(x_gen))
    if n < 10:
        raise ValueError(f"classifier_auc needs at least 10 showers per class; got {len(x_real)} and {len(x_gen)}")
    if repeats < 1:
        raise ValueError(f"classifier_auc needs repeats >= 1; got {repeats}")
    runs = np.array([_split_auc(x_real, x_gen, n, seed + k, hidden, epochs, patience, batch_size, lr)
                     for k in range(repeats)])
    aucs, errors = runs[:, 0], runs[:, 1]
    if repeats == 1:
        return float(aucs[0]), float(errors[0])
    n_train, n_val = _split_sizes(n)
    test_fraction = (n - n_train - n_val) / n
    error = np.sqrt(aucs.var(ddof=1) / repeats + errors.mean() ** 2 * test_fraction)
    return float(aucs.mean()), float(error)


def _split_sizes(n: int) -> tuple[int, int]:
    """Training and validation showers per class of the 60/20/20 split; the rest are the test split."""
    return int(0.6 * n), int(0.2 * n)


def _split_auc(x_real: np.ndarray, x_gen: np.ndarray, n: int, seed: int, hidden: int, epochs: int, patience: int,
               batch_size: int, lr: float) -> tuple[float, float]:
    """One classifier of `classifier_auc`: (AUC, DeLong error) on its seed's test split."""
    import torch

    rng = np.random.default_rng(seed)
    n_train, n_val = _split_sizes(n)
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for data, label in ((x_real, 1.0), (x_gen, 0.0)):
        idx = rng.permutation(len(data))[:n]
        for name, part in zip(splits, np.split(idx, [n_train, n_train + n_val]), strict=True):
            splits[name][0].append(data[part])
            splits[name][1].append(np.full(len(part), label, np.float32))
    xs = {k: np.concatenate(v[0]) for k, v in splits.items()}
    ys = {k: np.concatenate(v[1]) for k, v in splits.items()}
    mean, std = xs["train"].mean(0), xs["train"].std(0)
    std[std < 1e-6] = 1.0
    t = {k: torch.from_numpy((v - mean) / std) for k, v in xs.items()}
    ty = {k: torch.from_numpy(v) for k, v in ys.items()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps this small run ~10x slower when threads contend with other processes
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            p_val, p_test = _train_mlp(t, ty, hidden, epochs, patience, batch_size, lr)
    finally:
        torch.set_num_threads(threads)
    calibrate = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p_val, ys["val"])
    scores = calibrate.predict(p_test)
    return float(roc_auc_score(ys["test"], scores)), auc_error(ys["test"], scores)


def auc_error(labels, scores) -> float:
    """Standard error of the empirical ROC AUC of `scores` for binary `labels` (DeLong et al. 1988, Biometrics 44,
    837): each positive's placement (the fraction of negatives it outscores, ties half) and each negative's (the
    fraction of positives that outscore it) average to the AUC; their variances over the class sizes add. It is
    the test sample's error alone: a classifier retrained on another split of the same two samples lands 0.7-2x as
    far away (benchmarks/fidelity.md, "The classifier AUC's error"), which `classifier_auc`'s repeats count."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    pos, neg = np.sort(scores[labels == 1]), np.sort(scores[labels == 0])
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"auc_error needs at least 2 scores of each class; got {len(pos)} and {len(neg)}")

    def below(sorted_, x):  # how many of sorted_ lie below each x, ties counted half
        return (np.searchsorted(sorted_, x, "left") + np.searchsorted(sorted_, x, "right")) / 2

    v_pos, v_neg = below(neg, pos) / len(neg), 1 - below(pos, neg) / len(pos)
    return float(np.sqrt(v_pos.var(ddof=1) / len(pos) + v_neg.var(ddof=1) / len(neg)))


def _train_mlp(t: dict, ty: dict, hidden: int, epochs: int, patience: int, batch_size: int,
               lr: float) -> tuple[np.ndarray, np.ndarray]:
    """Train with early stopping on the validation loss; sigmoid outputs of the best epoch on val and test."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(t["train"].shape[1], hidden), nn.LeakyReLU(0.2),
                          nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    best, best_state, wait = np.inf, None, 0
    for _ in tqdm(range(epochs), desc="classifier", unit="epoch", leave=False):
        model.train()
        for b in torch.randperm(len(t["train"])).split(batch_size):
            opt.zero_grad()
            loss_fn(model(t["train"][b]).squeeze(1), ty["train"][b]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val_loss = loss_fn(model(t["val"]).squeeze(1), ty["val"]).item()
        if val_loss < best - 1e-4:
            best, best_state, wait = val_loss, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            wait += 1
            if wait >= patience:
                break
    model.load_state_dict(best_state)
    with torch.no_grad():
        return tuple(torch.sigmoid(model(t[k]).squeeze(1)).numpy() for k in ("val", "test"))


# --------------------------------------------------------------------------------------------- PRDC


def prdc(real, gen, k: int = 5) -> dict:
    """Precision, recall, density and coverage (Naeem et al. 2020) with k-nearest-neighbour balls.

    Features are standardised with the reference mean and std first. Density above 1 and precision above the
    reference-vs-reference value flag generated showers crowding around training showers (memorisation);
    low recall / coverage flag missing modes.
    """
    x, y = _pair(real, gen)
    if min(len(x), len(y)) <= k:
        raise ValueError(f"prdc needs more than k={k} showers per sample; got {len(x)} and {len(y)}")
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0
    with threadpool_limits(**ONE_BLAS_THREAD):
        return _prdc((x - mean) / std, (y - mean) / std, k)


def _prdc(x: np.ndarray, y: np.ndarray, k: int) -> dict:
    r_real = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)[0][:, k]  # column 0 is the point itself
    r_gen = NearestNeighbors(n_neighbors=k + 1).fit(y).kneighbors(y)[0][:, k]

    precision_hits = np.zeros(len(y), bool)   # generated shower inside some reference ball
    density_count = np.zeros(len(y))          # ... inside how many reference balls
    recall_hits = np.zeros(len(x), bool)      # reference shower inside some generated ball
    nearest_gen = np.full(len(x), np.inf)     # distance from each reference shower to its nearest generated one
    step = max(1, _DIST_CHUNK_ELEMENTS // len(x))
    x_sq = (x * x).sum(1)
    for i in range(0, len(y), step):
        yc = y[i:i + step]
        d = np.sqrt(np.clip((yc * yc).sum(1)[:, None] - 2.0 * yc @ x.T + x_sq[None, :], 0.0, None))
        inside = d < r_real[None, :]
        precision_hits[i:i + step] = inside.any(1)
        density_count[i:i + step] = inside.sum(1)
        recall_hits |= (d < r_gen[i:i + step, None]).any(0)
        np.minimum(nearest_gen, d.min(0), out=nearest_gen)
    return {"precision": float(precision_hits.mean()), "recall": float(recall_hits.mean()),
            "density": float(density_count.sum() / (k * len(y))), "coverage": float((nearest_gen < r_real).mean())}
