"""scripts/privacy_table.py: its numbers are consistent, and docs/privacy.md shows them.

The script's simulations are seeded, so every number is deterministic; the monotonicity checks
compare cohorts whose noise floors differ by a factor of 2.5 or more (the simulated means have
a relative standard error of a few percent at these sample counts).
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys
import time
from fractions import Fraction

import pytest

from agent.noise import discrete_laplace_variance, gaussian_sigma2_for_zcdp, zcdp_rho_for
from aggregator.drift import psi
from aggregator.significance import insufficient_data

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "privacy.md"
BEGIN = "<!-- privacy_table.py --markdown: begin -->"
END = "<!-- privacy_table.py --markdown: end -->"


def _load_script():
    spec = importlib.util.spec_from_file_location("privacy_table",
                                                  ROOT / "scripts" / "privacy_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pt = _load_script()

TINY = pt.TableOptions(epsilons=(0.5, 1.0, 4.0), histograms=(5, 12), devices=(5, 50, 1000),
                       events=(10, 60), windows=15, daily_budgets=(1.0, 4.0), null_samples=200,
                       shift_samples=50, detail_epsilon=1.0)


@pytest.fixture(scope="module")
def tiny():
    return pt.compute_tables(TINY)


def _shift(row) -> float:
    return math.inf if row.min_shift is None else row.min_shift


def test_noise_scale_is_histograms_over_epsilon(tiny) -> None:
    assert len(tiny.noise) == len(TINY.epsilons) * len(TINY.histograms)
    for r in tiny.noise:
        assert r.laplace_scale == Fraction(r.histograms) / Fraction(r.epsilon)
        assert r.laplace_sd == pytest.approx(math.sqrt(discrete_laplace_variance(r.laplace_scale)),
                                             rel=1e-12)
        # sd -> sqrt(2) b for a large scale; never above it
        assert r.laplace_sd <= math.sqrt(2) * float(r.laplace_scale)
        sigma2 = gaussian_sigma2_for_zcdp(r.histograms, zcdp_rho_for(r.epsilon, TINY.delta))
        assert r.gaussian_sd == pytest.approx(math.sqrt(float(sigma2)), rel=1e-6)


def test_cohort_counts_and_noise(tiny) -> None:
    for r in tiny.cohorts:
        assert r.events == r.devices * r.events_per_window * TINY.windows
        b = Fraction(TINY.cohort_histograms) / Fraction(r.epsilon)
        variance = r.devices * TINY.windows * discrete_laplace_variance(b)
        assert r.noise_sd_per_bin == pytest.approx(math.sqrt(variance), rel=1e-12)
        assert r.insufficient == insufficient_data(r.noise_floor)
        assert r.null_q99 > r.noise_floor


def test_noise_floor_falls_with_data_and_rises_as_epsilon_shrinks(tiny) -> None:
    o = TINY
    for eps in o.epsilons:
        for e in o.events:  # more devices
            floors = [tiny.cohort(eps, d, e).noise_floor for d in o.devices]
            assert floors == sorted(floors, reverse=True) and len(set(floors)) == len(floors)
        for d in o.devices:  # more events per device
            floors = [tiny.cohort(eps, d, e).noise_floor for e in o.events]
            assert floors == sorted(floors, reverse=True) and len(set(floors)) == len(floors)
    for d in o.devices:
        for e in o.events:  # smaller epsilon, more noise
            floors = [tiny.cohort(eps, d, e).noise_floor for eps in sorted(o.epsilons)]
            assert floors == sorted(floors, reverse=True) and len(set(floors)) == len(floors)


def test_analytic_floor_matches_simulation_where_valid(tiny) -> None:
    valid = [r for r in tiny.cohorts if r.analytic_floor is not None]
    assert valid
    for r in valid:
        # The simulation runs at the cache's bucket value (T and 1 + V within ~7.5%) and the
        # approximation is second order: within 35% where the script calls it valid.
        assert r.analytic_floor == pytest.approx(r.noise_floor, rel=0.35)


def test_smallest_detectable_shift(tiny) -> None:
    o = TINY
    feature = tiny.reference
    ref = list(feature.reference_counts)
    grid = list(o.shift_grid)
    for r in tiny.cohorts:
        assert (r.min_shift is None) == r.insufficient  # every sufficient cohort finds one
        if r.min_shift is None:
            assert r.flagged_shift is None
            continue
        bar = max(0.1, r.null_q99)
        assert psi(ref, pt.shifted_proportions(feature, r.min_shift)) > bar
        i = grid.index(r.min_shift)
        if i:
            assert psi(ref, pt.shifted_proportions(feature, grid[i - 1])) <= bar
        # noise and sampling only add PSI, so the simulated flag fires no later
        assert r.flagged_shift is not None and r.flagged_shift <= r.min_shift
    strict_data = strict_eps = False
    for eps in o.epsilons:
        for e in o.events:  # shrinks (or stays) with more devices
            shifts = [_shift(tiny.cohort(eps, d, e)) for d in o.devices]
            assert shifts == sorted(shifts, reverse=True)
            strict_data |= shifts[0] > shifts[-1]
        for d in o.devices:  # and with more events per device
            shifts = [_shift(tiny.cohort(eps, d, e)) for e in o.events]
            assert shifts == sorted(shifts, reverse=True)
    for d in o.devices:
        for e in o.events:  # grows (or stays) as epsilon shrinks
            shifts = [_shift(tiny.cohort(eps, d, e)) for eps in sorted(o.epsilons)]
            assert shifts == sorted(shifts, reverse=True)
            strict_eps |= shifts[0] > shifts[-1]
    assert strict_data and strict_eps


def test_device_day_windows_per_day(tiny) -> None:
    for r in tiny.budgets:
        assert r.windows_per_day == 1440
        if r.daily_budget < r.epsilon:
            assert r.laplace_windows is None and r.gaussian_windows is None
            continue
        assert r.laplace_windows == math.floor(r.daily_budget / r.epsilon + 1e-9)
        rho_w = zcdp_rho_for(r.epsilon, TINY.delta)
        rho_day = zcdp_rho_for(r.daily_budget, TINY.delta)
        assert r.gaussian_windows == min(1440, math.floor(rho_day / rho_w * (1 + 1e-9)))
        assert r.gaussian_windows >= r.laplace_windows


def test_doc_shows_the_current_tables() -> None:
    text = DOC.read_text()
    assert "python scripts/privacy_table.py --markdown" in text
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    shown = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    t0 = time.perf_counter()
    tables = pt.compute_tables()  # the doc's size: about a second
    assert time.perf_counter() - t0 < 20
    current = pt.render_markdown(tables).strip()
    assert shown == current, (
        "docs/privacy.md's tables are stale: paste the output of "
        "`python scripts/privacy_table.py --markdown` between its begin/end markers")
    # the first table's numbers are the noise plan's, whatever happens to the rest
    first = shown.split("\n\n")[1].splitlines()[2:]  # caption, table, ...; rows
    assert len(first) == len(tables.noise)
    for line, r in zip(first, tables.noise, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[0]) == r.epsilon and int(cells[1]) == r.histograms
        assert Fraction(cells[2]) == r.laplace_scale


def test_command_line(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tables.json"
    args = ["--epsilons", "1", "--histograms", "12", "--devices", "20", "--events", "60",
            "--daily-budgets", "4", "--null-samples", "50", "--shift-samples", "20"]
    assert pt.main(args + ["--markdown", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "**Table 1." in printed and "| 1 | 12 | 12 |" in printed
    data = json.loads(out.read_text())
    assert data["noise_per_report"][0]["laplace_scale"] == 12.0
    [cohort] = data["cohorts"]
    assert cohort["events"] == 20 * 60 * 15
    assert pt.main(args) == 0
    assert "Table 5. Device-day unit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pt.main(["--epsilons", "0"])
    with pytest.raises(SystemExit):
        pt.main(["--detail-epsilon", "3"])
