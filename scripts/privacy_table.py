#!/usr/bin/env python3
"""Tables for choosing epsilon: noise per report, noise floor of a cohort, smallest shift flagged.

Usage: python scripts/privacy_table.py [--markdown] [--json PATH] [options]

Every number is computed with fleetwatch's own code, nothing is typed in:

- Noise per report (event unit, one table row per epsilon per window and H private
  histograms): `agent.privacy.noise_plan` on a spec with H histograms gives the discrete
  Laplace scale b = H/epsilon per bin and its standard deviation
  sqrt(`discrete_laplace_variance(b)`); the discrete Gaussian's sd at the same epsilon (and
  --delta) is shown beside it.
- Cohort of D devices, each sending E events per window, looked at over W windows (the event
  unit, H = --cohort-histograms private histograms per report): the merged histograms cover
  T = D*E*W events and carry noise of variance D*W*V per bin (V = one report's variance per
  bin; variances of independent noise add). The feature is numeric with --bins equal-mass
  bins built from --reference-rows standard-normal values by `aggregator.baseline` (so its
  underflow, overflow and missing bins are empty, as `fleetwatch baseline build` makes them).
  * noise floor: the mean PSI under "no drift", from the aggregator's own
    `SignificanceCache` (the simulated null the health query uses, --null-samples draws per
    count/noise bucket; 400 is the aggregator's default); "insufficient" is
    `insufficient_data(floor)`: the floor is at least half the 0.1 threshold, so the cohort
    is never flagged;
  * analytic floor: `expected_null_psi` over the bins the reference saw (the never-seen bins
    are read as empty by `suppress_noise`, and over them the formula is far too high), shown
    only where it is valid: every such bin's sd sqrt(T r_i + noise variance) below 0.4 T r_i;
  * null q99: the 99th percentile of the simulated null PSI: a PSI below it cannot reach
    p < 0.01;
  * smallest detectable shift: the smallest mean shift d (in reference sd, on the grid
    --shift-step .. --shift-max) of the normal feature whose PSI exceeds both the 0.1
    threshold and the null q99, where the shift's PSI is that of N(d, 1)'s bin proportions
    against the reference (the PSI the shift itself causes, before sampling and noise add
    theirs): a shift this large is flagged whenever the cohort's PSI is at least its own.
    "-" when the cohort is insufficient (never flagged) or no shift up to --shift-max passes;
  * flagged (simulated): the smallest d whose simulated mean observed PSI (T events drawn
    from N(d, 1), plus the cohort's noise, after `suppress_noise`; --shift-samples draws per
    d) exceeds both: the shift flagged about half the time. Privacy noise adds to the
    observed PSI, so near the insufficient-data bar this is below the previous column.
- Device-day unit: the windows one device releases per UTC day under each daily budget, by
  running the device's own `PrivacyAccountant` (on an in-memory ledger) window after window,
  for the discrete Laplace (epsilons add) and the discrete Gaussian (zCDP rho adds).

Runtime with the defaults: under a second here (75 cohorts; the simulations are 400 null draws per
bucket and --shift-samples = 100 draws per shift, stopping at the first shift that passes).
The Markdown tables in docs/privacy.md are this script's `--markdown` output with the
defaults; tests/test_privacy_table.py regenerates them and compares.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from agent.privacy import DAY_S, PrivacyAccountant, noise_plan
from agent.spec import (
    DEVICE_DAY,
    DISCRETE_GAUSSIAN,
    DISCRETE_LAPLACE,
    NUMERIC,
    FeatureSpec,
    PrivacySpec,
    Spec,
)
from aggregator.baseline import bin_numeric, equal_mass_edges
from aggregator.drift import DriftScores, psi, suppress_noise
from aggregator.query import PSI_THRESHOLD
from aggregator.render import table
from aggregator.significance import (
    SignificanceCache,
    batch_psi,
    expected_null_psi,
    insufficient_data,
)

__all__ = ["BudgetRow", "CohortRow", "NoiseRow", "TableOptions", "Tables", "compute_tables", "main",
           "render_markdown", "render_text", "tables_json"]

_NAN = float("nan")
_VALID_SD_SHARE = 0.4  # expected_null_psi is within ~10% while every bin's sd < 0.4 T r_i


@dataclass(frozen=True)
class TableOptions:
    """What the tables cover (the defaults are the ones docs/privacy.md shows)."""

    epsilons: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    histograms: tuple[int, ...] = (5, 12, 50)
    devices: tuple[int, ...] = (5, 20, 50, 200, 1000)
    events: tuple[int, ...] = (10, 60, 600)
    windows: int = 15
    window_s: int = 60
    cohort_histograms: int = 12
    bins: int = 10
    reference_rows: int = 100_000
    delta: float = 1e-6
    daily_budgets: tuple[float, ...] = (1.0, 4.0, 16.0)
    null_samples: int = 400
    shift_samples: int = 100
    shift_step: float = 0.05
    shift_max: float = 2.0
    detail_epsilon: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epsilons", "histograms", "devices", "events", "daily_budgets"):
            values = tuple(getattr(self, name))
            if not values or any(not v > 0 for v in values):
                raise ValueError(f"{name}: need at least one value, all > 0")
            object.__setattr__(self, name, values)
        for name in ("windows", "window_s", "cohort_histograms", "reference_rows",
                     "null_samples", "shift_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.bins < 2:
            raise ValueError("bins must be at least 2")
        if not 0 < self.shift_step <= self.shift_max:
            raise ValueError("need 0 < shift_step <= shift_max")
        for eps in self.epsilons:  # SpecError (a ValueError) names a bad epsilon or delta
            PrivacySpec(epsilon_per_window=eps)
            PrivacySpec(mechanism=DISCRETE_GAUSSIAN, epsilon_per_window=eps, delta=self.delta)
        if self.detail_epsilon not in self.epsilons:
            raise ValueError(f"detail_epsilon {self.detail_epsilon} is not one of the epsilons")

    @property
    def shift_grid(self) -> np.ndarray:
        n = int(math.floor(self.shift_max / self.shift_step + 1e-9))
        return np.round(self.shift_step * np.arange(1, n + 1), 10)


@dataclass(frozen=True)
class NoiseRow:
    """One report's noise per bin at one epsilon per window and H private histograms."""

    epsilon: float
    histograms: int
    laplace_scale: Fraction  # b = H / epsilon (exact; laplace_scale rounds a float up)
    laplace_sd: float
    gaussian_sd: float  # discrete Gaussian at the same epsilon and TableOptions.delta


