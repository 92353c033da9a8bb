"""Label SLIs checked against independent computations on the raw simulated labeled events.

Every reference value below is computed from the raw arrays (y_true, y_score, residuals,
latencies) with numpy / plain formulas, never from the histograms the SLI functions read.
Tolerances:
- classification: exact (the confusion matrix loses nothing);
- calibration, residuals: the binning bounds derived in aggregator/slis.py (and exact when
  every raw value sits at its bin's midpoint, which isolates the formula from the binning);
- quantiles: the width of the bin holding the quantile;
- with DP noise: the realized noise is unknown to the code, so the tolerance comes from its
  variance (see `noise_l1_bound`).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from agent.noise import SeededRandom, add_noise, discrete_laplace_variance
from agent.spec import BINARY, MULTICLASS, REGRESSION, LabelSpec, Spec
from agent.summary import Summary
from aggregator.slis import (
    MIN_FAIRNESS_LABELS,
    LabelSLIs,
    calibration,
    classification,
    fairness_delta,
    histogram_quantile,
    label_slis,
    regression,
)

CAL_EDGES = np.linspace(0.0, 1.0, 11)          # 10 bins of width 0.1
RES_EDGES = np.linspace(-3.0, 3.0, 25)         # 24 bins of width 0.25
LAT_EDGES = np.array([0.0, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600])

# Noise of R merged reports, each with discrete Laplace of scale 6 in every cell (epsilon 1
# over 6 histograms): per-cell variance R * var(6).
NOISE_SCALE = Fraction(6)
NOISE_REPORTS = 10
NOISE_SD = math.sqrt(NOISE_REPORTS * discrete_laplace_variance(NOISE_SCALE))


def noisy(counts: np.ndarray, seed: int) -> np.ndarray:
    out = np.asarray(counts, np.int64)
    for r in range(NOISE_REPORTS):
        out = add_noise(out, "discrete_laplace", NOISE_SCALE, SeededRandom(seed * 100 + r))
    return out


def noise_l1_bound(cells: int) -> float:
    """A bound on sum |eta_i| over `cells` independent noise cells of sd NOISE_SD: its mean is
    at most cells * sd (E|eta| <= sd by Jensen) and its sd at most sqrt(cells) * sd, so
    mean + 6 sd is exceeded with negligible probability. Clamping at 0 moves a cell by at
    most |eta_i|, so this bounds the change of any sum of clamped cells, too."""
    return NOISE_SD * (cells + 6 * math.sqrt(cells))


def ratio_tol(cells: int, total: float, k: float = 2.0) -> float:
    """|A'/T' - A/T| <= (|dA| + (A/T) |dT|) / (T - |dT|) <= k E / (T - E) for a ratio whose
    numerator is a coefficient-in-[0,1] sum of the same E-bounded cells (k = 2)."""
    e = noise_l1_bound(cells)
    return k * e / (total - e)


# -- raw simulation and independent binning ---------------------------------------------------

def simulate_binary(n: int, seed: int, other_share: float = 0.02):
    rng = np.random.default_rng(seed)
    score = rng.beta(2.0, 3.0, n)
    y = (rng.random(n) < score ** 0.8).astype(np.int64)  # somewhat miscalibrated
    y[rng.random(n) < other_share] = 2                      # labels outside the classes
    return y, score


def bin_confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    c = np.zeros((k + 1, k + 1), np.int64)
    np.add.at(c, (y, pred), 1)
    return c.reshape(-1)


def bin_calibration(score: np.ndarray, outcome: np.ndarray, edges: np.ndarray) -> np.ndarray:
    b = np.clip(np.searchsorted(edges, score, side="right") - 1, 0, edges.size - 2)
    c = np.zeros((edges.size - 1, 2), np.int64)
    np.add.at(c, (b, outcome.astype(np.int64)), 1)
    return c.reshape(-1)


def bin_numeric(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """[underflow, bins (last closed), overflow, missing], written independently."""
    out = np.zeros(edges.size + 2, np.int64)
    for v in values:
        if np.isnan(v):
            out[-1] += 1
        elif v < edges[0]:
            out[0] += 1
        elif v > edges[-1]:
            out[-2] += 1
        elif v == edges[-1]:
            out[edges.size - 1] += 1
        else:
            out[int(np.searchsorted(edges, v, side="right"))] += 1
    return out


def raw_ece(score: np.ndarray, outcome: np.ndarray, edges: np.ndarray) -> float:
    b = np.clip(np.searchsorted(edges, score, side="right") - 1, 0, edges.size - 2)
    total = 0.0
    for i in range(edges.size - 1):
        sel = b == i
        if sel.any():
            total += sel.sum() * abs(outcome[sel].mean() - score[sel].mean())
    return total / score.size


def midpoints_of(score: np.ndarray, edges: np.ndarray) -> np.ndarray:
    b = np.clip(np.searchsorted(edges, score, side="right") - 1, 0, edges.size - 2)
    return (edges[b] + edges[b + 1]) / 2


# -- classification ---------------------------------------------------------------------------

def raw_binary(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    tp = np.sum((pred == 1) & (y == 1))
    fp = np.sum((pred == 1) & (y != 1))
    fn = np.sum((pred != 1) & (y == 1))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"accuracy": float(np.mean(y == pred)), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall),
            "positive_rate": float(np.mean(pred == 1))}


def test_binary_classification_equals_raw_counts():
    y, score = simulate_binary(20_000, seed=1)
    pred = (score >= 0.5).astype(np.int64)
    got = classification(bin_confusion(y, pred, 2), 2, binary=True)
    want = raw_binary(y, pred)
    for name, value in want.items():
        assert getattr(got, name) == pytest.approx(value, rel=1e-12), name
    assert got.total == y.size


def test_binary_classification_with_dp_noise_within_noise_bound():
    n = 200_000
    y, score = simulate_binary(n, seed=2)
    pred = (score >= 0.5).astype(np.int64)
    got = classification(noisy(bin_confusion(y, pred, 2), seed=2), 2, binary=True)
    want = raw_binary(y, pred)
    # 9 cells in every ratio's numerator and denominator (conservative: each is a sub-sum).
    tp = np.sum((pred == 1) & (y == 1))
    for name in ("accuracy", "positive_rate"):
        assert abs(getattr(got, name) - want[name]) <= ratio_tol(9, n), name
    for name, den in (("precision", np.sum(pred == 1)), ("recall", np.sum(y == 1)),
                      ("f1", 2 * tp + np.sum((pred == 1) != (y == 1)))):
        assert abs(getattr(got, name) - want[name]) <= ratio_tol(9, den), name


def test_binary_f1_is_zero_not_nan_when_no_positive_is_found():
    # 10 positives, none predicted positive: precision has nothing to divide by, recall is 0.
    c = np.array([[90, 0, 0], [10, 0, 0], [0, 0, 0]])
    got = classification(c.reshape(-1), 2, binary=True)
    assert math.isnan(got.precision) and got.recall == 0 and got.f1 == 0
    assert got.accuracy == pytest.approx(0.9) and got.positive_rate == 0
    empty = classification(np.zeros(9), 2, binary=True)
    assert all(math.isnan(getattr(empty, m)) for m in ("accuracy", "precision", "recall",
                                                       "f1", "positive_rate"))


def test_shares_of_negative_noisy_cells_stay_in_range():
    c = np.array([[50, -7, 0], [-3, 50, 0], [0, -1, 0]])
    got = classification(c.reshape(-1), 2, binary=True)
    assert got.accuracy == 1.0 and got.precision == 1.0 and got.recall == 1.0


def test_fleet_scale_noise_leaves_accuracy_and_latency_quantiles_unbiased():
    """A cohort of 750 merged reports: noise sd ~540 per cell (discrete Laplace of scale 14,
    sd 19.8, over 750 reports), 30,000 labels, five confusion cells and every far latency bin
    truly empty. Clamping those cells would add ~0.4 sd each to the denominator (accuracy
    down ~3 points) and pile positive noise into the far bins (p95 out in the hours). With
    raw cells over the exact total the accuracy errs by the noise of two cells only: sd
    sqrt(2) * 540 / 30000 = 0.025, so 4 sd = 0.1 is the bound; averaged over 20 cohorts
    (sd 0.0057) the bias stays under 0.02. Latencies of 60, 120 and 180 s put the p95 inside
    [120, 300); bins under 5 noise sd read as empty, it stays there (a truly empty bin passes
    5 sd with probability 4e-4), within ~25 s of the uniform-in-bin truth (the two kept bins'
    noise, 540 on 10k and 20k, moves the interpolated rank by a few percent of the bin)."""
    rng = np.random.default_rng(5)
    sd = 19.8 * math.sqrt(750)
    n = 30_000
    y = rng.random(n) < 0.5
    pred = np.where(rng.random(n) < 0.78, y, ~y)
    truth = float(np.mean(y == pred))
    c = np.zeros((3, 3))
    np.add.at(c, (y.astype(int), pred.astype(int)), 1)
    lat = rng.choice([60.0, 120.0, 180.0], n)
    lat_counts = np.concatenate([[0], np.histogram(lat, LAT_EDGES)[0], [0, 0]])
    errors, p95s, p95s_clamped = [], [], []
    for _ in range(20):
        noisy_c = c + rng.laplace(0, sd / math.sqrt(2), c.shape)
        got = classification(noisy_c.reshape(-1), 2, binary=True, total=n)
        assert abs(got.accuracy - truth) < 0.1
        errors.append(got.accuracy - truth)
        noisy_lat = lat_counts + rng.laplace(0, sd / math.sqrt(2), lat_counts.shape)
        p95, _ = histogram_quantile(noisy_lat, LAT_EDGES, 0.95, noise_sd=sd)
        assert 120.0 <= p95 <= 300.0, p95
        p95s.append(p95)
        # clamping alone (the exact-count path) is what went wrong
        clamped, _ = histogram_quantile(np.clip(noisy_lat, 0, None), LAT_EDGES, 0.95)
        p95s_clamped.append(clamped)
    assert abs(float(np.mean(errors))) < 0.02
    truth_p95 = 120.0 + (0.95 * n - np.sum(lat < 120)) / np.sum(lat >= 120) * 180.0
    assert abs(float(np.median(p95s)) - truth_p95) < 25.0, (np.median(p95s), truth_p95)
    assert max(p95s_clamped) > 300.0


def raw_macro(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, float]:
    """Per class in plain Python, sklearn's zero_division=0 over the classes that occur."""
    ps, rs, fs = [], [], []
    for c in range(k):
        tp = int(np.sum((y == c) & (pred == c)))
        support, predicted = int(np.sum(y == c)), int(np.sum(pred == c))
        if support == 0 and predicted == 0:
            continue
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        ps.append(p)
        rs.append(r)
        fs.append(2 * p * r / (p + r) if p + r else 0.0)
    return {"accuracy": float(np.mean((y == pred) & (y < k))), "precision": float(np.mean(ps)),
            "recall": float(np.mean(rs)), "f1": float(np.mean(fs))}


