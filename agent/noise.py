"""Exact differential-privacy noise for integer histogram counts.

The samplers follow Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential
Privacy" (NeurIPS 2020), and the reference implementation `discretegauss.py` by Thomas Steinke:

- Algorithm 1: Bernoulli(exp(-gamma)) for rational gamma >= 0. For gamma in [0, 1], draw
  A_k ~ Bernoulli(gamma/k) for k = 1, 2, ... until the first A_K = 0 and return K mod 2; for
  gamma > 1, floor(gamma) draws of Bernoulli(exp(-1)) followed by one Bernoulli(exp(-(gamma -
  floor(gamma)))), stopping at the first failure.
- Algorithm 2: discrete Laplace with rational scale t = s/r (P(X = x) proportional to
  exp(-|x|/t)): U uniform in {0..s-1}, kept with probability exp(-U/s); V ~ Geometric with
  P(V >= v) = exp(-v) (the number of Bernoulli(exp(-1)) successes before the first failure);
  |X| = floor((U + s V) / r); a uniform sign, rejecting (negative, 0).
- Algorithm 3: discrete Gaussian with rational variance sigma^2 (P(X = x) proportional to
  exp(-x^2 / (2 sigma^2))): t = floor(sigma) + 1, Y ~ discrete Laplace(t), kept with
  probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)).

Why no floating point on the sampling path: a float Laplace/Gaussian sample is a transformed
float uniform, and the set of doubles it can produce (and their probabilities) depends on the
true count; Mironov ("On Significance of the Least Significant Bits for Differential Privacy",
CCS 2012) showed that the low-order bits of such outputs can reveal the input, voiding the
guarantee. Here every probability is a ratio of integers and every coin is an exact integer
comparison `randbelow(d) < n` on uniform integers from a cryptographically secure source, so
the output distribution is exactly the stated one. Floats appear only outside the sampling
path: in the privacy-parameter conversions (whose results are rounded conservatively to exact
rationals), in the variance formulas, and in choosing batch sizes (which affects speed, never
the distribution).

Speed: the algorithms run vectorized with numpy over all samples at once, in int64 with exact
integer comparisons; rejection loops re-run only the still-active entries. Algorithm 1 stops
at the first failing step K (step k succeeds with probability gamma/k, i.e. randbelow(d*k) < n
for gamma = n/d), so P(K > j) = prod_{k<=j} gamma/k; a block of L steps is decided by ONE
uniform W in [0, R), R = prod d*k, through the nested events "W < R prod_{k<=j} n/(d k)"
(integer thresholds), which have exactly those probabilities: K, hence the output, has exactly
Algorithm 1's law (see `_bern_exp_frac_vec`). Independent uniforms share a word as mixed-radix
digits (W uniform in [0, r1 r2) gives W mod r1 and W div r1, independent and uniform). Where an
integer would reach 2**62 the affected entries fall back to the pure-Python implementation
(Python ints, unbounded), which is also the scalar API and a line-by-line port of the
reference. The uniform words are read from os.urandom in bulk: one call per batch.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import os
import random
from fractions import Fraction
from numbers import Rational
from typing import Literal, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Mechanism",
    "RandomSource",
    "SecureRandom",
    "SeededRandom",
    "add_noise",
    "bernoulli_exp_array",
    "discrete_gaussian",
    "discrete_gaussian_scalar",
    "discrete_gaussian_variance",
    "discrete_laplace",
    "discrete_laplace_scalar",
    "discrete_laplace_variance",
    "gaussian_sigma2_for_zcdp",
    "laplace_scale",
    "sample_bernoulli_exp",
    "zcdp_rho_for",
    "zcdp_to_epsilon",
]

logger = logging.getLogger(__name__)

Mechanism = Literal["discrete_laplace", "discrete_gaussian"]

_MAX_ARRAY_BOUND = 1 << 62  # randbelow_array takes 1 <= n <= 2**62
_WORD = 1 << 62  # vectorized integers (radix products, squares) stay below this
_SMALL_WORD = 1 << 32  # radix products below this are drawn as 4-byte words
_MAX_VEC_PARAM = 1 << 31  # scale / sigma^2 numerators and denominators for the int64 path


# -- random sources ------------------------------------------------------------------------


@runtime_checkable
class RandomSource(Protocol):
    """Where all randomness comes from: uniform integers, exactly.

    `randbelow(n)`: uniform in [0, n) for any int n >= 1. `randbelow_array(n, size)`: `size`
    independent uniform integers in [0, n), as an int64 array, for 1 <= n <= 2**62.
    """

    def randbelow(self, n: int) -> int: ...

    def randbelow_array(self, n: int, size: int) -> np.ndarray: ...


def _check_bound(n: int, limit: int | None) -> int:
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"randbelow bound must be >= 1, got {n}")
    if limit is not None and n > limit:
        raise ValueError(f"randbelow_array bound must be <= 2**62, got {n}")
    return n


class SecureRandom:
    """The production source: the operating system's CSPRNG (`os.urandom`).

    Stateless (nothing is buffered between calls, so it is safe across fork). Uniform integers
    are made by rejection sampling on uniform words, never by a biased modulo: a word w is kept
    only if w < floor(2**bits / n) * n, and then w mod n is uniform in [0, n).
    """

    cryptographically_secure = True

    def randbelow(self, n: int) -> int:
        n = _check_bound(n, None)
        if n == 1:
            return 0
        bits = (n - 1).bit_length()
        nbytes = (bits + 7) // 8
        mask = (1 << bits) - 1
        while True:  # acceptance >= 1/2 per try
            x = int.from_bytes(os.urandom(nbytes), "little") & mask
            if x < n:
                return x

    def randbelow_array(self, n: int, size: int) -> np.ndarray:
        n = _check_bound(n, _MAX_ARRAY_BOUND)
        size = operator.index(size)
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if n == 1 or size == 0:
            return np.zeros(size, np.int64)
        if n <= _SMALL_WORD:
            bits, dtype = 32, np.dtype("<u4")
        else:
            bits, dtype = 64, np.dtype("<u8")
        limit = ((1 << bits) // n) * n  # the largest multiple of n that fits in `bits`
        reject = 1.0 - limit / (1 << bits)  # a float, only to size the request
        out = np.empty(size, np.int64)
        filled = 0
        while filled < size:
            missing = size - filled
            # enough words for ~2x the expected rejections (and the loop for bad luck)
            count = missing + math.ceil(2.0 * missing * reject / (1.0 - reject))
            # One os.urandom call per batch of words.
            words = np.frombuffer(os.urandom(count * dtype.itemsize), dtype)
            if limit != 1 << bits:
                bad = words >= limit
                if bad.any() or words.size > missing:
                    words = words[~bad][:missing]
            got = words.size
            # n fits the word type (n = 2**32 only when every word is kept: the modulo is void)
            out[filled:filled + got] = words if n == 1 << bits else words % dtype.type(n)
            filled += got
        return out


class SeededRandom:
    """TEST ONLY: a reproducible, NOT cryptographically secure source (numpy PCG64 for arrays,
    `random.Random` for scalars). Noise drawn from it gives no privacy: anyone who knows or
    guesses the seed can subtract it. Never use it as a default; production code uses
    `SecureRandom`."""

    cryptographically_secure = False

    def __init__(self, seed: int) -> None:
        self._gen = np.random.Generator(np.random.PCG64(seed))
        self._py = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._py.randrange(_check_bound(n, None))

    def randbelow_array(self, n: int, size: int) -> np.ndarray:
        n = _check_bound(n, _MAX_ARRAY_BOUND)
        # numpy's bounded integers are exact (rejection sampling, no modulo bias).
        return self._gen.integers(0, n, size=operator.index(size), dtype=np.int64)


def _source(rng: RandomSource | None) -> RandomSource:
    return SecureRandom() if rng is None else rng


# -- parameters ----------------------------------------------------------------------------


def _positive_rational(value: object, what: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, Rational):
        raise TypeError(f"{what} must be an exact rational (fractions.Fraction or int), got "
                        f"{type(value).__name__} {value!r}; convert a float epsilon with "
                        "laplace_scale() / gaussian_sigma2_for_zcdp()")
    frac = Fraction(value)
    if frac <= 0:
        raise ValueError(f"{what} must be > 0, got {frac}")
    return frac


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None
    if n <= 0:
        raise ValueError(f"{what} must be > 0, got {n}")
    return n


def _exact_positive(value: Fraction | float | int, what: str) -> tuple[Fraction, bool]:
    """(exact value, whether it came from a float)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number, got bool")
    if isinstance(value, float):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
        return Fraction(value), True  # the float's exact binary value
    if isinstance(value, Rational):
        frac = Fraction(value)
        if frac <= 0:
            raise ValueError(f"{what} must be > 0, got {value!r}")
        return frac, False
    raise TypeError(f"{what} must be a float, int or Fraction, got {type(value).__name__}")