@dataclass(frozen=True)
class CohortRow:
    """A cohort of `devices` x `events_per_window` over the look-back, at one epsilon."""

    epsilon: float
    devices: int
    events_per_window: int
    events: int  # T: events the merged histograms cover
    noise_sd_per_bin: float  # merged noise sd in every bin
    noise_floor: float  # simulated mean null PSI (SignificanceCache)
    null_q99: float
    analytic_floor: float | None  # expected_null_psi where valid, else None
    insufficient: bool
    min_shift: float | None  # smallest d whose own PSI passes both bars; None: "-"
    flagged_shift: float | None  # smallest d whose simulated mean observed PSI passes both


@dataclass(frozen=True)
class BudgetRow:
    """Device-day: windows one device releases per UTC day before its budget is spent."""

    epsilon: float
    daily_budget: float
    laplace_windows: int | None  # None: the spec refuses a budget below epsilon
    gaussian_windows: int | None  # discrete Gaussian at TableOptions.delta (zCDP: rho adds)
    windows_per_day: int


@dataclass(frozen=True)
class Tables:
    options: TableOptions
    noise: tuple[NoiseRow, ...]
    cohorts: tuple[CohortRow, ...]
    budgets: tuple[BudgetRow, ...]
    reference: FeatureSpec = field(repr=False)
    seconds: float = 0.0

    def cohort(self, epsilon: float, devices: int, events_per_window: int) -> CohortRow:
        for row in self.cohorts:
            if (row.epsilon, row.devices, row.events_per_window) == (
                    epsilon, devices, events_per_window):
                return row
        raise KeyError((epsilon, devices, events_per_window))