def simulate_multiclass(n: int, k: int, seed: int, absent: int | None = None):
    rng = np.random.default_rng(seed)
    p = np.full(k, 1.0 / k)
    if absent is not None:
        p[absent] = 0
        p /= p.sum()
    y = rng.choice(k, n, p=p)
    pred = np.where(rng.random(n) < 0.7, y, rng.choice(k, n, p=p))
    y[rng.random(n) < 0.02] = k     # labels outside the classes
    pred[rng.random(n) < 0.01] = k  # predictions outside the classes
    return y, pred


def test_multiclass_macro_scores_equal_raw_per_class_average():
    k = 5
    y, pred = simulate_multiclass(20_000, k, seed=3, absent=4)
    # Class 3 is labeled but never predicted: precision 0 in the average (zero_division=0).
    pred[pred == 3] = 0
    got = classification(bin_confusion(y, pred, k), k, binary=False)
    want = raw_macro(y, pred, k)
    for name, value in want.items():
        assert getattr(got, name) == pytest.approx(value, rel=1e-12), name
    assert math.isnan(got.positive_rate)
    # "other" against "other" is not a hit.
    both_other = classification(bin_confusion(np.array([k]), np.array([k]), k), k, False)
    assert both_other.accuracy == 0 and math.isnan(both_other.precision)


