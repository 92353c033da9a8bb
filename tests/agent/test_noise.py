"""Tests for agent.noise: exact discrete Laplace / Gaussian noise from a secure source.

Statistical tests use fixed seeds (`SeededRandom`, test only), so each is deterministic; the
tolerances are nevertheless chosen so that a correct sampler would fail with a fresh seed only
with negligible probability, while a wrong distribution would fail:

- means: |mean| < 5 sd / sqrt(N) (5 standard errors: two-sided false-alarm rate 6e-7);
- variances: the sample variance s^2 of N draws has standard error sqrt((mu4 - sigma^4) / N)
  (delta method / the chi-square-like law of s^2 with the fourth central moment mu4, computed
  here from the exact pmf); we require |s^2 - Var| < 5 of those standard errors;
- chi-square goodness of fit against the exact pmf, every bin with expected count >= 5 (tails
  pooled), p > 1e-4;
- frequencies of Bernoulli(p): |freq - p| < 5 sqrt(p (1 - p) / N).
"""

from __future__ import annotations

import functools
import math
import os
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from agent import noise
from agent.noise import (
    RandomSource,
    SecureRandom,
    SeededRandom,
    add_noise,
    bernoulli_exp_array,
    discrete_gaussian,
    discrete_gaussian_scalar,
    discrete_gaussian_variance,
    discrete_laplace,
    discrete_laplace_scalar,
    discrete_laplace_variance,
    gaussian_sigma2_for_zcdp,
    laplace_scale,
    sample_bernoulli_exp,
    zcdp_rho_for,
    zcdp_to_epsilon,
)

N_VEC = 200_000
# The pure-Python samplers take ~15-30 us a draw: 40k keeps the suite fast, and the
# tolerances above scale with N, so the tests stay equally strict relative to their noise.
N_SCALAR = 40_000
LAPLACE_SCALES = [Fraction(1), Fraction(3, 2), Fraction(50), Fraction(1000, 7)]
GAUSS_SIGMA2 = [Fraction(1), Fraction(5, 2), Fraction(100), Fraction(2500)]


# -- exact pmfs (float; reference values for the tests) ----------------------------------------


def laplace_pmf(scale: Fraction) -> tuple[np.ndarray, np.ndarray]:
    """Support and pmf of the discrete Laplace: P(x) = tanh(1/(2t)) exp(-|x|/t)."""
    t = float(scale)
    half = math.ceil(60 * t) + 10  # the mass beyond is below e^-60
    x = np.arange(-half, half + 1)
    return x, math.tanh(1 / (2 * t)) * np.exp(-np.abs(x) / t)


def gauss_pmf(sigma2: Fraction) -> tuple[np.ndarray, np.ndarray]:
    """Support and pmf of the discrete Gaussian, normalized by summation."""
    s2 = float(sigma2)
    half = math.ceil(40 * math.sqrt(s2)) + 10
    x = np.arange(-half, half + 1)
    w = np.exp(-(x.astype(float) ** 2) / (2 * s2))
    return x, w / w.sum()