# -- computation -----------------------------------------------------------------------------


def _spec(histograms: int, privacy: PrivacySpec) -> Spec:
    """A spec with `histograms` private histograms (the features' bins do not matter)."""
    features = tuple(FeatureSpec(f"f{i}", NUMERIC, edges=(0.0, 1.0)) for i in range(histograms))
    return Spec(model="privacy-table", model_version="1", features=features, privacy=privacy)


def _plan_variance(histograms: int, epsilon: float, mechanism: str = DISCRETE_LAPLACE,
                   delta: float = 0.0) -> tuple[Fraction, float]:
    plan = noise_plan(_spec(histograms, PrivacySpec(mechanism=mechanism,
                                                    epsilon_per_window=epsilon, delta=delta)))
    assert plan is not None
    return plan.scale, plan.variance_per_bin


def noise_rows(options: TableOptions) -> tuple[NoiseRow, ...]:
    rows = []
    for eps in options.epsilons:
        for h in options.histograms:
            scale, var = _plan_variance(h, eps)
            _, gvar = _plan_variance(h, eps, DISCRETE_GAUSSIAN, options.delta)
            rows.append(NoiseRow(eps, h, scale, math.sqrt(var), math.sqrt(gvar)))
    return tuple(rows)


def reference_feature(options: TableOptions) -> FeatureSpec:
    """A numeric feature as `fleetwatch baseline build` makes it from standard-normal data."""
    values = np.random.default_rng(options.seed).standard_normal(options.reference_rows)
    edges = equal_mass_edges(values, options.bins)
    counts = bin_numeric(edges, values)
    return FeatureSpec("x", NUMERIC, edges=tuple(edges.tolist()),
                       reference_counts=tuple(counts.tolist()))


def shifted_proportions(feature: FeatureSpec, shift: float) -> np.ndarray:
    """Bin probabilities of N(shift, 1) in the feature's layout (nothing missing)."""
    cdf = np.array([0.5 * math.erfc(-(e - shift) / math.sqrt(2.0)) for e in feature.edges])
    return np.concatenate(([cdf[0]], np.diff(cdf), [1.0 - cdf[-1], 0.0]))


def _analytic_floor(feature: FeatureSpec, count: int, variance: float,
                    reference_rows: int) -> float | None:
    ref = np.asarray(feature.reference_counts, dtype=np.float64)
    seen = ref[ref > 0] / ref.sum()
    if np.any(np.sqrt(count * seen + variance) >= _VALID_SD_SHARE * count * seen):
        return None
    return expected_null_psi(seen, count, variance, reference_rows)


def _flagged_shift(feature: FeatureSpec, count: int, variance: float, bar: float,
                   options: TableOptions, seed: Sequence[int]) -> float | None:
    rng = np.random.default_rng(list(seed))
    ref = np.asarray(feature.reference_counts, dtype=np.float64)
    for d in options.shift_grid:
        p = shifted_proportions(feature, float(d))
        cur = rng.multinomial(count, p / p.sum(), size=options.shift_samples).astype(np.float64)
        if variance > 0:  # the same rounded Gaussian noise the null simulation uses
            cur += np.rint(rng.normal(0.0, math.sqrt(variance), cur.shape))
        cur = suppress_noise(cur, variance, feature.reference_counts)
        scores = batch_psi(ref, cur)
        if np.all(np.isfinite(scores)) and float(scores.mean()) > bar:
            return float(d)
    return None


