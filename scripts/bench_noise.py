#!/usr/bin/env python3
"""Time the exact DP noise of one window against the cost of building that window.

Usage: python scripts/bench_noise.py [--repeat N]

A window here is 50 features x 20 bins = 1000 counts, so it needs 1000 noise samples. Rows:

- discrete Laplace, scale t = 50 (epsilon = 1 split over 50 histograms), vectorized;
- discrete Gaussian, sigma^2 = 2500, vectorized;
- the same two through the pure-Python scalar samplers (the reference implementation);
- building the window from 1000 events with numpy (np.searchsorted + np.bincount over 50
  arrays of 1000 floats);
- building it with a pure-Python per-event loop (bisect per feature per event).

All noise rows use `SecureRandom` (os.urandom), the production source. Each row reports the
median over --repeat runs of one window's worth of work.
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import time
from collections.abc import Callable
from fractions import Fraction

import numpy as np

from agent.noise import (
    SecureRandom,
    discrete_gaussian,
    discrete_gaussian_scalar,
    discrete_laplace,
    discrete_laplace_scalar,
)

FEATURES = 50
BINS = 20
EVENTS = 1000
SAMPLES = FEATURES * BINS


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm up (lru caches, imports)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="runs per row (default 200)")
    args = parser.parse_args()

    rng = SecureRandom()
    data_rng = np.random.default_rng(0)
    edges = np.linspace(-3.0, 3.0, BINS - 1)  # 19 edges -> 20 bins (under/overflow included)
    edges_list = edges.tolist()
    columns = [data_rng.standard_normal(EVENTS) for _ in range(FEATURES)]
    events = [[float(c[i]) for c in columns] for i in range(EVENTS)]  # row-major, as observed

    def build_numpy() -> list[np.ndarray]:
        return [np.bincount(np.searchsorted(edges, col, side="right"), minlength=BINS)
                for col in columns]

    def build_python() -> list[list[int]]:
        counts = [[0] * BINS for _ in range(FEATURES)]
        for event in events:
            for f, value in enumerate(event):
                counts[f][bisect.bisect_right(edges_list, value)] += 1
        return counts

    # sanity: both builders agree
    assert all((a == np.array(b)).all() for a, b in zip(build_numpy(), build_python(),
                                                        strict=True))

    t_lap, s2 = Fraction(50), Fraction(2500)
    scalar_repeat = max(3, args.repeat // 40)
    rows = [
        ("window build, numpy (50 x searchsorted+bincount)", build_numpy, args.repeat),
        ("window build, pure-Python per-event bisect", build_python, scalar_repeat),
        ("discrete Laplace t=50, vectorized", lambda: discrete_laplace(t_lap, SAMPLES, rng),
         args.repeat),
        ("discrete Gaussian sigma^2=2500, vectorized",
         lambda: discrete_gaussian(s2, SAMPLES, rng), args.repeat),
        ("discrete Laplace t=50, pure-Python scalar",
         lambda: [discrete_laplace_scalar(t_lap, rng) for _ in range(SAMPLES)], scalar_repeat),
        ("discrete Gaussian sigma^2=2500, pure-Python scalar",
         lambda: [discrete_gaussian_scalar(s2, rng) for _ in range(SAMPLES)], scalar_repeat),
    ]
    results = [(name, median_seconds(fn, rep)) for name, fn, rep in rows]
    numpy_build = results[0][1]
    python_build = results[1][1]

    print(f"one window: {FEATURES} features x {BINS} bins = {SAMPLES} noise samples, "
          f"{EVENTS} events; median of runs")
    header = f"{'':52} {'ms/window':>10} {'/numpy build':>13} {'/python build':>14}"
    print(header)
    print("-" * len(header))
    for name, seconds in results:
        print(f"{name:52} {seconds * 1e3:10.3f} {seconds / numpy_build:13.2f} "
              f"{seconds / python_build:14.3f}")


if __name__ == "__main__":
    main()
