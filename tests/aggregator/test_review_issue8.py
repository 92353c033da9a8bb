"""Review of issue #8's regional tier and replica code: bugs found, each proven by a test.

Each xfail(strict=True) test fails on the code as reviewed and passes once the bug is fixed
(then drop its marker). No mocks: the real validator, Ingestor and SqliteStore; the replica
lease is test_alert_replicas' in-process `Lease` (the PostgreSQL advisory lock is in
tests/postgres/test_review_issue8_postgres.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from test_alert_evaluator import Clock, end, make_spec
from test_alert_replicas import Lease, Replica

from agent.errors import ValidationError
from agent.privacy import noise_plan
from agent.spec import PrivacySpec, Spec
from agent.window import WindowAccumulator
from agent.wire import summary_to_proto
from aggregator.validate import validate_forwarded
from protos import fleetwatch_pb2 as pb

W = 60


def noisy_spec() -> Spec:
    """test_alert_evaluator's spec with discrete Laplace noise (epsilon 1 per window)."""
    base = make_spec()
    return Spec(model=base.model, model_version=base.model_version, features=base.features,
                prediction=base.prediction, latency_reference_kll=base.latency_reference_kll,
                window_length_s=W, reference_rows=base.reference_rows,
                privacy=PrivacySpec(epsilon_per_window=1.0))


def window_ws() -> int:
    return int(time.time()) // W * W - 5 * W


def exact_merged(spec: Spec, ws: int, n: int = 100) -> pb.Summary:
    """The exact (noise-free) summary of n events: what no device of a noisy spec releases."""
    acc = WindowAccumulator(spec, ws)
    acc.observe_batch({"x": np.full(n, 0.5)}, np.full(n, 0.25), np.full(n, 20.0),
                      np.zeros(n, bool), n)
    merged = summary_to_proto(acc.to_summary())
    merged.histogram_event_count = n
    return merged


def forwarded(spec: Spec, ws: int, merged: pb.Summary, devices: tuple[str, ...],
              sender: str = "region-a", seq: int = 1) -> pb.WindowReport:
    return pb.WindowReport(
        device_id=sender, model=spec.model, model_version=spec.model_version,
        labels={"region": "a"}, window_start_unix_s=ws, window_length_s=W, seq=seq,
        spec_hash=spec.hash, created_unix_ms=int(time.time() * 1000), merged=merged,
        contributions=[pb.Contribution(device_id=d, reports=1) for d in devices])


def _plan_variance(spec: Spec) -> float:
    plan = noise_plan(spec)
    assert plan is not None
    return plan.variance_per_bin


def test_a_consistent_noisy_forwarded_report_is_accepted() -> None:
    """Control for the test below: two released noisy reports, the variance they carry."""
    spec = noisy_spec()
    ws = window_ws()
    merged = exact_merged(spec, ws)
    merged.report_count = 2
    merged.noise_variance_per_bin = 2 * _plan_variance(spec)
    _, summary, contributions = validate_forwarded(
        forwarded(spec, ws, merged, ("cam-1", "cam-2")), spec)
    assert summary.noise_variance_per_bin == pytest.approx(2 * _plan_variance(spec))
    assert [c.device_id for c in contributions] == ["cam-1", "cam-2"]


def test_heartbeat_only_forwarded_report_cannot_carry_noise_free_histograms() -> None:
    """A sender claims every merged report was a heartbeat (released = 0), so the variance it
    must declare is 0 and the noisy bound becomes 0.0 (not None: no sum check either) --
    yet `merged` carries 100 events of exact histograms. A heartbeat has no events: the central
    must refuse it, or it stores exact counts as noise-free DP data (significance tests trust
    the variance 0; the spec promised noise)."""
    spec = noisy_spec()
    ws = window_ws()
    merged = exact_merged(spec, ws)
    merged.report_count = 2
    merged.heartbeat_count = 2
    merged.noise_variance_per_bin = 0.0
    with pytest.raises(ValidationError):
        validate_forwarded(forwarded(spec, ws, merged, ("cam-1", "cam-2")), spec)


def test_withheld_only_forwarded_report_cannot_carry_histograms() -> None:
    """Withheld reports carry no histograms: a merge of withheld ones only has nothing
    released, so no noise, and any count in its histograms would be an exact one."""
    spec = noisy_spec()
    ws = window_ws()
    merged = exact_merged(spec, ws)
    merged.report_count = 2
    merged.withheld_report_count = 2
    merged.histogram_event_count = 0   # claims none, yet the histograms hold 100 events
    merged.noise_variance_per_bin = 0.0
    report = forwarded(spec, ws, merged, ("cam-1", "cam-2"))
    for c in report.contributions:
        c.withheld = 1
    with pytest.raises(ValidationError, match="withheld reports and heartbeats only"):
        validate_forwarded(report, spec)


def test_a_lease_lost_before_a_save_and_regained_still_fires(tmp_path: Path) -> None:
    """eu breaches from window 0 (fires at the end of window 2). a's tick evaluates windows
    0-1; right before saving window 2's firing, a finds the lease gone (b took it: `_save`
    raises `_LeaseLost`, nothing stored or notified -- as intended). b dies before it
    evaluates anything; the lease is a's again at its next tick. `_lead` compares only
    booleans (a's `_leading` was never cleared), so a keeps its in-memory engine, which
    already consumed window 2's pending -> firing transition: the alert is firing in memory
    and the firing is never stored nor notified (with PostgreSQL: a's session breaks, b
    takes the lock and restarts, a takes it again)."""
    lease, clock, spec = Lease(), Clock(), make_spec()
    a, b = (Replica(tmp_path / "shared.sqlite", n, lease, clock, spec) for n in ("a", "b"))
    try:
        for w in range(5):
            a.send(w, 250.0, "eu", seq=w + 1)
        clock.t += 10
        lease.switch = (2, "b")      # the tick's own check passes, the one before the save not
        assert a.evaluator.tick() == 2
        assert a.store.alert_history() == [] and a.notifier.notifications == []
        lease.holder = "a"           # b died without evaluating: a takes the lease again
        a.drain()
        assert [n.status for n in a.notifier.notifications] == ["firing"]
        assert [(h.state, h.at_s) for h in a.store.alert_history()] == [("firing", end(2))]
    finally:
        a.store.close()
        b.store.close()