def _round_up(target: Fraction, max_numerator: int, max_denominator: int = 1 << 30) -> Fraction:
    """A rational >= target with small terms (the fast int64 path needs them): the best
    approximation with denominator <= 1000 when it is >= target and within 2**-40 relative
    (a float that means a short decimal, e.g. 0.02 -> 1/50), else target rounded up on a grid
    1/q with q <= max_denominator and the numerator about max_numerator (relative excess
    about 1/max_numerator, or 1/(max_denominator * target) for a small target)."""
    simple = target.limit_denominator(1000)
    if (target <= simple <= target * (1 + Fraction(1, 2**40))
            and simple.numerator <= max_numerator):  # a big one would leave the fast path
        return simple
    q = max(1, min(int(max_numerator / target), max_denominator))
    return Fraction(math.ceil(target * q), q)


def laplace_scale(sensitivity: int, epsilon: Fraction | float) -> Fraction:
    """The discrete Laplace scale t = sensitivity / epsilon as an exact Fraction.

    A Fraction/int epsilon gives t exactly. A float epsilon is taken at its exact binary value
    and the scale is rounded UP (never below sensitivity/epsilon, so the guarantee holds for the
    float given): e.g. 0.02 -> 50 * sensitivity.
    """
    delta = _positive_int(sensitivity, "sensitivity")
    eps, from_float = _exact_positive(epsilon, "epsilon")
    exact = Fraction(delta) / eps
    return _round_up(exact, 1 << 30) if from_float else exact