def test_multiclass_with_dp_noise_within_noise_bound():
    k, n = 4, 200_000
    y, pred = simulate_multiclass(n, k, seed=4)
    got = classification(noisy(bin_confusion(y, pred, k), seed=4), k, binary=False)
    want = raw_macro(y, pred, k)
    cells = (k + 1) ** 2
    assert abs(got.accuracy - want["accuracy"]) <= ratio_tol(cells, n)
    # Each per-class ratio has a denominator of at least the smallest class count; the macro
    # average errs by at most the largest per-class error. (All classes occur, so noise cannot
    # change which classes are averaged.)
    smallest = min(min(np.sum(y == c), np.sum(pred == c)) for c in range(k))
    for name in ("precision", "recall", "f1"):
        assert abs(getattr(got, name) - want[name]) <= ratio_tol(cells, smallest), name


def test_confusion_of_the_wrong_size_is_an_error_naming_it():
    with pytest.raises(ValueError, match="confusion"):
        classification(np.zeros(8), 2, binary=True)


# -- calibration ------------------------------------------------------------------------------

def test_brier_and_ece_within_the_binning_bound_of_raw_scores():
    y, score = simulate_binary(50_000, seed=5, other_share=0.0)
    got = calibration(bin_calibration(score, y, CAL_EDGES), CAL_EDGES)
    raw_brier = float(np.mean((y - score) ** 2))
    width = 0.1
    # Bound (slis.calibration): Brier within sum_b (n_b/N) w_b = w, ECE within w/2.
    assert abs(got.brier - raw_brier) <= width
    assert abs(got.ece - raw_ece(score, y, CAL_EDGES)) <= width / 2
    assert got.brier_bound == pytest.approx(width) and got.ece_bound == pytest.approx(width / 2)
    # The miscalibration simulated (y ~ score^0.8) is visible beyond the bound.
    assert got.ece > 0.05


