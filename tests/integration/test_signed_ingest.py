"""Signed reports and replay protection, over real gRPC against a real aggregator.

The aggregator verifies each envelope's Ed25519 signature with the device's key from
`<dir>/devices/<ID>.sign.pub` before it parses the report, refuses what does not verify with
UNAUTHENTICATED (counted by reason), acknowledges byte-identical resends and replays of old
seqs as duplicates without merging them, and refuses timestamps from the future beyond the
clock-skew bound while taking old, late windows into their own buckets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import Monitor
from agent.signing import ReportSigner
from agent.spec import Spec
from agent.window import WindowAccumulator
from agent.wire import ReportMeta, report_to_proto
from aggregator.server import RunningAggregator
from protos import fleetwatch_pb2 as pb

WINDOW_S = 60
Status = grpc.StatusCode
SCENES = np.array(["indoor", "outdoor", "night"], dtype=object)


def issue_keys(pki: Path, device_id: str) -> Ed25519PrivateKey:
    """The layout `fleetwatch certs issue-device` writes: devices/<ID>.sign.{key,pub}."""
    key = Ed25519PrivateKey.generate()
    devices = pki / "devices"
    devices.mkdir(parents=True, exist_ok=True)
    (devices / f"{device_id}.sign.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (devices / f"{device_id}.sign.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key


def build_report(spec: Spec, ws: int, *, device: str = "cam-1", seq: int = 1, n: int = 50,
                 created_ms: int | None = None, seed: int = 0) -> pb.WindowReport:
    rng = np.random.default_rng(seed)
    acc = WindowAccumulator(spec, ws)
    acc.observe_batch({"temp": rng.normal(0.0, 1.0, n), "speed": rng.exponential(20.0, n),
                       "scene": rng.choice(SCENES, n)},
                      rng.uniform(0.0, 1.0, n), rng.lognormal(3.0, 0.5, n),
                      rng.random(n) < 0.1, n)
    created = int(time.time() * 1000) if created_ms is None else created_ms
    meta = ReportMeta(device, spec.model, spec.model_version, {"region": "eu"}, ws,
                      spec.window_length_s, seq, spec.hash, created, "test")
    return report_to_proto(meta, acc.to_summary())


def signed(key: Ed25519PrivateKey, report: pb.WindowReport, key_id: str = "cam-1") -> bytes:
    return ReportSigner.from_key(key, key_id).envelope(report.SerializeToString())


def envelope_fields(report: bytes, signature: bytes = b"", key_id: str = "") -> bytes:
    return pb.ReportEnvelope(report=report, signature=signature,
                             key_id=key_id).SerializeToString()


def events(cohort_rpc, agg: RunningAggregator, start: int, end: int) -> int:
    return sum(h.events for h in cohort_rpc(agg.target, start, end))


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    d.mkdir()
    return d


@pytest.fixture
def signed_aggregator(start_aggregator, tmp_path: Path, pki: Path):
    with start_aggregator(tmp_path / "agg.sqlite", signing_keys_dir=pki) as running:
        assert running.ingestor.require_signatures  # the default with keys
        yield running


class SimClock:
    def __init__(self, t: float) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t


def observe_windows(mon: Monitor, clock: SimClock, rng: np.random.Generator, window_base: int,
                    windows: range, n0: int) -> int:
    """``n0 + w`` events into each window ``w`` of ``windows``, then a flush with the clock
    past the last one (asserted to deliver everything); returns the events observed."""
    total = 0
    for w in windows:
        n = n0 + w
        clock.t = window_base + w * WINDOW_S + 5.0
        mon.observe_batch({"temp": rng.normal(0, 1, n), "speed": rng.exponential(20, n),
                           "scene": rng.choice(SCENES, n)},
                          predictions=rng.uniform(0, 1, n),
                          latency_ms=rng.lognormal(3, 0.5, n))
        total += n
    clock.t = window_base + windows.stop * WINDOW_S + 1.0
    assert mon.flush(timeout_s=20.0) is True
    return total


def test_a_signed_monitor_delivers_end_to_end(signed_aggregator, pki: Path, spec: Spec,
                                              window_base: int, cohort_rpc,
                                              tmp_path: Path) -> None:
    issue_keys(pki, "cam-7")
    clock = SimClock(window_base + 1.0)
    mon = Monitor(spec.model, spec.model_version, "cam-7", labels={"region": "eu"},
                  aggregator=signed_aggregator.target, spool_dir=tmp_path / "spool",
                  clock=clock, background=False, grace_s=0.0,
                  signing_key=pki / "devices" / "cam-7.sign.key")
    try:
        total = observe_windows(mon, clock, np.random.default_rng(3), window_base, range(3), 40)
        assert mon.stats().spool.pending == 0
    finally:
        mon.close(timeout_s=5.0)
    ing = signed_aggregator.ingestor
    assert dict(ing.rejected) == {} and ing.accepted == 3
    assert events(cohort_rpc, signed_aggregator, window_base,
                  window_base + 3 * WINDOW_S) == total


def test_a_device_that_lost_its_spool_renumbers_above_its_mark(
        signed_aggregator, pki: Path, spec: Spec, window_base: int, cohort_rpc,
        tmp_path: Path) -> None:
    """A wiped spool restarts the device at seq 1, far below the mark of its earlier life:
    the aggregator answers STALE_SEQ with the mark, and the agent renumbers its pending
    reports above it (signed again) instead of losing them as replays."""
    key = issue_keys(pki, "cam-7")
    # The device's earlier life: its last report merged at seq 50,000.
    earlier = build_report(spec, window_base - 10 * WINDOW_S, device="cam-7", seq=50_000, n=5)
    with grpc.insecure_channel(signed_aggregator.target) as ch:
        rpc = ch.unary_unary("/fleetwatch.v1.Ingest/Report", request_serializer=lambda b: b,
                             response_deserializer=pb.ReportResponse.FromString)
        assert rpc(signed(key, earlier, "cam-7"), timeout=10).status == \
            pb.ReportResponse.ACCEPTED
    clock = SimClock(window_base + 1.0)
    mon = Monitor(spec.model, spec.model_version, "cam-7", labels={"region": "eu"},
                  aggregator=signed_aggregator.target, spool_dir=tmp_path / "fresh-spool",
                  clock=clock, background=False, grace_s=0.0,
                  signing_key=pki / "devices" / "cam-7.sign.key")
    try:
        total = observe_windows(mon, clock, np.random.default_rng(5), window_base, range(3), 30)
        stats = mon.stats().spool
        assert stats.pending == 0 and stats.next_seq == 50_004  # continues above the mark
        assert mon._uploader.renumbered == 3
    finally:
        mon.close(timeout_s=5.0)
    ing = signed_aggregator.ingestor
    assert ing.accepted == 4 and dict(ing.rejected) == {"replayed": 1}
    assert signed_aggregator.store.high_water_mark("cam-7") == 50_003
    # Every window's events merged once (the STALE_SEQ answer merged nothing).
    assert events(cohort_rpc, signed_aggregator, window_base,
                  window_base + 3 * WINDOW_S) == total


def test_a_lost_spool_within_the_reorder_window_renumbers_too(
        signed_aggregator, pki: Path, spec: Spec, window_base: int, cohort_rpc,
        tmp_path: Path) -> None:
    """Seqs 1-2 were merged in the device's earlier life; its new spool starts at 1 again,
    well within the reorder window: the new seq 1 has other bytes, so it is not taken for a
    resend (SEQ_REUSED, answered STALE_SEQ) and the agent renumbers above the mark."""
    issue_keys(pki, "cam-8")
    key_file = pki / "devices" / "cam-8.sign.key"
    rng = np.random.default_rng(6)

    def run_life(spool: str, first_window: int, windows: int) -> int:
        clock = SimClock(window_base + first_window * WINDOW_S + 1.0)
        mon = Monitor(spec.model, spec.model_version, "cam-8", labels={"region": "eu"},
                      aggregator=signed_aggregator.target, spool_dir=tmp_path / spool,
                      clock=clock, background=False, grace_s=0.0, signing_key=key_file)
        try:
            n_total = observe_windows(mon, clock, rng, window_base,
                                      range(first_window, first_window + windows), 20)
            assert mon.stats().spool.pending == 0
        finally:
            mon.close(timeout_s=5.0)
        return n_total

    total = run_life("first-life", 0, 2)             # seqs 1, 2
    # Seqs 1-3 again: renumbered to 4-6 (above the mark, 2, and above every seq this spool
    # handed out, 3: a spool never numbers two reports alike).
    total += run_life("second-life", 2, 3)
    ing = signed_aggregator.ingestor
    assert ing.accepted == 5 and dict(ing.rejected) == {"seq_reused": 1}
    assert signed_aggregator.store.high_water_mark("cam-8") == 6
    assert events(cohort_rpc, signed_aggregator, window_base,
                  window_base + 5 * WINDOW_S) == total


def _flip(b: bytes, i: int = 0) -> bytes:
    return b[:i] + bytes([b[i] ^ 1]) + b[i + 1:]


# (id, build envelope bytes from (own key, stranger's key, report bytes), code, reason)
REFUSALS: list[tuple[str, Callable[[Ed25519PrivateKey, Ed25519PrivateKey, bytes], bytes],
                     Status, str]] = [
    ("signature-bit-flipped", lambda k, o, r: envelope_fields(r, _flip(k.sign(r), 5), "cam-1"),
     Status.UNAUTHENTICATED, "bad_signature"),
    ("body-tampered", lambda k, o, r: envelope_fields(_flip(r, len(r) // 2), k.sign(r), "cam-1"),
     Status.UNAUTHENTICATED, "bad_signature"),
    ("signature-truncated", lambda k, o, r: envelope_fields(r, k.sign(r)[:32], "cam-1"),
     Status.UNAUTHENTICATED, "bad_signature"),
    ("other-devices-key", lambda k, o, r: envelope_fields(r, o.sign(r), "cam-1"),
     Status.UNAUTHENTICATED, "bad_signature"),
    ("unsigned", lambda k, o, r: envelope_fields(r), Status.UNAUTHENTICATED, "unsigned"),
    ("key-id-without-signature", lambda k, o, r: envelope_fields(r, b"", "cam-1"),
     Status.UNAUTHENTICATED, "unsigned"),
    ("signature-without-key-id", lambda k, o, r: envelope_fields(r, k.sign(r)),
     Status.UNAUTHENTICATED, "unsigned"),
    ("unknown-key-id", lambda k, o, r: envelope_fields(r, o.sign(r), "cam-unknown"),
     Status.UNAUTHENTICATED, "unknown_device"),
    ("key-id-traversal", lambda k, o, r: envelope_fields(r, k.sign(r), "../devices/cam-1"),
     Status.UNAUTHENTICATED, "unknown_device"),
    # Authenticate before parsing: garbage behind a wrong signature never reaches protobuf.
    ("garbage-body-bad-signature", lambda k, o, r: envelope_fields(b"\xff" * 40, k.sign(r),
                                                                   "cam-1"),
     Status.UNAUTHENTICATED, "bad_signature"),
    ("garbage-body-unsigned", lambda k, o, r: envelope_fields(b"\xff" * 40),
     Status.UNAUTHENTICATED, "unsigned"),
    # Signed by cam-2 (validly) but claiming to be cam-1.
    ("signed-by-another-device", lambda k, o, r: envelope_fields(r, o.sign(r), "cam-2"),
     Status.PERMISSION_DENIED, "identity_mismatch"),
]


@pytest.mark.parametrize(("build", "code", "reason"), [c[1:] for c in REFUSALS],
                         ids=[c[0] for c in REFUSALS])
def test_unauthenticated_envelopes_are_refused_and_nothing_merged(
        signed_aggregator, pki: Path, spec: Spec, window_base: int, report_rpc, cohort_rpc,
        build, code: Status, reason: str) -> None:
    key = issue_keys(pki, "cam-1")
    stranger = issue_keys(pki, "cam-2")
    report = build_report(spec, window_base).SerializeToString()
    send = report_rpc(signed_aggregator.target)
    with pytest.raises(grpc.RpcError) as refused:
        send(build(key, stranger, report), timeout=10)
    assert refused.value.code() == code, refused.value.details()
    ing = signed_aggregator.ingestor
    assert dict(ing.rejected) == {reason: 1}
    assert ing.accepted == 0
    assert signed_aggregator.store.label_sets(spec.hash) == []
    assert signed_aggregator.store.high_water_mark("cam-1") is None
    # The genuine envelope still goes through.
    ok = send(envelope_fields(report, key.sign(report), "cam-1"), timeout=10)
    assert ok.status == pb.ReportResponse.ACCEPTED
    assert events(cohort_rpc, signed_aggregator, window_base, window_base + WINDOW_S) == 50


def test_a_byte_identical_resend_is_a_duplicate_merged_once(
        signed_aggregator, pki: Path, spec: Spec, window_base: int, report_rpc,
        cohort_rpc) -> None:
    key = issue_keys(pki, "cam-1")
    env = signed(key, build_report(spec, window_base))
    send = report_rpc(signed_aggregator.target)
    assert send(env, timeout=10).status == pb.ReportResponse.ACCEPTED
    for _ in range(3):
        assert send(env, timeout=10).status == pb.ReportResponse.DUPLICATE
    ing = signed_aggregator.ingestor
    assert (ing.accepted, ing.duplicates, dict(ing.rejected)) == (1, 3, {})
    assert events(cohort_rpc, signed_aggregator, window_base, window_base + WINDOW_S) == 50


def test_a_seq_far_below_the_high_water_mark_is_a_replay(
        start_aggregator, tmp_path: Path, pki: Path, spec: Spec, window_base: int,
        report_rpc, cohort_rpc) -> None:
    key = issue_keys(pki, "cam-1")
    db = tmp_path / "agg.sqlite"
    ws = [window_base + i * WINDOW_S for i in range(4)]
    with start_aggregator(db, signing_keys_dir=pki) as agg:
        send = report_rpc(agg.target)
        assert send(signed(key, build_report(spec, ws[0], seq=20_000)),
                    timeout=10).status == pb.ReportResponse.ACCEPTED
        # Within the reorder window (10,000 below the mark): merged normally.
        assert send(signed(key, build_report(spec, ws[1], seq=12_000, n=7)),
                    timeout=10).status == pb.ReportResponse.ACCEPTED
        # Further below and never seen: not merged, counted; the answer carries the mark.
        resp = send(signed(key, build_report(spec, ws[2], seq=5, n=9)), timeout=10)
        assert resp.status == pb.ReportResponse.STALE_SEQ and resp.high_water_mark == 20_000
        assert agg.ingestor.rejected["replayed"] == 1 and agg.ingestor.accepted == 2
        assert agg.store.high_water_mark("cam-1") == 20_000
        assert events(cohort_rpc, agg, ws[0], ws[3]) == 57
    # The mark is durable: a restarted aggregator still refuses the replay.
    with start_aggregator(db, signing_keys_dir=pki, push=False) as agg:
        send = report_rpc(agg.target)
        assert send(signed(key, build_report(spec, ws[3], seq=9_000, n=11)),
                    timeout=10).status == pb.ReportResponse.STALE_SEQ
        assert dict(agg.ingestor.rejected) == {"replayed": 1}
        assert events(cohort_rpc, agg, ws[0], ws[3] + WINDOW_S) == 57


def test_timestamps_from_the_future_are_refused(signed_aggregator, pki: Path, spec: Spec,
                                                report_rpc) -> None:
    key = issue_keys(pki, "cam-1")
    send = report_rpc(signed_aggregator.target)
    now = time.time()
    current = int(now) // WINDOW_S * WINDOW_S
    cases = [  # (report, field the refusal names)
        (build_report(spec, current, seq=1, created_ms=int((now + 900) * 1000)),
         "created_unix_ms"),
        (build_report(spec, current + 3600, seq=2), "window_start_unix_s"),
    ]
    for report, field in cases:
        with pytest.raises(grpc.RpcError) as refused:
            send(signed(key, report), timeout=10)
        # not final: the device keeps the report and retries until its clock is no longer
        # ahead of ours (an uploader dead-letters only INVALID_ARGUMENT)
        assert refused.value.code() == Status.FAILED_PRECONDITION
        assert refused.value.details().startswith(f"{field}: "), refused.value.details()
    assert dict(signed_aggregator.ingestor.rejected) == {"clock_skew": 2}
    # A device clock 2 minutes ahead is within the skew: taken.
    ahead = build_report(spec, current + WINDOW_S, seq=3, created_ms=int((now + 120) * 1000))
    assert send(signed(key, ahead), timeout=10).status == pb.ReportResponse.ACCEPTED


def test_a_window_six_hours_old_is_taken_into_its_own_bucket(
        signed_aggregator, pki: Path, spec: Spec, report_rpc, cohort_rpc) -> None:
    key = issue_keys(pki, "cam-1")
    old = (int(time.time()) - 6 * 3600) // WINDOW_S * WINDOW_S
    # Built when the window closed, delivered now (the device was offline).
    report = build_report(spec, old, created_ms=(old + WINDOW_S) * 1000, n=33)
    assert report_rpc(signed_aggregator.target)(
        signed(key, report), timeout=10).status == pb.ReportResponse.ACCEPTED
    assert events(cohort_rpc, signed_aggregator, old, old + WINDOW_S) == 33
    assert events(cohort_rpc, signed_aggregator, old + WINDOW_S, old + 2 * WINDOW_S) == 0
    assert events(cohort_rpc, signed_aggregator, old - WINDOW_S, old) == 0


def test_a_new_devices_key_is_picked_up_while_the_server_runs(
        signed_aggregator, pki: Path, spec: Spec, window_base: int, report_rpc) -> None:
    send = report_rpc(signed_aggregator.target)
    key = Ed25519PrivateKey.generate()
    env = signed(key, build_report(spec, window_base, device="cam-new"), key_id="cam-new")
    with pytest.raises(grpc.RpcError) as refused:
        send(env, timeout=10)
    assert refused.value.code() == Status.UNAUTHENTICATED
    devices = pki / "devices"
    devices.mkdir(exist_ok=True)
    (devices / "cam-new.sign.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    deadline = time.monotonic() + 15.0  # the server looks again about once a second
    while True:
        try:
            assert send(env, timeout=10).status == pb.ReportResponse.ACCEPTED
            break
        except grpc.RpcError as e:
            assert e.code() == Status.UNAUTHENTICATED
            assert time.monotonic() < deadline, "the new key was never picked up"
            time.sleep(0.2)
    assert signed_aggregator.ingestor.accepted == 1


def test_without_required_signatures_unsigned_is_taken_but_bad_ones_are_not(
        start_aggregator, tmp_path: Path, pki: Path, spec: Spec, window_base: int,
        report_rpc) -> None:
    key = issue_keys(pki, "cam-1")
    with start_aggregator(tmp_path / "agg.sqlite", signing_keys_dir=pki,
                          require_signatures=False) as agg:
        send = report_rpc(agg.target)
        report = build_report(spec, window_base).SerializeToString()
        assert send(envelope_fields(report), timeout=10).status == pb.ReportResponse.ACCEPTED
        other = build_report(spec, window_base, seq=2).SerializeToString()
        with pytest.raises(grpc.RpcError) as refused:
            send(envelope_fields(other, _flip(key.sign(other)), "cam-1"), timeout=10)
        assert refused.value.code() == Status.UNAUTHENTICATED
        assert dict(agg.ingestor.rejected) == {"bad_signature": 1}


def test_tls_and_signatures_together_with_issued_certificates(
        start_aggregator, tmp_path: Path, spec: Spec, window_base: int) -> None:
    """The production setup: `certs init` + `issue-device`, a server with --tls-dir semantics
    (mutual TLS and required signatures from the same directory), a Monitor with both."""
    from agent.transport import TlsCredentials
    from aggregator.certs import init_ca, issue_device

    pki = tmp_path / "pki"
    init_ca(pki)
    issue_device(pki, "cam-tls")
    with start_aggregator(tmp_path / "agg.sqlite", push=False, tls_dir=pki,
                          signing_keys_dir=pki) as agg:
        agg.store.put_spec(spec)
        clock = SimClock(window_base + 5.0)
        mon = Monitor(spec.model, spec.model_version, "cam-tls", labels={"region": "eu"},
                      aggregator=agg.target, spool_dir=tmp_path / "spool", clock=clock,
                      spec=spec, background=False, grace_s=0.0,
                      tls=TlsCredentials.for_device(pki, "cam-tls"),
                      signing_key=pki / "devices" / "cam-tls.sign.key")
        try:
            mon.observe({"temp": 0.1, "speed": 3.0, "scene": "night"}, prediction=0.5,
                        latency_ms=12.0)
            clock.t = window_base + WINDOW_S + 1.0
            assert mon.flush(timeout_s=20.0) is True
        finally:
            mon.close(timeout_s=5.0)
        assert (agg.ingestor.accepted, dict(agg.ingestor.rejected)) == (1, {})