def gaussian_sigma2_for_zcdp(l2_sensitivity_sq: int, rho: Fraction | float) -> Fraction:
    """sigma^2 = Delta_2^2 / (2 rho): the discrete Gaussian variance parameter that gives
    rho-zCDP (CKS Theorem 4), exact for a Fraction rho, rounded UP for a float rho."""
    d2 = _positive_int(l2_sensitivity_sq, "l2_sensitivity_sq")
    r, from_float = _exact_positive(rho, "rho")
    exact = Fraction(d2) / (2 * r)
    # A small numerator keeps the acceptance test's integers (~2 p^2) inside int64.
    return _round_up(exact, 1 << 24) if from_float else exact


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return delta


def zcdp_to_epsilon(rho: float, delta: float) -> float:
    """(epsilon, delta)-DP implied by rho-zCDP: epsilon = rho + 2 sqrt(rho ln(1/delta))
    (Bun and Steinke 2016, Proposition 1.3)."""
    rho = float(rho)
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    return rho + 2.0 * math.sqrt(rho * -math.log(_check_delta(delta)))


def zcdp_rho_for(epsilon: float, delta: float) -> float:
    """The largest rho with rho + 2 sqrt(rho ln(1/delta)) <= epsilon (closed form:
    sqrt(rho) = sqrt(ln(1/delta) + epsilon) - sqrt(ln(1/delta)), evaluated without
    cancellation), nudged down until the float result satisfies the inequality."""
    epsilon = float(epsilon)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    log_inv = -math.log(_check_delta(delta))
    root = epsilon / (math.sqrt(log_inv + epsilon) + math.sqrt(log_inv))
    rho = root * root
    while rho > 0 and zcdp_to_epsilon(rho, delta) > epsilon:
        rho = math.nextafter(rho, 0.0)
    return rho


