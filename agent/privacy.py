"""Differential privacy on the device: the noise each window's private histograms get, the
contribution bound, and the accountant that enforces the budget.

Which histograms are private: every feature histogram and the prediction histogram (one event
touches each of them exactly once), and the label histograms of the spec's task (confusion,
calibration, label latency for classifiers; residuals, label latency for regression: one
label adds at most one count to each, in the window the label arrives in). Event counts,
error counts, label counts (joined, unmatched, evicted) and the latency sketch are
operational signals and are released without noise (the privacy contract in docs/privacy.md).

Sensitivity and the noise scale (H private histograms, epsilon per window):

- unit "event": one event adds one count to each of the H histograms. Splitting the window's
  epsilon equally, each histogram gets epsilon/H, so discrete Laplace of scale H/epsilon per
  bin; for the discrete Gaussian the L2 sensitivity over all H is sqrt(H), sigma^2 = H/(2 rho)
  with rho the zCDP parameter that gives (epsilon, delta). Windows hold disjoint events, so
  the loss per event is epsilon, however many windows there are (parallel composition).
  H counts the label histograms too: an event whose label arrives in a later window spends
  (histograms it touched there)/H of epsilon in each window, epsilon in total (for the
  Gaussian, the rhos of the two windows add up to rho likewise).
- unit "device-day": a device's events per window are clamped to M (the excess sampled out
  uniformly), so a device changes each histogram by at most M: Laplace scale H*M/epsilon,
  Gaussian sigma^2 = H*M^2/(2 rho). Windows of one day compose: basic composition (epsilons
  add) for Laplace, zCDP (rhos add) for the Gaussian, against the spec's daily budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from agent import noise
from agent.spec import DEVICE_DAY, DISCRETE_GAUSSIAN, DISCRETE_LAPLACE, Spec
from agent.summary import Summary

if TYPE_CHECKING:  # the aggregator imports this module for noise_plan, never the spool
    from agent.spool import Spool


__all__ = ["NoisePlan", "PrivacyAccountant", "Release", "clamp_summary", "noise_plan",
           "noise_summary"]

logger = logging.getLogger(__name__)

DAY_S = 86400
_SLACK = 1e-9  # float tolerance when comparing spend to budget


@dataclass(frozen=True)
class NoisePlan:
    """The noise every bin of every private histogram of one window gets."""

    mechanism: str
    scale: Fraction            # discrete Laplace scale t, or the discrete Gaussian's sigma^2
    variance_per_bin: float
    epsilon_per_window: float
    rho_per_window: float      # zCDP parameter (discrete Gaussian), 0 for Laplace
    histograms: int
    sensitivity: int           # events one unit can add to one histogram in one window


_PLANS: dict[str, NoisePlan | None] = {}
_MAX_PLANS = 256


def noise_plan(spec: Spec) -> NoisePlan | None:
    """The spec's noise, or None when it asks for none. Computed once per spec hash: the agent
    asks per window and the aggregator per report."""
    key = spec.hash
    if key not in _PLANS:
        if len(_PLANS) >= _MAX_PLANS:  # specs are few; a bound keeps a long-lived process flat
            _PLANS.clear()
        _PLANS[key] = _noise_plan(spec)
    return _PLANS[key]


def _noise_plan(spec: Spec) -> NoisePlan | None:
    p = spec.privacy
    if not p.noisy:
        return None
    h = max(1, spec.private_histograms)
    m = p.max_events_per_window if p.unit == DEVICE_DAY else 1
    if p.mechanism == DISCRETE_LAPLACE:
        scale = noise.laplace_scale(h * m, p.epsilon_per_window)
        return NoisePlan(DISCRETE_LAPLACE, scale, noise.discrete_laplace_variance(scale),
                         p.epsilon_per_window, 0.0, h, m)
    assert p.mechanism == DISCRETE_GAUSSIAN
    rho = noise.zcdp_rho_for(p.epsilon_per_window, p.delta)
    sigma2 = noise.gaussian_sigma2_for_zcdp(h * m * m, rho)
    return NoisePlan(DISCRETE_GAUSSIAN, sigma2, noise.discrete_gaussian_variance(sigma2),
                     p.epsilon_per_window, rho, h, m)


def noise_summary(summary: Summary, plan: NoisePlan, rng: noise.RandomSource) -> None:
    """Add independent noise to every bin of every private histogram, in place."""
    names = list(summary.features)
    parts = [summary.features[n] for n in names]
    if summary.prediction is not None:
        parts.append(summary.prediction)
    labels = summary.label_histograms()
    parts.extend(labels.values())
    if not parts:
        return
    flat = np.concatenate(parts)
    noisy = noise.add_noise(flat, plan.mechanism, plan.scale, rng)
    offset = 0
    for n in names:
        k = summary.features[n].shape[0]
        summary.features[n] = noisy[offset:offset + k]
        offset += k
    if summary.prediction is not None:
        k = summary.prediction.shape[0]
        summary.prediction = noisy[offset:offset + k]
        offset += k
    for n, counts in labels.items():
        k = counts.shape[0]
        setattr(summary, n, noisy[offset:offset + k])
        offset += k
    summary.noise_variance_per_bin = plan.variance_per_bin


def clamp_summary(summary: Summary, max_events: int, rng: np.random.Generator) -> int:
    """Keep at most `max_events` events in every histogram, sampled uniformly without
    replacement (each histogram's marginal is exactly that of a uniform subsample), and at
    most `max_events` labels in every label histogram likewise (`clamped_label_count`).
    Returns the number of events sampled out."""
    _clamp_labels(summary, max_events, rng)
    excess = summary.event_count - max_events
    if excess <= 0:
        return 0
    for n, counts in summary.features.items():
        summary.features[n] = _subsample(counts, max_events, rng)
    if summary.prediction is not None:
        summary.prediction = _subsample(summary.prediction, max_events, rng)
    summary.clamped_event_count = excess
    return excess


def _clamp_labels(summary: Summary, max_labels: int, rng: np.random.Generator) -> None:
    labeled = summary.labeled_count
    excess = labeled - max_labels
    if excess <= 0:
        return
    for n, counts in summary.label_histograms().items():
        total = int(counts.sum())
        keep = max_labels
        if total < labeled:
            # Calibration counts only the labels that had a score: of a uniform subsample of
            # max_labels labels, a hypergeometric number of them.
            keep = int(rng.hypergeometric(total, labeled - total, max_labels))
        setattr(summary, n, _subsample(counts, keep, rng))
    summary.clamped_label_count = excess


def _subsample(counts: np.ndarray, keep: int, rng: np.random.Generator) -> np.ndarray:
    total = int(counts.sum())
    if total <= keep:
        return counts
    return rng.multivariate_hypergeometric(counts.astype(np.int64), keep).astype(np.int64)


@dataclass(frozen=True)
class Release:
    allowed: bool
    epsilon: float          # the loss of this release (0 when withheld)
    day_epsilon: float      # device-day: the day's spend after this window


class PrivacyAccountant:
    """Records every release in the spool's ledger (so a restart cannot reset it) and refuses
    the ones a device-day budget cannot afford."""

    def __init__(self, spool: Spool, spec: Spec, plan: NoisePlan) -> None:
        self.spool = spool
        self.privacy = spec.privacy
        self.plan = plan

    def _day_epsilon(self, eps_sum: float, rho_sum: float) -> float:
        if self.plan.mechanism == DISCRETE_GAUSSIAN:
            return noise.zcdp_to_epsilon(rho_sum, self.privacy.delta) if rho_sum else 0.0
        return eps_sum

    def reserve(self, window_start: int) -> Release:
        """Decide and record the release of one window (before its noise is drawn)."""
        day = window_start // DAY_S
        eps, rho = self.plan.epsilon_per_window, self.plan.rho_per_window
        if self.privacy.unit != DEVICE_DAY:
            self.spool.ledger_record(window_start, day, eps, rho, released=True)
            return Release(True, eps, 0.0)
        budget_eps = self.privacy.daily_epsilon_budget
        budget_rho = (noise.zcdp_rho_for(budget_eps, self.privacy.delta)
                      if self.plan.mechanism == DISCRETE_GAUSSIAN else 0.0)

        def affordable(eps_sum: float, rho_sum: float) -> bool:
            if self.plan.mechanism == DISCRETE_GAUSSIAN:
                return rho_sum + rho <= budget_rho * (1 + _SLACK)
            return eps_sum + eps <= budget_eps * (1 + _SLACK)

        allowed, eps_sum, rho_sum = self.spool.ledger_try_spend(window_start, day, eps, rho,
                                                               affordable)
        day_eps = self._day_epsilon(eps_sum, rho_sum)
        if not allowed:
            logger.info("privacy budget for day %d spent (%.3g of %.3g): window %d withheld",
                        day, day_eps, budget_eps, window_start)
            return Release(False, 0.0, day_eps)
        return Release(True, eps, day_eps)

    def day_spend(self, day: int) -> float:
        eps_sum, rho_sum = self.spool.ledger_day(day)
        return self._day_epsilon(eps_sum, rho_sum)

    def per_event_epsilon(self) -> float:
        """unit "event": the largest loss any one event has had (windows are disjoint, so it
        is the largest single window's epsilon, not the sum)."""
        return self.spool.ledger_max_epsilon()