def test_brier_and_ece_exact_when_scores_sit_at_bin_midpoints():
    y, score = simulate_binary(50_000, seed=6, other_share=0.0)
    score = midpoints_of(score, CAL_EDGES)
    got = calibration(bin_calibration(score, y, CAL_EDGES), CAL_EDGES)
    assert got.brier == pytest.approx(float(np.mean((y - score) ** 2)), rel=1e-9)
    assert got.ece == pytest.approx(raw_ece(score, y, CAL_EDGES), rel=1e-9)


def test_brier_and_ece_with_dp_noise_within_noise_bound():
    n = 200_000
    y, score = simulate_binary(n, seed=7, other_share=0.0)
    score = midpoints_of(score, CAL_EDGES)  # no binning error: the noise alone
    got = calibration(noisy(bin_calibration(score, y, CAL_EDGES), seed=7), CAL_EDGES)
    cells = 2 * (CAL_EDGES.size - 1)
    # Brier: coefficients in [0, 1] -> ratio bound with k = 2. ECE: the numerator
    # sum_b |n1_b - m_b n_b| moves by at most E (n1 and n0 cells, coefficients <= 1), the
    # denominator by E: k = 2 as well.
    assert abs(got.brier - float(np.mean((y - score) ** 2))) <= ratio_tol(cells, n)
    assert abs(got.ece - raw_ece(score, y, CAL_EDGES)) <= ratio_tol(cells, n)


def test_calibration_empty_is_nan_and_bad_length_is_an_error():
    got = calibration(np.zeros(20), CAL_EDGES)
    assert math.isnan(got.brier) and math.isnan(got.ece)
    with pytest.raises(ValueError, match="calibration"):
        calibration(np.zeros(19), CAL_EDGES)


# -- regression -------------------------------------------------------------------------------