def moments(x: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(variance, fourth central moment) of a symmetric pmf (mean 0)."""
    xf = x.astype(float)
    return float((xf**2 * p).sum()), float((xf**4 * p).sum())


def chi_square_p(samples: np.ndarray, x: np.ndarray, p: np.ndarray, width: int = 1) -> float:
    """Chi-square goodness-of-fit p-value: bins of `width` integers with expected count >= 5,
    each tail pooled into one bin (merged into its neighbour if its expectation is below 5)."""
    if width > 1:
        x, inverse = np.unique(x // width, return_inverse=True)
        p = np.bincount(inverse, weights=p)
        samples = samples // width
    n = samples.size
    central = np.flatnonzero(n * p >= 5)
    lo, hi = x[central[0]], x[central[-1]]  # the pmf is unimodal: a contiguous range
    observed = np.bincount(np.clip(samples, lo - 1, hi + 1) - (lo - 1),
                           minlength=hi - lo + 3).astype(float)
    expected = np.concatenate([[p[x < lo].sum()], p[(x >= lo) & (x <= hi)],
                               [p[x > hi].sum()]]) * n
    # an out-of-support draw would land in a tail with ~0 expectation: the test then fails
    if expected[0] < 5:
        observed[1] += observed[0]
        expected[1] += expected[0]
        observed, expected = observed[1:], expected[1:]
    if expected[-1] < 5:
        observed[-2] += observed[-1]
        expected[-2] += expected[-1]
        observed, expected = observed[:-1], expected[:-1]
    expected *= observed.sum() / expected.sum()  # remove float rounding of the total
    return float(stats.chisquare(observed, expected).pvalue)


def check_distribution(samples: np.ndarray, x: np.ndarray, p: np.ndarray) -> None:
    n = samples.size
    assert samples.dtype == np.int64
    var, mu4 = moments(x, p)
    mean = samples.mean()
    assert abs(mean) < 5 * math.sqrt(var / n), (mean, var)
    s2 = samples.var(ddof=1)
    se = math.sqrt((mu4 - var**2) / n)
    assert abs(s2 - var) < 5 * se, (s2, var, se)
    pvalue = chi_square_p(samples, x, p)
    assert pvalue > 1e-4, pvalue


@functools.cache
def vec_laplace(scale: Fraction) -> np.ndarray:
    return discrete_laplace(scale, N_VEC, SeededRandom(1000 + scale.numerator))


@functools.cache
def vec_gauss(sigma2: Fraction) -> np.ndarray:
    return discrete_gaussian(sigma2, N_VEC, SeededRandom(2000 + sigma2.numerator))


# -- the samplers' distributions ----------------------------------------------------------------


@pytest.mark.parametrize("scale", LAPLACE_SCALES, ids=str)
def test_discrete_laplace_vectorized_distribution(scale: Fraction) -> None:
    check_distribution(vec_laplace(scale), *laplace_pmf(scale))


@pytest.mark.parametrize("scale", LAPLACE_SCALES, ids=str)
def test_discrete_laplace_scalar_distribution(scale: Fraction) -> None:
    rng = SeededRandom(3000 + scale.numerator)
    samples = np.array([discrete_laplace_scalar(scale, rng) for _ in range(N_SCALAR)])
    check_distribution(samples, *laplace_pmf(scale))


@pytest.mark.parametrize("sigma2", GAUSS_SIGMA2, ids=str)
def test_discrete_gaussian_vectorized_distribution(sigma2: Fraction) -> None:
    check_distribution(vec_gauss(sigma2), *gauss_pmf(sigma2))


@pytest.mark.parametrize("sigma2", GAUSS_SIGMA2, ids=str)
def test_discrete_gaussian_scalar_distribution(sigma2: Fraction) -> None:
    rng = SeededRandom(4000 + sigma2.numerator)
    samples = np.array([discrete_gaussian_scalar(sigma2, rng) for _ in range(N_SCALAR)])
    check_distribution(samples, *gauss_pmf(sigma2))


def test_chi_square_detects_a_wrong_scale() -> None:
    # The goodness-of-fit test has power: samples of scale 50 do not pass as scale 52, nor
    # does a discrete Gaussian of sigma^2 = 2500 pass as sigma^2 = 2800.
    assert chi_square_p(vec_laplace(Fraction(50)), *laplace_pmf(Fraction(52))) < 1e-4
    assert chi_square_p(vec_gauss(Fraction(2500)), *gauss_pmf(Fraction(2800))) < 1e-4


@pytest.mark.parametrize("scale", [Fraction(1000, 7), Fraction(3, 2)], ids=str)
def test_laplace_exact_with_tiny_words(monkeypatch: pytest.MonkeyPatch, scale: Fraction) -> None:
    # Shrink the int64 word limits: Algorithm 1 then runs in many short blocks (one or two steps
    # per word) and the block-continuation logic must still give the exact law.
    monkeypatch.setattr(noise, "_WORD", 1 << 20)
    monkeypatch.setattr(noise, "_SMALL_WORD", 1 << 12)
    samples = discrete_laplace(scale, 50_000, SeededRandom(5))
    check_distribution(samples, *laplace_pmf(scale))


def test_gaussian_exact_with_python_int_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    # With a tiny int64 budget (2**8), candidates |y| > 23 have their acceptance test done in
    # Python ints (~12% of them at sigma^2 = 100): the mixture must still be exact.
    monkeypatch.setattr(noise, "_MAX_VEC_PARAM", 1 << 8)
    calls = []
    real = noise._bern_exp_py
    monkeypatch.setattr(noise, "_bern_exp_py", lambda *a: calls.append(1) or real(*a))
    sigma2 = Fraction(100)
    samples = discrete_gaussian(sigma2, 50_000, SeededRandom(6))
    assert len(calls) > 1000
    check_distribution(samples, *gauss_pmf(sigma2))


def test_gaussian_large_sigma_mixed_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # sigma ~ 32768: 2 p t^2 ~ 2**61, so Algorithm 1's steps k >= 3 of the acceptance test no
    # longer fit in int64 and those entries continue in Python ints, one by one.
    calls = []
    real = noise._bern_exp_frac_py
    monkeypatch.setattr(noise, "_bern_exp_frac_py", lambda *a: calls.append(1) or real(*a))
    sigma2 = Fraction(2**30 - 1)
    samples = discrete_gaussian(sigma2, 50_000, SeededRandom(15))
    assert len(calls) > 100
    x, p = gauss_pmf(sigma2)
    var, mu4 = moments(x, p)
    assert abs(samples.mean()) < 5 * math.sqrt(var / samples.size)
    assert abs(samples.var(ddof=1) - var) < 5 * math.sqrt((mu4 - var**2) / samples.size)
    assert chi_square_p(samples, x, p, width=1024) > 1e-4


def test_huge_parameters_use_python_ints() -> None:
    # Numerators beyond the int64 path: pure-Python sampling, still exact (smaller N: slow).
    scale = Fraction(2**31 + 1, 2**25)  # ~64
    samples = discrete_laplace(scale, 4000, SeededRandom(7))
    var, mu4 = moments(*laplace_pmf(scale))
    assert abs(samples.mean()) < 5 * math.sqrt(var / samples.size)
    assert abs(samples.var(ddof=1) - var) < 5 * math.sqrt((mu4 - var**2) / samples.size)
    sigma2 = Fraction(2**33 + 1, 2**22)  # ~2048
    samples = discrete_gaussian(sigma2, 2000, SeededRandom(8))
    var, mu4 = moments(*gauss_pmf(sigma2))
    assert abs(samples.mean()) < 5 * math.sqrt(var / samples.size)
    assert abs(samples.var(ddof=1) - var) < 5 * math.sqrt((mu4 - var**2) / samples.size)


def test_variance_formulas_match_the_pmfs() -> None:
    for scale in LAPLACE_SCALES:
        var, _ = moments(*laplace_pmf(scale))
        assert discrete_laplace_variance(scale) == pytest.approx(var, rel=1e-9)
    for sigma2 in [*GAUSS_SIGMA2, Fraction(1, 4), Fraction(10**7)]:
        var, _ = moments(*gauss_pmf(sigma2)) if sigma2 < 10**6 else (float(sigma2), 0)
        got = discrete_gaussian_variance(sigma2)
        assert got == pytest.approx(var, rel=1e-9)
        assert got <= float(sigma2)
    assert discrete_gaussian_variance(Fraction(1, 4)) < 0.25 * 0.99  # visibly below sigma^2


# -- Bernoulli(exp(-gamma)) ---------------------------------------------------------------------

GAMMAS = [Fraction(0), Fraction(1, 3), Fraction(1), Fraction(5, 2), Fraction(7)]


def _check_frequency(hits: np.ndarray, gamma: Fraction) -> None:
    p = math.exp(-gamma)
    n = hits.size
    if gamma == 0:
        assert hits.all()
        return
    assert abs(hits.mean() - p) < 5 * math.sqrt(p * (1 - p) / n), (hits.mean(), p)


@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
def test_bernoulli_exp_vectorized(gamma: Fraction) -> None:
    hits = bernoulli_exp_array(gamma, N_VEC, SeededRandom(10 + gamma.numerator))
    assert hits.dtype == bool
    _check_frequency(hits, gamma)


@pytest.mark.parametrize("gamma", GAMMAS, ids=str)
def test_bernoulli_exp_scalar(gamma: Fraction) -> None:
    rng = SeededRandom(20 + gamma.numerator)
    _check_frequency(np.array([sample_bernoulli_exp(gamma, rng) for _ in range(N_SCALAR)]),
                     gamma)


def test_bernoulli_exp_beyond_int64_falls_back_exactly() -> None:
    # den * 2 > 2**62: from step 2 on, Algorithm 1 continues in Python ints.
    gamma = Fraction(2**61 - 1, 2**61)
    _check_frequency(bernoulli_exp_array(gamma, 20_000, SeededRandom(30)), gamma)


# -- random sources -----------------------------------------------------------------------------

ARRAY_BOUNDS = [1, 2, 3, 7, 1000, 3 * 2**30, 2**32 - 1, 2**32, 2**32 + 1, 3 * 2**60,
                2**61 + 1, 2**62 - 1, 2**62]


@pytest.mark.parametrize("source", [SecureRandom, lambda: SeededRandom(40)],
                         ids=["secure", "seeded"])
@pytest.mark.parametrize("n", ARRAY_BOUNDS)
def test_randbelow_array_in_range_and_uniform(source, n: int) -> None:
    rng = source()
    size = 60_000
    a = rng.randbelow_array(n, size)
    assert a.dtype == np.int64 and a.shape == (size,)
    assert a.min() >= 0 and a.max() < n
    if n == 1:
        return
    # Uniformity over k equal buckets. For n = 3 * 2**30 (32-bit words) and 3 * 2**60 (64-bit)
    # a plain `word % n` would put 2/4 resp. 6/16 of the mass in the first third instead of
    # 1/3: the chi-square test would see it, so this checks the rejection step.
    k = min(n, 30) if n < 1000 else 3 if n % 3 == 0 else 32
    buckets = np.array([v * k // n for v in a.tolist()])  # Python ints: no overflow
    counts = np.bincount(buckets, minlength=k)
    # bucket i holds the values v with v k // n == i: ceil((i+1) n / k) - ceil(i n / k) of them
    sizes = [-(-(i + 1) * n // k) + (-i * n // k) for i in range(k)]
    expected = np.array([float(Fraction(s, n)) for s in sizes]) * size
    assert stats.chisquare(counts, expected).pvalue > 1e-4


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 2**62), size=st.integers(0, 50))
def test_randbelow_array_never_out_of_range(n: int, size: int) -> None:
    for rng in (SecureRandom(), SeededRandom(n)):
        a = rng.randbelow_array(n, size)
        assert a.shape == (size,) and a.dtype == np.int64
        assert ((a >= 0) & (a < n)).all()


def test_randbelow_array_rejects_bad_bounds() -> None:
    for rng in (SecureRandom(), SeededRandom(0)):
        with pytest.raises(ValueError, match=">= 1"):
            rng.randbelow_array(0, 5)
        with pytest.raises(ValueError, match="2\\*\\*62"):
            rng.randbelow_array(2**62 + 1, 5)
        with pytest.raises(ValueError, match=">= 1"):
            rng.randbelow(0)


def test_secure_randbelow_scalar() -> None:
    rng = SecureRandom()
    draws = [rng.randbelow(6) for _ in range(30_000)]
    assert stats.chisquare(np.bincount(draws, minlength=6)).pvalue > 1e-4
    big = 2**100 + 1
    assert all(0 <= rng.randbelow(big) < big for _ in range(200))
    assert rng.randbelow(1) == 0


def test_sources_implement_the_protocol() -> None:
    assert isinstance(SecureRandom(), RandomSource)
    assert isinstance(SeededRandom(1), RandomSource)
    assert SecureRandom.cryptographically_secure is True
    assert SeededRandom.cryptographically_secure is False


def test_seeded_source_is_reproducible() -> None:
    a = discrete_gaussian(Fraction(100), 500, SeededRandom(9))
    b = discrete_gaussian(Fraction(100), 500, SeededRandom(9))
    assert (a == b).all()


def test_secure_random_is_the_default_and_reads_os_urandom(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", counting)
    assert isinstance(noise._source(None), SecureRandom)
    for draw in (lambda: discrete_laplace(Fraction(50), 1000),
                 lambda: discrete_gaussian(Fraction(2500), 1000),
                 lambda: add_noise(np.zeros(10, np.int64), "discrete_laplace", Fraction(3)),
                 lambda: discrete_laplace_scalar(Fraction(3)),
                 lambda: discrete_gaussian_scalar(Fraction(3)),
                 lambda: sample_bernoulli_exp(Fraction(1, 2))):
        calls.clear()
        draw()
        assert calls, "the default source did not read os.urandom"
    calls.clear()
    discrete_laplace(Fraction(50), 1000)
    # bulk reads: a handful of os.urandom calls for 1000 samples, not one per word
    assert len(calls) < 20 and sum(calls) > 8 * 1000
    # and two draws differ (the OS source is not replayed)
    assert (discrete_laplace(Fraction(50), 1000) != discrete_laplace(Fraction(50), 1000)).any()


def test_no_public_default_is_the_seeded_source() -> None:
    import inspect

    for fn in (add_noise, discrete_laplace, discrete_gaussian, discrete_laplace_scalar,
               discrete_gaussian_scalar, bernoulli_exp_array, sample_bernoulli_exp):
        assert inspect.signature(fn).parameters["rng"].default is None


# -- add_noise ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism,param", [("discrete_laplace", Fraction(50)),
                                             ("discrete_gaussian", Fraction(2500))])
def test_add_noise(mechanism: str, param: Fraction) -> None:
    counts = np.arange(1000, dtype=np.int32).reshape(50, 20)
    before = counts.copy()
    noisy = add_noise(counts, mechanism, param, SeededRandom(11))
    assert noisy.dtype == np.int64 and noisy.shape == (50, 20)
    assert (counts == before).all()  # not in place
    diff = (noisy - counts).ravel()
    assert (diff != 0).mean() > 0.9
    var = (discrete_laplace_variance(param) if mechanism == "discrete_laplace"
           else discrete_gaussian_variance(param))
    assert abs(diff.mean()) < 5 * math.sqrt(var / diff.size)


def test_add_noise_rejects_bad_input() -> None:
    rng = SeededRandom(12)
    with pytest.raises(ValueError, match="unknown noise mechanism"):
        add_noise(np.zeros(3, np.int64), "laplace", Fraction(1), rng)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="integers"):
        add_noise(np.array([0.5, 1.0]), "discrete_laplace", Fraction(1), rng)
    assert add_noise(np.array([1.0, 2.0]), "discrete_laplace", Fraction(1), rng).dtype == np.int64
    assert add_noise(np.zeros((0,), np.int64), "discrete_gaussian", Fraction(1), rng).size == 0


# -- input validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, Fraction(0), Fraction(-3, 2)])
def test_non_positive_scale_raises(bad) -> None:
    rng = SeededRandom(13)
    with pytest.raises(ValueError, match="discrete Laplace scale must be > 0"):
        discrete_laplace(bad, 10, rng)
    with pytest.raises(ValueError, match="discrete Laplace scale must be > 0"):
        discrete_laplace_scalar(bad, rng)
    with pytest.raises(ValueError, match="sigma\\^2 must be > 0"):
        discrete_gaussian(bad, 10, rng)
    with pytest.raises(ValueError, match="sigma\\^2 must be > 0"):
        discrete_gaussian_scalar(bad, rng)
    with pytest.raises(ValueError, match="must be > 0"):
        add_noise(np.zeros(3, np.int64), "discrete_laplace", bad, rng)
    with pytest.raises(ValueError, match="must be > 0"):
        discrete_laplace_variance(bad)


def test_float_parameters_are_refused() -> None:
    with pytest.raises(TypeError, match="exact rational"):
        discrete_laplace(50.0, 10, SeededRandom(14))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="exact rational"):
        discrete_gaussian(2.5, 10, SeededRandom(14))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sample_bernoulli_exp(0.5, SeededRandom(14))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        bernoulli_exp_array(Fraction(-1), 3, SeededRandom(14))
    with pytest.raises(ValueError, match="size"):
        discrete_laplace(Fraction(1), -1, SeededRandom(14))


@pytest.mark.parametrize("eps", [0.0, -1.0, math.inf, math.nan])
def test_conversions_reject_bad_epsilon(eps: float) -> None:
    with pytest.raises(ValueError):
        laplace_scale(1, eps)
    with pytest.raises(ValueError):
        zcdp_rho_for(eps, 1e-6)


def test_conversions_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="sensitivity must be > 0"):
        laplace_scale(0, 1.0)
    with pytest.raises(TypeError):
        laplace_scale(1.5, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rho must be a finite number > 0"):
        gaussian_sigma2_for_zcdp(1, 0.0)
    with pytest.raises(ValueError, match="delta"):
        zcdp_rho_for(1.0, 0.0)
    with pytest.raises(ValueError, match="delta"):
        zcdp_to_epsilon(0.1, 1.0)


# -- conservative conversions -------------------------------------------------------------------


def test_laplace_scale_examples() -> None:
    assert laplace_scale(50, 1.0) == 50
    assert laplace_scale(1, 0.02) == 50  # float 0.02 is a hair above 1/50: 50 is conservative
    assert laplace_scale(3, Fraction(1, 3)) == 9  # exact input: exact output
    assert isinstance(laplace_scale(1, 0.3), Fraction)
    assert laplace_scale(1, 0.3) >= 1 / Fraction(0.3) > Fraction(10, 3)  # 0.3 < 3/10 as float


@settings(max_examples=100, deadline=None)
@given(delta=st.integers(1, 10_000), eps=st.floats(1e-3, 100.0))
def test_laplace_scale_is_conservative(delta: int, eps: float) -> None:
    scale = laplace_scale(delta, eps)
    exact = Fraction(delta) / Fraction(eps)  # Fraction(float) is the float's exact value
    assert scale >= exact
    assert scale <= exact * (1 + Fraction(1, 10**6))  # and only a hair above
    assert scale.numerator < 2**31 and scale.denominator < 2**31  # the fast int64 path


@settings(max_examples=100, deadline=None)
@given(d2=st.integers(1, 10_000), rho=st.floats(1e-6, 50.0))
@example(d2=2104, rho=0.0002619212210302631)  # once a short fraction with a 4e9 numerator
@example(d2=2105, rho=0.0002619212210302631)
def test_gaussian_sigma2_is_conservative(d2: int, rho: float) -> None:
    sigma2 = gaussian_sigma2_for_zcdp(d2, rho)
    exact = Fraction(d2) / (2 * Fraction(rho))
    assert exact <= sigma2 <= exact * (1 + Fraction(1, 10**6))
    if exact < 2**29:  # sigma < 23,000: small enough terms for discrete_gaussian's int64 path
        p, q = sigma2.numerator, sigma2.denominator
        t = math.isqrt(p // q) + 1
        assert p < 2**31 and q * t < 2**31 and 2 * p * q * t * t * 2 < 2**62
    assert gaussian_sigma2_for_zcdp(d2, Fraction(1, 8)) == Fraction(4 * d2)  # exact input


@settings(max_examples=100, deadline=None)
@given(eps=st.floats(1e-3, 50.0), delta=st.floats(1e-12, 0.5))
def test_zcdp_round_trip(eps: float, delta: float) -> None:
    rho = zcdp_rho_for(eps, delta)
    back = zcdp_to_epsilon(rho, delta)
    assert back <= eps  # never more than the budget
    assert back == pytest.approx(eps, rel=1e-12)  # and the largest such rho (to rounding)
    log_inv = math.log(1 / delta)
    assert math.sqrt(rho) == pytest.approx(math.sqrt(log_inv + eps) - math.sqrt(log_inv),
                                           rel=1e-6)


def test_zcdp_examples() -> None:
    assert zcdp_to_epsilon(0.0, 1e-6) == 0.0
    rho = zcdp_rho_for(1.0, 1e-6)
    assert rho == pytest.approx(0.0174689, rel=1e-5)
    assert rho + 2 * math.sqrt(rho * math.log(1e6)) <= 1.0