def cohort_rows(options: TableOptions, feature: FeatureSpec) -> tuple[CohortRow, ...]:
    cache = SignificanceCache(samples=options.null_samples, seed=options.seed)
    no_scores = DriftScores(0, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN)
    ref = np.asarray(feature.reference_counts, dtype=np.float64)
    own_psi = [psi(ref, shifted_proportions(feature, float(d))) for d in options.shift_grid]
    rows = []
    for k, eps in enumerate(options.epsilons):
        _, report_variance = _plan_variance(options.cohort_histograms, eps)
        for devices in options.devices:
            for per_window in options.events:
                count = devices * per_window * options.windows
                variance = devices * options.windows * report_variance
                sig = cache.significance(feature, no_scores, count, variance)
                floor, q99 = sig.expected_null_psi, sig.null_psi_q99
                insufficient = insufficient_data(floor, PSI_THRESHOLD)
                bar = max(PSI_THRESHOLD, q99)
                min_shift = flagged = None
                if not insufficient:
                    min_shift = next((float(d) for d, s in zip(options.shift_grid, own_psi,
                                                               strict=True) if s > bar), None)
                    flagged = _flagged_shift(feature, count, variance, bar, options,
                                             (options.seed, k, devices, per_window))
                rows.append(CohortRow(
                    epsilon=eps, devices=devices, events_per_window=per_window, events=count,
                    noise_sd_per_bin=math.sqrt(variance), noise_floor=floor, null_q99=q99,
                    analytic_floor=_analytic_floor(feature, count, variance,
                                                   options.reference_rows),
                    insufficient=insufficient, min_shift=min_shift, flagged_shift=flagged))
    return tuple(rows)


class _Ledger:
    """The two spool methods `PrivacyAccountant` calls, in memory."""

    def __init__(self) -> None:
        self.spent: dict[int, tuple[float, float]] = {}

    def ledger_record(self, window_start: int, day: int, epsilon: float, rho: float,
                      released: bool) -> None:
        pass

    def ledger_try_spend(self, window_start: int, day: int, epsilon: float, rho: float,
                         affordable: Callable[[float, float], bool]
                         ) -> tuple[bool, float, float]:
        eps_sum, rho_sum = self.spent.get(day, (0.0, 0.0))
        allowed = affordable(eps_sum, rho_sum)
        if allowed:
            eps_sum, rho_sum = eps_sum + epsilon, rho_sum + rho
            self.spent[day] = (eps_sum, rho_sum)
        return allowed, eps_sum, rho_sum


def _released_windows(privacy: PrivacySpec, window_s: int) -> int:
    """Windows of one UTC day the device's accountant releases (one device, every window)."""
    spec = _spec(1, privacy)
    plan = noise_plan(spec)
    assert plan is not None
    accountant = PrivacyAccountant(_Ledger(), spec, plan)  # type: ignore[arg-type]
    released = 0
    for start in range(0, DAY_S, window_s):
        if not accountant.reserve(start).allowed:
            break
        released += 1
    return released