def test_mae_rmse_within_binning_bound_of_raw_residuals():
    rng = np.random.default_rng(8)
    r = np.clip(rng.normal(0.2, 0.8, 50_000), -2.99, 2.99)  # inside the edges
    r_with_missing = np.concatenate([r, [np.nan] * 100])
    got = regression(bin_numeric(r_with_missing, RES_EDGES), RES_EDGES)
    w = 0.25
    # Bounds (slis.regression): MAE within w/2, RMSE within w/2 (sqrt(sum (n/N) w^2/4)).
    assert abs(got.mae - float(np.mean(np.abs(r)))) <= w / 2
    assert abs(got.rmse - float(np.sqrt(np.mean(r ** 2)))) <= w / 2
    assert got.mae_bound == pytest.approx(w / 2) and got.rmse_bound == pytest.approx(w / 2)
    assert not got.clipped and got.total == r.size  # missing excluded


def test_mae_rmse_exact_at_midpoints_and_with_noise_within_bound():
    rng = np.random.default_rng(9)
    r = midpoints_of(np.clip(rng.normal(0, 1, 100_000), -2.99, 2.99), RES_EDGES)
    counts = bin_numeric(r, RES_EDGES)
    exact = regression(counts, RES_EDGES)
    mae, rmse = float(np.mean(np.abs(r))), float(np.sqrt(np.mean(r ** 2)))
    assert exact.mae == pytest.approx(mae, rel=1e-9)
    assert exact.rmse == pytest.approx(rmse, rel=1e-9)
    got = regression(noisy(counts, seed=9), RES_EDGES)
    # MAE = sum n|v|/N with |v| <= 3: each of the 26 cells (missing excluded) moves the
    # numerator by at most 3|eta| and the denominator by |eta|: k = 3 + MAE. RMSE^2 likewise
    # with 9 + RMSE^2, and |sqrt(a) - sqrt(b)| <= |a - b| / (sqrt(a) + sqrt(b)).
    cells = RES_EDGES.size + 1
    assert abs(got.mae - mae) <= ratio_tol(cells, r.size, k=3 + mae)
    ms_tol = ratio_tol(cells, r.size, k=9 + rmse ** 2)
    assert abs(got.rmse - rmse) <= ms_tol / rmse


def test_residuals_beyond_the_edges_give_a_flagged_lower_bound():
    rng = np.random.default_rng(10)
    r = rng.normal(0, 2.5, 20_000)  # a good share beyond +-3
    got = regression(bin_numeric(r, RES_EDGES), RES_EDGES)
    assert got.clipped
    assert got.mae < float(np.mean(np.abs(r)))
    assert got.rmse < float(np.sqrt(np.mean(r ** 2)))


# -- quantiles --------------------------------------------------------------------------------

def bin_width_at(x: float, edges: np.ndarray) -> float:
    i = int(np.clip(np.searchsorted(edges, x, side="right") - 1, 0, edges.size - 2))
    return float(edges[i + 1] - edges[i])


@pytest.mark.parametrize("q", [0.5, 0.95])
def test_latency_quantiles_within_their_bin_of_raw(q):
    rng = np.random.default_rng(11)
    lat = rng.lognormal(3.0, 1.0, 30_000)
    lat = lat[lat < LAT_EDGES[-1]]
    got, lower = histogram_quantile(bin_numeric(lat, LAT_EDGES), LAT_EDGES, q)
    want = float(np.quantile(lat, q))
    # Same bin as the raw quantile (ranks of 30k values never straddle an edge by chance here).
    assert abs(got - want) <= bin_width_at(want, LAT_EDGES)
    assert not lower


def test_latency_quantile_interpolates_linearly_inside_its_bin():
    # Uniform data is uniform inside every bin, where linear interpolation is exact: what is
    # left is the empirical quantile's sampling error, sd ~ sqrt(0.05 * 0.95 / N) * 3600 ~ 2.5 s
    # at N = 100k; 20 s is 8 sd and 1% of the 1800 s bin (reading a bin's midpoint errs 270 s).
    lat = np.random.default_rng(15).uniform(0, 3600, 100_000)
    got, _ = histogram_quantile(bin_numeric(lat, LAT_EDGES), LAT_EDGES, 0.95)
    assert abs(got - float(np.quantile(lat, 0.95))) <= 20.0