# -- variances (floats: not on the sampling path) -------------------------------------------


def discrete_laplace_variance(scale: Fraction | int) -> float:
    """Variance of the discrete Laplace of scale t: 2 e^(-1/t) / (1 - e^(-1/t))^2."""
    t = float(_positive_rational(scale, "discrete Laplace scale"))
    q = math.exp(-1.0 / t)
    return 2.0 * q / math.expm1(-1.0 / t) ** 2


@functools.lru_cache(maxsize=64)
def _dgauss_variance_sum(sigma2: Fraction) -> float:
    s2 = float(sigma2)
    half = math.ceil(40.0 * math.sqrt(s2)) + 2  # the mass beyond 40 sigma is below 1e-300
    x = np.arange(-half, half + 1, dtype=np.float64)
    w = np.exp(-(x * x) / (2.0 * s2))
    return min(float((x * x * w).sum() / w.sum()), s2)


def discrete_gaussian_variance(sigma2: Fraction | int) -> float:
    """Variance of the discrete Gaussian N_Z(0, sigma^2), by summing its pmf (float). It is
    at most sigma^2 (CKS Corollary 9); 1 - Var/sigma^2 is about 8 pi^2 sigma^2
    exp(-2 pi^2 sigma^2) (2e-7 at sigma^2 = 1, 1e-15 at 2), so for large sigma^2 it is sigma^2
    to double precision and the sum is skipped."""
    s2 = _positive_rational(sigma2, "discrete Gaussian sigma^2")
    if s2 > 10**6:
        return float(s2)
    return _dgauss_variance_sum(s2)


# -- pure-Python CKS (scalar, Python ints: the reference and the overflow fallback) ---------


def _bern_exp_frac_py(num: int, den: int, rng: RandomSource, k: int = 1) -> bool:
    """Algorithm 1, gamma = num/den in [0, 1], continuing from step k."""
    while rng.randbelow(den * k) < num:  # Bernoulli(gamma / k)
        k += 1
    return k % 2 == 1


def _bern_exp_py(num: int, den: int, rng: RandomSource) -> bool:
    """Bernoulli(exp(-num/den)) for num/den >= 0."""
    whole, num = divmod(num, den)
    for _ in range(whole):
        if not _bern_exp_frac_py(1, 1, rng):
            return False
    return _bern_exp_frac_py(num, den, rng)


def _geometric_exp1_py(rng: RandomSource) -> int:
    """Number of Bernoulli(exp(-1)) successes before the first failure."""
    v = 0
    while _bern_exp_frac_py(1, 1, rng):
        v += 1
    return v


def _dlaplace_py(a: int, b: int, rng: RandomSource) -> int:
    """Algorithm 2 with scale t = b/a (so 1/t = a/b)."""
    while True:
        while True:
            u = rng.randbelow(b)
            if _bern_exp_frac_py(u, b, rng):
                break
        v = _geometric_exp1_py(rng)
        mag = (u + b * v) // a
        negative = rng.randbelow(2) == 1
        if negative and mag == 0:
            continue
        return -mag if negative else mag