def budget_rows(options: TableOptions) -> tuple[BudgetRow, ...]:
    rows = []
    per_day = -(-DAY_S // options.window_s)
    for eps in options.epsilons:
        for budget in options.daily_budgets:
            lap = gauss = None
            if budget >= eps:
                common = {"unit": DEVICE_DAY, "epsilon_per_window": eps,
                          "daily_epsilon_budget": budget, "max_events_per_window": 1}
                lap = _released_windows(PrivacySpec(**common), options.window_s)
                gauss = _released_windows(PrivacySpec(mechanism=DISCRETE_GAUSSIAN,
                                                      delta=options.delta, **common),
                                          options.window_s)
            rows.append(BudgetRow(eps, budget, lap, gauss, per_day))
    return tuple(rows)


def compute_tables(options: TableOptions | None = None) -> Tables:
    """Every table's numbers (see the module docstring for the definitions)."""
    options = options or TableOptions()
    t0 = time.perf_counter()
    feature = reference_feature(options)
    noise = noise_rows(options)
    cohorts = cohort_rows(options, feature)
    budgets = budget_rows(options)
    return Tables(options, noise, cohorts, budgets, feature, time.perf_counter() - t0)


# -- rendering -------------------------------------------------------------------------------


def _g(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return format(x, spec)


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def _eps(x: float) -> str:
    """Short form of a parameter: 0.25, 1, 1e-6."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", format(x, "g")).replace("e+", "e")


@dataclass(frozen=True)
class _Table:
    title: str
    note: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]  # right-align in Markdown


def _tables(t: Tables) -> list[_Table]:
    o = t.options
    look_back = f"{o.windows} windows of {o.window_s} s"
    out = [_Table(
        "Table 1. Noise per report, event unit",
        "Every bin of every private histogram of one window report gets independent noise: "
        "discrete Laplace of scale b = H/epsilon (H = features + prediction + label "
        "histograms), or the discrete "
        f"Gaussian at the same epsilon and delta = {_eps(o.delta)}. sd = standard deviation "
        "in counts.",
        ("epsilon per window", "H histograms", "b (Laplace scale)", "Laplace sd per bin",
         f"Gaussian sd per bin (delta {_eps(o.delta)})"),
        tuple((_eps(r.epsilon), str(r.histograms), _g(float(r.laplace_scale), ".4g"),
               _g(r.laplace_sd, ".4g"), _g(r.gaussian_sd, ".4g")) for r in t.noise),
        (True,) * 5)]

    eps_cols = tuple(f"epsilon {_eps(e)}" for e in o.epsilons)
    keys = [(d, e) for d in o.devices for e in o.events]

    def matrix(cell: Any) -> tuple[tuple[str, ...], ...]:
        return tuple((str(d), str(e), str(d * e * o.windows))
                     + tuple(cell(t.cohort(eps, d, e)) for eps in o.epsilons)
                     for d, e in keys)

    common = (f"D devices each sending E events per window, over a look-back of {look_back} "
              f"(T = D*E*{o.windows} events); event unit, discrete Laplace, "
              f"H = {o.cohort_histograms} private histograms; a numeric feature with {o.bins} "
              f"equal-mass bins from {o.reference_rows} reference rows.")
    out.append(_Table(
        "Table 2. Noise floor: expected PSI when nothing drifted",
        common + f" Simulated mean null PSI ({o.null_samples} draws, the aggregator's "
        "SignificanceCache); \"(insufficient)\": the floor is at least half the 0.1 threshold, "
        "the cohort reports insufficient data and is never flagged.",
        ("D", "E", "T") + eps_cols,
        matrix(lambda r: _g(r.noise_floor) + (" (insufficient)" if r.insufficient else "")),
        (True,) * (3 + len(eps_cols))))
    out.append(_Table(
        "Table 3. Smallest detectable shift, in reference standard deviations",
        common + " The smallest mean shift of the normal feature (grid "
        f"{_eps(o.shift_step)}..{_eps(o.shift_max)}) whose own PSI exceeds both 0.1 and the "
        "null's 99th percentile; \"-\": insufficient data, or no shift up to "
        f"{_eps(o.shift_max)} sd.",
        ("D", "E", "T") + eps_cols,
        matrix(lambda r: _g(r.min_shift, "g")),
        (True,) * (3 + len(eps_cols))))
    detail = [r for r in t.cohorts if r.epsilon == o.detail_epsilon]
    out.append(_Table(
        f"Table 4. Detail at epsilon {_eps(o.detail_epsilon)} per window",
        "noise sd: merged over the cohort's reports; floor (sim.): Table 2; floor (analytic): "
        "expected_null_psi over the bins the reference saw, \"-\" where its approximation is "
        "not valid; q99: the null PSI's 99th percentile (a lower PSI cannot reach p < "
        "0.01; the flag itself asks p < 1e-5/H, a higher bar); shift: Table 3; flagged "
        "(sim.): the smallest shift whose simulated mean "
        f"observed PSI ({o.shift_samples} draws, noise included) exceeds both bars.",
        ("D", "E", "T", "noise sd per bin", "floor (sim.)", "floor (analytic)", "q99",
         "insufficient", "shift", "flagged (sim.)"),
        tuple((str(r.devices), str(r.events_per_window), str(r.events),
               _g(r.noise_sd_per_bin, ".4g"), _g(r.noise_floor), _g(r.analytic_floor),
               _g(r.null_q99), "yes" if r.insufficient else "no", _g(r.min_shift, "g"),
               _g(r.flagged_shift, "g")) for r in detail),
        (True,) * 7 + (False, True, True)))
    budget_cols = tuple(f"budget {_eps(b)}" for b in o.daily_budgets)
    out.append(_Table(
        "Table 5. Device-day unit: windows released per UTC day",
        f"Windows of {o.window_s} s one device releases in a UTC day before its daily budget "
        f"is spent ({-(-DAY_S // o.window_s)} windows in a day), by the device's own "
        "PrivacyAccountant: \"Laplace\" composes by adding epsilons, \"Gaussian\" by adding "
        f"zCDP rho (delta {_eps(o.delta)}); later windows are withheld. \"-\": the spec "
        "refuses a daily budget below epsilon per window.",
        ("epsilon per window",) + tuple(f"{c}, {m}" for c in budget_cols
                                        for m in ("Laplace", "Gaussian")),
        tuple((_eps(eps),) + tuple(cell for r in t.budgets if r.epsilon == eps
                                   for cell in (_count(r.laplace_windows),
                                                _count(r.gaussian_windows)))
              for eps in o.epsilons),
        (True,) * (1 + 2 * len(budget_cols))))
    return out


def render_markdown(t: Tables) -> str:
    """The tables as Markdown (what docs/privacy.md shows)."""
    parts = []
    for tab in _tables(t):
        align = "|" + "|".join("---:" if n else "---" for n in tab.numeric) + "|"
        lines = [f"**{tab.title}.** {tab.note}", "",
                 "| " + " | ".join(tab.headers) + " |", align]
        lines += ["| " + " | ".join(row) + " |" for row in tab.rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def render_text(t: Tables) -> str:
    """The tables as aligned plain text."""
    return "\n\n".join(f"{tab.title}\n{textwrap.fill(tab.note, 100)}\n\n"
                       f"{table(tab.headers, tab.rows)}" for tab in _tables(t)) + "\n"


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Fraction):
        return float(x)
    return x


def tables_json(t: Tables) -> dict[str, Any]:
    """Everything as plain JSON values (non-finite numbers as null)."""
    def row(r: Any) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(r).items()}
    return {
        "options": {k: list(v) if isinstance(v, tuple) else v
                    for k, v in asdict(t.options).items()},
        "reference": {"edges": list(t.reference.edges),
                      "reference_counts": list(t.reference.reference_counts)},
        "noise_per_report": [row(r) for r in t.noise],
        "cohorts": [row(r) for r in t.cohorts],
        "device_day_budgets": [row(r) for r in t.budgets],
    }


# -- command line ----------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def _csv(values: Sequence[float]) -> str:
    return ",".join(_eps(v) for v in values)


def build_parser() -> argparse.ArgumentParser:
    d = TableOptions()
    parser = argparse.ArgumentParser(
        prog="privacy_table.py",
        description="Tables for choosing the privacy budget epsilon: the noise each report "
        "gets, the noise floor of the drift score (expected PSI with no drift) for cohorts of "
        "various sizes, whether a cohort is 'insufficient data', and the smallest mean shift "
        "of a normal feature that would be flagged. All numbers are computed with "
        "fleetwatch's own noise plan and significance code; docs/privacy.md explains them.",
        epilog="Examples: `python scripts/privacy_table.py --markdown` prints the tables of "
        "docs/privacy.md; `python scripts/privacy_table.py --epsilons 0.5,1 --devices 10,100 "
        "--windows 60 --json out.json` sizes a one-hour look-back.")
    out = parser.add_argument_group("output")
    out.add_argument("--markdown", action="store_true",
                     help="print Markdown tables instead of aligned text")
    out.add_argument("--json", metavar="PATH",
                     help="also write every number as JSON to PATH ('-': to stdout, instead "
                     "of the tables)")
    g = parser.add_argument_group("what the tables cover")
    g.add_argument("--epsilons", type=_floats, default=_csv(d.epsilons), metavar="E,...",
                   help="epsilon per window, all private histograms of a report together "
                   "(default: %(default)s)")
    g.add_argument("--histograms", type=_ints, default=_csv(d.histograms), metavar="H,...",
                   help="Table 1: private histograms per report, features + prediction "
                   "(default: %(default)s)")
    g.add_argument("--cohort-histograms", type=int, default=d.cohort_histograms, metavar="H",
                   help="Tables 2-4: private histograms per report (default: %(default)s)")
    g.add_argument("--devices", type=_ints, default=_csv(d.devices), metavar="D,...",
                   help="devices in the cohort (default: %(default)s)")
    g.add_argument("--events", type=_ints, default=_csv(d.events), metavar="E,...",
                   help="events (predictions) per device per window (default: %(default)s)")
    g.add_argument("--windows", type=int, default=d.windows, metavar="W",
                   help="windows in the look-back; `fleetwatch health --since 1h` with 60 s "
                   "windows is 60 (default: %(default)s)")
    g.add_argument("--window-s", type=int, default=d.window_s, metavar="S",
                   help="window length in seconds, only to label the tables "
                   "(default: %(default)s)")
    g.add_argument("--bins", type=int, default=d.bins,
                   help="equal-mass bins of the numeric feature, as `baseline build --bins` "
                   "(default: %(default)s)")
    g.add_argument("--reference-rows", type=int, default=d.reference_rows, metavar="N",
                   help="rows of reference data the bins come from (default: %(default)s)")
    g.add_argument("--delta", type=float, default=d.delta,
                   help="delta of Table 1's discrete Gaussian column (default: %(default)s)")
    g.add_argument("--daily-budgets", type=_floats, default=_csv(d.daily_budgets),
                   metavar="B,...", help="Table 5: device-day daily epsilon budgets "
                   "(default: %(default)s)")
    g.add_argument("--detail-epsilon", type=float, default=d.detail_epsilon, metavar="E",
                   help="the epsilon of Table 4, one of --epsilons (default: %(default)s)")
    s = parser.add_argument_group("simulation")
    s.add_argument("--null-samples", type=int, default=d.null_samples, metavar="S",
                   help="null draws per count/noise bucket; the aggregator uses 400 "
                   "(default: %(default)s)")
    s.add_argument("--shift-samples", type=int, default=d.shift_samples, metavar="S",
                   help="draws per shift for Table 4's 'flagged (sim.)' (default: %(default)s)")
    s.add_argument("--shift-step", type=float, default=d.shift_step, metavar="SD",
                   help="grid step of the shift search, in reference sd (default: %(default)s)")
    s.add_argument("--shift-max", type=float, default=d.shift_max, metavar="SD",
                   help="largest shift searched, in reference sd (default: %(default)s)")
    s.add_argument("--seed", type=int, default=d.seed,
                   help="seed of every simulation (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        options = TableOptions(
            epsilons=ns.epsilons, histograms=ns.histograms, devices=ns.devices,
            events=ns.events, windows=ns.windows, window_s=ns.window_s,
            cohort_histograms=ns.cohort_histograms, bins=ns.bins,
            reference_rows=ns.reference_rows, delta=ns.delta,
            daily_budgets=ns.daily_budgets, null_samples=ns.null_samples,
            shift_samples=ns.shift_samples, shift_step=ns.shift_step, shift_max=ns.shift_max,
            detail_epsilon=ns.detail_epsilon, seed=ns.seed)
    except ValueError as e:
        parser.error(str(e))
    tables = compute_tables(options)
    if ns.json:
        text = json.dumps(tables_json(tables), indent=1, allow_nan=False) + "\n"
        if ns.json == "-":
            sys.stdout.write(text)
        else:
            pathlib.Path(ns.json).write_text(text)
    if ns.json != "-":
        sys.stdout.write(render_markdown(tables) if ns.markdown else render_text(tables))
    print(f"computed in {tables.seconds:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