def test_latency_quantile_with_noise_stays_between_the_shifted_ranks():
    rng = np.random.default_rng(12)
    lat = rng.lognormal(3.0, 1.0, 100_000)
    lat = lat[lat < LAT_EDGES[-1]]
    counts = noisy(bin_numeric(lat, LAT_EDGES), seed=12)
    got, _ = histogram_quantile(counts, LAT_EDGES, 0.95)
    # Noise moves the cumulative share at any edge by at most 2E/(N-E) (ratio bound), so the
    # estimate lies in the bins holding the raw quantiles at 0.95 -+ that shift.
    d = ratio_tol(LAT_EDGES.size + 1, lat.size)
    lo_q, hi_q = np.quantile(lat, [0.95 - d, 0.95 + d])
    lo_edge = LAT_EDGES[np.searchsorted(LAT_EDGES, lo_q, side="right") - 1]
    hi_edge = LAT_EDGES[np.searchsorted(LAT_EDGES, hi_q, side="right")]
    assert lo_edge <= got <= hi_edge


def test_latency_quantile_in_the_overflow_is_the_last_edge_as_a_lower_bound():
    lat = np.concatenate([np.full(10, 5.0), np.full(90, 99_999.0)])
    got, lower = histogram_quantile(bin_numeric(lat, LAT_EDGES), LAT_EDGES, 0.95)
    assert got == LAT_EDGES[-1] and lower
    assert math.isnan(histogram_quantile(np.zeros(LAT_EDGES.size + 2), LAT_EDGES, 0.5)[0])


# -- per cohort: label_slis over a spec and a merged summary ---------------------------------

def spec_with(labels: LabelSpec) -> Spec:
    return Spec(model="m", model_version="1", features=(), labels=labels)


def binary_summary(spec: Spec, y: np.ndarray, score: np.ndarray, latency: np.ndarray) -> Summary:
    s = Summary.zero(spec)
    pred = (score >= spec.labels.threshold).astype(np.int64)
    s.confusion = bin_confusion(y, pred, 2)
    s.calibration = bin_calibration(score, (y == 1), np.asarray(spec.labels.calibration_edges))
    s.label_latency = bin_numeric(latency, np.asarray(spec.labels.latency_edges))
    s.labeled_count = s.label_histogram_count = y.size
    s.labels_unmatched_count, s.label_cache_evicted_count = 7, 3
    return s


def test_label_slis_binary_fills_every_field_from_the_summary():
    spec = spec_with(LabelSpec(BINARY, classes=("ok", "defect"), threshold=0.4,
                               latency_edges=tuple(LAT_EDGES)))
    y, score = simulate_binary(10_000, seed=13)
    lat = np.random.default_rng(13).exponential(40.0, y.size)
    got = label_slis(spec, binary_summary(spec, y, score, lat))
    want = raw_binary(y, (score >= 0.4).astype(np.int64))
    assert got.task == BINARY and got.labeled == y.size
    assert got.labels_unmatched == 7 and got.label_cache_evicted == 3
    for name, value in want.items():
        assert getattr(got, name) == pytest.approx(value, rel=1e-12), name
    assert abs(got.brier - float(np.mean(((y == 1) - score) ** 2))) <= 0.1   # width 0.1
    assert abs(got.label_latency_p95_s - np.quantile(lat, 0.95)) <= bin_width_at(
        np.quantile(lat, 0.95), LAT_EDGES)
    assert math.isnan(got.mae) and math.isnan(got.rmse)


def test_label_slis_regression_and_no_labels():
    spec = spec_with(LabelSpec(REGRESSION, residual_edges=tuple(RES_EDGES)))
    s = Summary.zero(spec)
    r = midpoints_of(np.random.default_rng(14).uniform(-2, 2, 5000), RES_EDGES)
    s.residuals = bin_numeric(r, RES_EDGES)
    s.labeled_count = s.label_histogram_count = r.size
    got = label_slis(spec, s)
    assert got.mae == pytest.approx(float(np.mean(np.abs(r))), rel=1e-9)
    assert math.isnan(got.accuracy) and math.isnan(got.brier)
    # Every report withheld: counts stay, scores are NaN rather than read off empty histograms.
    s.label_histogram_count = 0
    assert math.isnan(label_slis(spec, s).mae) and label_slis(spec, s).labeled == r.size
    assert label_slis(Spec(model="m", model_version="1", features=()), s) == LabelSLIs()