def _dgauss_py(p: int, q: int, rng: RandomSource) -> int:
    """Algorithm 3 with sigma^2 = p/q."""
    t = math.isqrt(p // q) + 1  # floor(sqrt(p/q)) + 1
    while True:
        y = _dlaplace_py(1, t, rng)
        # (|y| - sigma^2/t)^2 / (2 sigma^2) = (|y| q t - p)^2 / (2 p q t^2)
        if _bern_exp_py((abs(y) * q * t - p) ** 2, 2 * p * q * t * t, rng):
            return y


def sample_bernoulli_exp(gamma: Fraction | int, rng: RandomSource | None = None) -> bool:
    """One exact Bernoulli(exp(-gamma)) draw for rational gamma >= 0 (CKS Algorithm 1)."""
    if isinstance(gamma, bool) or not isinstance(gamma, Rational):
        raise TypeError(f"gamma must be a Fraction or int, got {type(gamma).__name__}")
    g = Fraction(gamma)
    if g < 0:
        raise ValueError(f"gamma must be >= 0, got {g}")
    return _bern_exp_py(g.numerator, g.denominator, _source(rng))


def discrete_laplace_scalar(scale: Fraction | int, rng: RandomSource | None = None) -> int:
    """One exact discrete Laplace sample: P(X = x) proportional to exp(-|x| / scale)."""
    t = _positive_rational(scale, "discrete Laplace scale")
    return _dlaplace_py(t.denominator, t.numerator, _source(rng))


def discrete_gaussian_scalar(sigma2: Fraction | int, rng: RandomSource | None = None) -> int:
    """One exact discrete Gaussian sample: P(X = x) proportional to exp(-x^2 / (2 sigma2))."""
    s2 = _positive_rational(sigma2, "discrete Gaussian sigma^2")
    return _dgauss_py(s2.numerator, s2.denominator, _source(rng))


# -- vectorized CKS (int64) -----------------------------------------------------------------


def _block(den: int, k: int, reserve: int = 1) -> tuple[list[int], int]:
    """The steps of Algorithm 1 one uniform word serves: radices den*k, den*(k+1), ... and
    their product R, with reserve * R < 2**32 when that still covers >= 5 steps (4-byte words),
    else reserve * R < 2**62. Empty when even den*k does not fit."""
    for limit in (_SMALL_WORD, _WORD):
        radices: list[int] = []
        prod = 1
        while reserve * prod * den * (k + len(radices)) < limit:
            prod *= den * (k + len(radices))
            radices.append(den * (k + len(radices)))
        if len(radices) >= 5 or limit == _WORD:
            return radices, prod
    raise AssertionError("unreachable")


def _bern_exp_frac_vec(num: np.ndarray, den: int, rng: RandomSource, k: int = 1,
                       first: tuple[np.ndarray, list[int], int] | None = None) -> np.ndarray:
    """Algorithm 1 for gamma_i = num_i / den in [0, 1] (num an int64 array, den an int), for
    all entries at once, from step k. `first`, if given, is (words, radices, R) for the first
    block: one word uniform in [0, R) per entry, R the product of the block's radices.

    Step j succeeds with probability gamma / j: Algorithm 1 stops at the first failing step K
    and returns K mod 2, so P(K > j) = prod_{i=k..j} gamma / i. A block of steps k..k+L-1 is
    decided by one W uniform in [0, R), R = prod_{i=k..k+L-1} den * i: "steps k..j succeed" is
    the event W < T_j with T_j = R * prod_{i=k..j} num / (den * i) = num^(j-k+1) *
    prod_{i=j+1..k+L-1} den * i, an integer. These events are nested like the real ones and
    have exactly their probabilities, so K has exactly Algorithm 1's law; entries that pass all
    L steps continue with a fresh word (the steps are independent)."""
    out = np.ones(num.size, bool)  # gamma = 0 -> 1, without drawing
    idx = np.flatnonzero(num)
    cur = num[idx]
    while idx.size:
        if first is not None:
            w, radices, prod = first[0][idx], first[1], first[2]
            first = None
        else:
            radices, prod = _block(den, k)
            if not radices:  # den * k >= 2**62: finish these entries with Python ints
                logger.debug("Bernoulli(exp(-x)): %d entries beyond int64 at step %d",
                             idx.size, k)
                for i, n in zip(idx.tolist(), cur.tolist(), strict=True):
                    out[i] = _bern_exp_frac_py(n, den, rng, k)
                break
            w = rng.randbelow_array(prod, idx.size)
        passed = np.zeros(idx.size, np.int64)  # steps passed in this block
        power = cur  # num^(j-k+1)
        rest = prod  # prod_{i=j+1..} den * i
        for step, r in enumerate(radices):
            rest //= r
            passed += w < power * rest  # power * rest <= R < 2**62
            if step + 1 < len(radices):
                if step >= 3 and not (passed > step).any():
                    break  # nobody passed step j, so nobody passes a later one
                power = power * cur
        done = passed < len(radices)
        out[idx[done]] = ((k + passed[done]) & 1).astype(bool)  # K = k + steps passed
        idx, cur = idx[~done], cur[~done]
        k += len(radices)
    return out


# Bernoulli(exp(-1)) = Algorithm 1 with gamma = 1: step 1 always succeeds; steps 2..12 are
# decided by one W uniform in [0, 12!) (< 2**32): steps 2..j succeed iff W < 12!/j!.
_F12 = math.factorial(12)
_EXP1_THRESHOLDS = np.array([_F12 // math.factorial(j) for j in range(12, 1, -1)], np.int64)


def _bern_exp1_vec(n: int, rng: RandomSource) -> np.ndarray:
    """n independent Bernoulli(exp(-1)) draws (Algorithm 1 with gamma = 1)."""
    w = rng.randbelow_array(_F12, n)
    # steps passed among 2..12 = the number of thresholds above w
    passed = _EXP1_THRESHOLDS.size - np.searchsorted(_EXP1_THRESHOLDS, w, side="right")
    out = (passed & 1).astype(bool)  # K = 2 + passed; success iff K is odd
    for i in np.flatnonzero(passed == _EXP1_THRESHOLDS.size).tolist():  # P = 1/12!
        out[i] = _bern_exp_frac_py(1, 1, rng, 13)
    return out


def _geometric_exp1_vec(n: int, rng: RandomSource, cap: np.ndarray | None = None) -> np.ndarray:
    """For each of n entries, V = the number of Bernoulli(exp(-1)) successes before the first
    failure (P(V >= v) = exp(-v)); with `cap`, an entry stops once V >= cap (V is then only
    meaningful as `V >= cap`). Blocks of m Bernoulli(exp(-1)) per active entry at a time."""
    v = np.zeros(n, np.int64)
    idx = np.arange(n)
    m = 2
    while idx.size:
        fail = ~_bern_exp1_vec(idx.size * m, rng).reshape(idx.size, m)
        stopped = fail.any(axis=1)
        v[idx] += np.where(stopped, fail.argmax(axis=1), m)
        go = ~stopped
        if cap is not None:
            go &= v[idx] < cap[idx]
        idx = idx[go]
        m = max(2, math.ceil(math.log(idx.size + 1)) + 1)  # few left: finish in ~1 block
    return v


def _bern_exp_vec(num: np.ndarray, den: int, rng: RandomSource) -> np.ndarray:
    """Bernoulli(exp(-num_i/den)) for num_i >= 0: floor(gamma) Bernoulli(exp(-1)) (stopping
    at the first failure) and one Bernoulli(exp(-frac(gamma)))."""
    whole, frac = np.divmod(num, den)
    out = np.ones(num.size, bool)
    big = np.flatnonzero(whole)
    if big.size:
        out[big] = _geometric_exp1_vec(big.size, rng, cap=whole[big]) >= whole[big]
    alive = np.flatnonzero(out)
    out[alive] = _bern_exp_frac_vec(frac[alive], den, rng)
    return out


def _dlaplace_vec(a: int, b: int, size: int, rng: RandomSource) -> np.ndarray:
    """Algorithm 2 with scale b/a (a, b < 2**31), `size` samples at once."""
    out = np.empty(size, np.int64)
    filled = 0
    # Float estimates of acceptance rates, only to size the batches.
    x = a / b
    p_keep_u = 1.0 if b == 1 else -math.expm1(-1.0) / (b * -math.expm1(-1.0 / b))
    p_valid = 1.0 - 0.5 * -math.expm1(-x)  # (negative, 0) is rejected
    radices, prod = _block(b, 1, reserve=2 * b) if b > 1 else ([], 1)
    if not radices:
        prod = 1  # the acceptance test draws its own words
    while filled < size:
        need = size - filled
        want = math.ceil(need / p_valid * 1.02) + 4
        count = math.ceil(want / p_keep_u * 1.02) + 4
        # The sign and U are the low mixed-radix digit (in [0, 2b)) of one uniform word whose
        # high part decides the first steps of U's acceptance test.
        w = rng.randbelow_array(2 * b * prod, count)
        w, low = np.divmod(w, 2 * b)
        negative = (low & 1).astype(bool)
        u = low >> 1
        if b > 1:
            first = (w, radices, prod) if radices else None
            keep = np.flatnonzero(_bern_exp_frac_vec(u, b, rng, first=first))
            keep = keep[:want]
            u, negative = u[keep], negative[keep]
        else:
            u, negative = u[:want], negative[:want]
        v = _geometric_exp1_vec(u.size, rng)
        if v.size and int(v.max()) >= (_WORD - b) // b:  # never in practice: P = e^-(2^31)
            mag_list = [(int(ui) + b * int(vi)) // a for ui, vi in zip(u, v, strict=True)]
            mag = np.array(mag_list, dtype=np.int64)  # OverflowError if it does not fit
        else:
            mag = (u + b * v) // a
        valid = ~(negative & (mag == 0))
        sample = np.where(negative, -mag, mag)[valid][:need]
        out[filled:filled + sample.size] = sample
        filled += sample.size
    return out


@functools.lru_cache(maxsize=64)
def _dgauss_accept_rate(p: int, q: int) -> float:
    """Float estimate of Algorithm 3's acceptance probability (batch sizing only)."""
    s2 = p / q
    t = math.isqrt(p // q) + 1
    half = min(60 * t, 10**6)
    y = np.arange(-half, half + 1, dtype=np.float64)
    lap = np.exp(-np.abs(y) / t)
    lap /= lap.sum()
    return float((lap * np.exp(-((np.abs(y) - s2 / t) ** 2) / (2 * s2))).sum())


def _dgauss_vec(p: int, q: int, size: int, rng: RandomSource) -> np.ndarray:
    """Algorithm 3 with sigma^2 = p/q, `size` samples at once (caller checks the bounds)."""
    t = math.isqrt(p // q) + 1
    qt = q * t
    den = 2 * p * q * t * t
    small = (_MAX_VEC_PARAM - 1) // qt  # |y| <= small keeps |y| q t - p inside +-2**31
    accept_rate = _dgauss_accept_rate(p, q)
    out = np.empty(size, np.int64)
    filled = 0
    while filled < size:
        need = size - filled
        y = _dlaplace_vec(1, t, math.ceil(need / accept_rate * 1.03) + 4, rng)
        absy = np.abs(y)
        accept = np.empty(y.size, bool)
        ok = absy <= small
        if ok.all():
            accept[:] = _bern_exp_vec((absy * qt - p) ** 2, den, rng)
        else:
            accept[ok] = _bern_exp_vec((absy[ok] * qt - p) ** 2, den, rng)
            for i in np.flatnonzero(~ok).tolist():
                accept[i] = _bern_exp_py((int(absy[i]) * qt - p) ** 2, den, rng)
        sample = y[accept][:need]
        out[filled:filled + sample.size] = sample
        filled += sample.size
    return out


def _check_size(size: int) -> int:
    size = operator.index(size)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return size


def bernoulli_exp_array(gamma: Fraction | int, size: int,
                        rng: RandomSource | None = None) -> np.ndarray:
    """`size` independent exact Bernoulli(exp(-gamma)) draws (bool array), vectorized."""
    if isinstance(gamma, bool) or not isinstance(gamma, Rational):
        raise TypeError(f"gamma must be a Fraction or int, got {type(gamma).__name__}")
    g = Fraction(gamma)
    if g < 0:
        raise ValueError(f"gamma must be >= 0, got {g}")
    size = _check_size(size)
    rng = _source(rng)
    if g.numerator >= _WORD:
        return np.array([_bern_exp_py(g.numerator, g.denominator, rng) for _ in range(size)],
                        dtype=bool)
    return _bern_exp_vec(np.full(size, g.numerator, np.int64), g.denominator, rng)


def discrete_laplace(scale: Fraction | int, size: int,
                     rng: RandomSource | None = None) -> np.ndarray:
    """`size` independent exact discrete Laplace samples (int64): P(X = x) proportional to
    exp(-|x| / scale), scale an exact positive rational (see `laplace_scale`)."""
    t = _positive_rational(scale, "discrete Laplace scale")
    size = _check_size(size)
    rng = _source(rng)
    a, b = t.denominator, t.numerator
    if a < _MAX_VEC_PARAM and b < _MAX_VEC_PARAM:
        return _dlaplace_vec(a, b, size, rng)
    logger.debug("discrete Laplace scale %s too fine for int64: pure-Python sampling", t)
    return np.array([_dlaplace_py(a, b, rng) for _ in range(size)], dtype=np.int64)


def discrete_gaussian(sigma2: Fraction | int, size: int,
                      rng: RandomSource | None = None) -> np.ndarray:
    """`size` independent exact discrete Gaussian samples (int64): P(X = x) proportional to
    exp(-x^2 / (2 sigma2)), sigma2 an exact positive rational (see `gaussian_sigma2_for_zcdp`)."""
    s2 = _positive_rational(sigma2, "discrete Gaussian sigma^2")
    size = _check_size(size)
    rng = _source(rng)
    p, q = s2.numerator, s2.denominator
    t = math.isqrt(p // q) + 1
    # int64 path: the squares (|y| q t - p)^2 stay below 2**62, and so do the radices
    # 2 p q t^2 * k of Algorithm 1's first steps (k >= 2); later steps, if any, of entries that
    # get that far fall back to Python ints one by one. (2 p q t^2 is about 2 sigma^4: this
    # covers sigma up to ~30,000.)
    if p < _MAX_VEC_PARAM and q * t < _MAX_VEC_PARAM and 2 * p * q * t * t * 2 < _WORD:
        return _dgauss_vec(p, q, size, rng)
    logger.debug("discrete Gaussian sigma^2 %s too large for int64: pure-Python sampling", s2)
    return np.array([_dgauss_py(p, q, rng) for _ in range(size)], dtype=np.int64)


def add_noise(counts: np.ndarray, mechanism: Mechanism, scale_or_sigma2: Fraction | int,
              rng: RandomSource | None = None) -> np.ndarray:
    """counts + independent exact noise per entry, as a new int64 array of the same shape.
    `scale_or_sigma2` is the discrete Laplace scale t or the discrete Gaussian's sigma^2."""
    arr = np.asarray(counts)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(
                arr == np.round(arr)):
            pass  # integral floats are accepted
        elif arr.size:
            raise TypeError(f"counts must be integers, got dtype {arr.dtype}")
    base = arr.astype(np.int64)
    if mechanism == "discrete_laplace":
        noise = discrete_laplace(scale_or_sigma2, base.size, rng)
    elif mechanism == "discrete_gaussian":
        noise = discrete_gaussian(scale_or_sigma2, base.size, rng)
    else:
        raise ValueError(f"unknown noise mechanism {mechanism!r}; expected 'discrete_laplace' "
                         "or 'discrete_gaussian'")
    return base + noise.reshape(base.shape)
