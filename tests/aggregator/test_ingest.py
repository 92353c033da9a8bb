"""aggregator.ingest on a real SqliteStore: hostile fields, label cardinality (also under
concurrent reports and after a restart), and the counters by reason."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ConfigError
from agent.spec import NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from agent.summary import Summary
from agent.wire import ReportMeta, report_to_proto
from aggregator.ingest import Ingestor, IngestRejected, ResourceExhausted
from aggregator.store.base import IngestOutcome
from aggregator.store.sqlite import SqliteStore
from aggregator.validate import Limits
from protos import fleetwatch_pb2 as pb

SPEC = Spec(model="m", model_version="1",
            features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0),
                                  reference_counts=(0, 5, 5, 0, 0)),),
            privacy=PrivacySpec(mechanism=NO_NOISE))
WS = int(time.time()) // 60 * 60 - 3600


def report(seq: int, labels: dict[str, str] | None = None, device: str = "d1",
           n: int = 4, spec: Spec = SPEC, **fields: object) -> pb.WindowReport:
    s = Summary.zero(spec)
    s.features["x"] = np.array([0, n, 0, 0, 0], np.int64)
    s.event_count = n
    s.latency.update(np.arange(n, dtype=np.float32))
    meta = ReportMeta(device_id=device, model=spec.model, model_version=spec.model_version,
                      labels={"region": "eu"} if labels is None else labels,
                      window_start_unix_s=WS, window_length_s=60, seq=seq, spec_hash=spec.hash)
    msg = report_to_proto(meta, s)
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


def env(msg: pb.WindowReport) -> bytes:
    return pb.ReportEnvelope(report=msg.SerializeToString()).SerializeToString()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "agg.sqlite")
    s.put_spec(SPEC)
    yield s
    s.close()


def refused(ingestor: Ingestor, data: bytes) -> IngestRejected:
    before = sum(ingestor.rejected.values())
    with pytest.raises(IngestRejected) as info:
        ingestor.ingest(data)
    assert sum(ingestor.rejected.values()) == before + 1
    assert ingestor.rejected[info.value.reason] >= 1
    return info.value


@pytest.mark.parametrize("field,value,match", [
    ("device_id", "dev\x00ice", "control characters"),
    ("device_id", "dev\nFAKE LOG LINE", "control characters"),
    ("device_id", "\u202edevice", "control characters"),  # right-to-left override
    ("device_id", " d1", "surrounding whitespace"),
    ("agent_version", "1.0\r\n", "control characters"),
    ("agent_version", "v" * 129, "at most 128"),
    ("seq", 1 << 63, r"2\*\*63"),
    ("seq", (1 << 64) - 1, r"2\*\*63"),
    ("clamped_event_count", (1 << 64) - 1, "absurd"),
    ("labels_unmatched_count", 1 << 40, "absurd"),
    ("epsilon_spent", float("nan"), "not a privacy loss"),
    ("day_epsilon_spent", float("-inf"), "not a privacy loss"),
])
def test_hostile_fields_are_refused(store: SqliteStore, field: str, value: object,
                                    match: str) -> None:
    msg = report(1)
    setattr(msg, field, value)
    err = refused(Ingestor(store), env(msg))
    assert (err.reason, err.field) == ("invalid", field)
    assert re.search(match, err.message), err.message


@pytest.mark.parametrize("labels", [{"region": "e\tu"}, {"reg\x7fion": "eu"},
                                    {"region": "eu "}, {" region": "eu"},
                                    {"region": "eu\u2028x"}, {"region": "a=b"}])
def test_label_strings_are_checked(store: SqliteStore, labels: dict[str, str]) -> None:
    err = refused(Ingestor(store), env(report(1, labels)))
    assert (err.reason, err.field) == ("invalid", "labels")


def test_printable_unicode_labels_are_fine(store: SqliteStore) -> None:
    ingestor = Ingestor(store)
    assert ingestor.ingest(env(report(1, {"région": "Zürich Ost", "hw": "jetson-nano"}))) \
        is IngestOutcome.ACCEPTED


def test_invalid_utf8_is_malformed(store: SqliteStore) -> None:
    raw = report(1, {"region": "eu"}, device="dAAAA").SerializeToString()
    raw = raw.replace(b"dAAAA", b"d\xff\xfeAA")
    err = refused(Ingestor(store), pb.ReportEnvelope(report=raw).SerializeToString())
    assert err.reason == "malformed"


def test_limits_are_validated() -> None:
    for name in ("max_label_values_per_key", "max_label_keys_per_model", "max_labels"):
        with pytest.raises(ConfigError, match=name):
            Limits(**{name: 0})


def test_label_cardinality_is_per_model_and_survives_restart(tmp_path: Path) -> None:
    other = Spec(model="other", model_version="1", features=SPEC.features,
                 privacy=SPEC.privacy)
    v2 = Spec(model="m", model_version="2", features=SPEC.features, privacy=SPEC.privacy)
    limits = Limits(max_label_values_per_key=2)
    store = SqliteStore(tmp_path / "agg.sqlite")
    for s in (SPEC, other, v2):
        store.put_spec(s)
    ingestor = Ingestor(store, limits)
    assert ingestor.ingest(env(report(1, {"region": "eu"}))) is IngestOutcome.ACCEPTED
    # A second version of the model shares its cardinality budget.
    assert ingestor.ingest(env(report(2, {"region": "us"}, spec=v2))) is IngestOutcome.ACCEPTED
    err = refused(ingestor, env(report(3, {"region": "apac"})))
    assert isinstance(err, ResourceExhausted) and err.reason == "too_many_label_values"
    assert "refused" in err.message and "'region'" in err.message
    # Another model has its own.
    assert ingestor.ingest(env(report(4, {"region": "apac"}, spec=other))) \
        is IngestOutcome.ACCEPTED
    assert ingestor.ingest(env(report(5, {"region": "us"}))) is IngestOutcome.ACCEPTED
    # A refused report is not a duplicate later: nothing of it was stored.
    store.close()

    store = SqliteStore(tmp_path / "agg.sqlite")
    ingestor = Ingestor(store, limits)
    err = refused(ingestor, env(report(3, {"region": "apac"})))
    assert err.reason == "too_many_label_values"
    assert ingestor.ingest(env(report(6, {"region": "eu"}, spec=v2))) is IngestOutcome.ACCEPTED
    assert ingestor.stats().rejected == {"too_many_label_values": 1}
    store.close()


def test_concurrent_new_values_never_exceed_the_limit(store: SqliteStore) -> None:
    limit = 5
    ingestor = Ingestor(store, Limits(max_label_values_per_key=limit))
    outcomes: list[str] = []
    start = threading.Barrier(16)

    def send(i: int) -> None:
        start.wait()
        try:
            ingestor.ingest(env(report(1, {"region": f"r{i}"}, device=f"dev{i}")))
            outcomes.append("accepted")
        except ResourceExhausted as e:
            outcomes.append(e.reason)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["accepted"] * limit + ["too_many_label_values"] * 11
    assert len(store.model_label_sets("m")) == limit
    stats = ingestor.stats()
    assert (stats.accepted, stats.rejected) == (limit, {"too_many_label_values": 11})


def test_duplicates_with_new_labels_add_no_value(store: SqliteStore) -> None:
    ingestor = Ingestor(store, Limits(max_label_values_per_key=2))
    assert ingestor.ingest(env(report(1, {"region": "eu"}))) is IngestOutcome.ACCEPTED
    # Same (device, seq), other labels (so other bytes): a seq reused, never merged, so no
    # value is taken.
    assert ingestor.ingest(env(report(1, {"region": "us"}))) is IngestOutcome.SEQ_REUSED
    assert ingestor.ingest(env(report(1, {"region": "eu"}))) is IngestOutcome.DUPLICATE
    assert ingestor.ingest(env(report(2, {"region": "apac"}))) is IngestOutcome.ACCEPTED
    stats = ingestor.stats()
    assert (stats.accepted, stats.duplicates, stats.rejected) == (2, 1, {"seq_reused": 1})


def test_concurrent_reports_share_transactions_and_a_bad_one_fails_alone(
        store: SqliteStore) -> None:
    """Reports handed in together are checked one by one and stored in shared transactions
    (aggregator.batcher): every good one is accepted exactly once, a refused one gets its
    own error, and duplicates inside the crowd are answered DUPLICATE."""
    ingestor = Ingestor(store)
    ingestor.ingest(env(report(1, device="warm")))  # the model's label values are known
    commits = store.ingest_commits
    start = threading.Barrier(24)
    outcomes: dict[tuple[int, int], object] = {}

    def send(i: int) -> None:
        start.wait()
        for seq in range(1, 11):
            bad = i == 5 and seq == 4  # more errors than events: refused, alone
            msg = report(seq, device=f"dev{i}", error_count=99 if bad else 0)
            try:
                outcomes[(i, seq)] = ingestor.ingest(env(msg))
                if seq == 7:  # a lost acknowledgement: the same report again
                    outcomes[(i, -seq)] = ingestor.ingest(env(msg))
            except IngestRejected as e:
                outcomes[(i, seq)] = e.reason

    threads = [threading.Thread(target=send, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert outcomes.pop((5, 4)) == "invalid"
    dups = {k: outcomes.pop(k) for k in list(outcomes) if k[1] < 0}
    assert set(dups.values()) == {IngestOutcome.DUPLICATE} and len(dups) == 24
    assert set(outcomes.values()) == {IngestOutcome.ACCEPTED} and len(outcomes) == 24 * 10 - 1
    stats = ingestor.stats()
    assert (stats.accepted, stats.duplicates, stats.rejected) == (24 * 10 - 1 + 1, 24,
                                                                  {"invalid": 1})
    assert store.ingest_commits - commits < 24 * 11 - 1, "no report shared a transaction"
    rows = store._query("SELECT COUNT(*) FROM reports")[0][0]
    assert rows == 24 * 10 - 1 + 1