# -- fairness ---------------------------------------------------------------------------------

def test_fairness_delta_matches_raw_group_accuracies():
    spec = spec_with(LabelSpec(BINARY, classes=("no", "yes")))
    groups, raw = {}, {}
    for i, (region, flip) in enumerate({"eu": 0.05, "us": 0.15, "apac": 0.30}.items()):
        rng = np.random.default_rng(20 + i)
        score = rng.random(4000)
        y = (score >= 0.5).astype(np.int64)
        y = np.where(rng.random(y.size) < flip, 1 - y, y)
        score = score * (1 - flip) + flip / 2  # a different positive rate per group
        groups[region] = label_slis(spec, binary_summary(spec, y, score, np.ones(y.size)))
        pred = (score >= 0.5).astype(np.int64)
        raw[region] = (float(np.mean(y == pred)), float(np.mean(pred == 1)))
    # A tiny group is listed but cannot decide the gap.
    tiny = label_slis(spec, binary_summary(spec, np.array([0] * 5), np.full(5, 0.9),
                                           np.ones(5)))
    groups["tiny"] = tiny
    d = fairness_delta("region", groups)
    acc = {k: v[0] for k, v in raw.items()}
    pos = {k: v[1] for k, v in raw.items()}
    assert d.accuracy_gap == pytest.approx(max(acc.values()) - min(acc.values()), rel=1e-12)
    assert d.accuracy_best == max(acc, key=acc.get) == "eu"
    assert d.accuracy_worst == min(acc, key=acc.get) == "apac"
    assert d.positive_rate_gap == pytest.approx(max(pos.values()) - min(pos.values()), rel=1e-12)
    assert d.positive_rate_highest == max(pos, key=pos.get)
    assert d.positive_rate_lowest == min(pos, key=pos.get)
    assert [g.value for g in d.groups] == ["apac", "eu", "tiny", "us"]
    assert [g.eligible for g in d.groups] == [True, True, False, True]
    assert tiny.accuracy == 0  # would be the worst, were it eligible
    assert d.min_labels == MIN_FAIRNESS_LABELS


def test_fairness_delta_needs_two_eligible_groups():
    one = fairness_delta("region", {"eu": LabelSLIs(task=BINARY, histogram_labels=100,
                                                     accuracy=0.9, positive_rate=0.3)})
    assert math.isnan(one.accuracy_gap) and one.accuracy_best == ""
    multi = fairness_delta("hw", {
        "a": LabelSLIs(task=MULTICLASS, histogram_labels=100, accuracy=0.9),
        "b": LabelSLIs(task=MULTICLASS, histogram_labels=100, accuracy=0.7)})
    assert multi.accuracy_gap == pytest.approx(0.2) and math.isnan(multi.positive_rate_gap)


def test_label_slis_are_unknown_when_the_labels_drown_in_the_noise():
    """The same 10,000 labels judged under noise of sd 300 per cell (3 % of them: scores) and
    of sd 400 (4 %, over MAX_NOISE_SHARE: NaN, flagged, counts still there)."""
    spec = spec_with(LabelSpec(BINARY, classes=("ok", "defect"), threshold=0.4,
                               latency_edges=tuple(LAT_EDGES)))
    y, score = simulate_binary(10_000, seed=14)
    lat = np.random.default_rng(14).exponential(40.0, y.size)
    s = binary_summary(spec, y, score, lat)
    s.noise_variance_per_bin = 300.0 ** 2
    judged = label_slis(spec, s)
    assert not judged.insufficient_labels and math.isfinite(judged.accuracy)
    s.noise_variance_per_bin = 400.0 ** 2
    drowned = label_slis(spec, s)
    assert drowned.insufficient_labels
    assert all(math.isnan(getattr(drowned, f)) for f in
               ("accuracy", "precision", "recall", "f1", "brier", "ece", "positive_rate",
                "label_latency_p95_s"))
    assert (drowned.labeled, drowned.labels_unmatched) == (10_000, 7)
