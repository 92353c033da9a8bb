"""Tests for agent.pbwire: the hand-written codec against the protobuf library (the oracle)."""

from __future__ import annotations

import dataclasses
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent import pbwire, wire
from agent.spec import (
    BINARY,
    CATEGORICAL,
    DEVICE_DAY,
    DISCRETE_GAUSSIAN,
    MULTICLASS,
    NO_NOISE,
    NUMERIC,
    REGRESSION,
    FeatureSpec,
    LabelSpec,
    PrivacySpec,
    Spec,
)
from agent.summary import LABEL_HISTOGRAMS, Summary, empty_kll
from agent.upload import DeliveryResult, Uploader
from agent.wire import ReportMeta, report_to_proto, spec_from_proto, spec_to_proto
from protos import fleetwatch_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]

_U64 = st.integers(0, 2**64 - 1)
_I64 = st.integers(-(2**63), 2**63 - 1)
_I32 = st.integers(-(2**31), 2**31 - 1)
# Counts as DP noise leaves them: mostly small, some negative, some at the int64 extremes.
_COUNT = st.one_of(st.integers(-70, 70), _I64, st.sampled_from([0, -1, 2**63 - 1, -(2**63)]))
_TEXT = st.text(max_size=12)  # unicode (hypothesis leaves out lone surrogates)
_DOUBLE = st.one_of(st.floats(allow_nan=False), st.sampled_from([0.0, -0.0, 1e-310]))


def _hist(min_size: int = 0):
    return st.lists(_COUNT, min_size=min_size, max_size=9).map(
        lambda c: np.array(c, dtype=np.int64))


@st.composite
def reports(draw) -> tuple[ReportMeta, Summary]:
    features = draw(st.dictionaries(st.text(min_size=1, max_size=8), _hist(), max_size=5))
    summary = Summary(features=features, prediction=draw(st.none() | _hist()))
    for name in LABEL_HISTOGRAMS:
        setattr(summary, name, draw(st.none() | _hist()))
    latencies = draw(st.lists(st.floats(0, 1e6, width=32), max_size=50))
    summary.latency = empty_kll()
    if latencies:
        summary.latency.update(np.asarray(latencies, np.float32))
    for name in wire._SHARED_COUNTERS:
        setattr(summary, name, draw(st.one_of(st.just(0), st.integers(0, 300), _U64)))
    meta = ReportMeta(
        device_id=draw(_TEXT), model=draw(_TEXT), model_version=draw(_TEXT),
        labels=draw(st.dictionaries(_TEXT, _TEXT, max_size=4)),
        window_start_unix_s=draw(_I64), window_length_s=draw(_I32), seq=draw(_U64),
        spec_hash=draw(_TEXT), created_unix_ms=draw(_I64), agent_version=draw(_TEXT),
        private_withheld=draw(st.booleans()), epsilon_spent=draw(_DOUBLE),
        day_epsilon_spent=draw(_DOUBLE), heartbeat=draw(st.booleans()))
    return meta, summary


def _one_label(meta: ReportMeta) -> ReportMeta:
    """At most one map entry: protobuf's order of several is its own (a hash table's, or a
    "deterministic" one that is not the keys' order), so bytes compare with one at most."""
    return dataclasses.replace(meta, labels=dict(list(meta.labels.items())[:1]))


# -- WindowReport --------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(reports())
def test_report_parses_to_what_report_to_proto_builds(report):
    meta, summary = report
    data = pbwire.encode_report(meta, summary)
    assert pb.WindowReport.FromString(data) == report_to_proto(meta, summary)
    # Byte for byte what protobuf writes.
    meta = _one_label(meta)
    assert pbwire.encode_report(meta, summary) == report_to_proto(meta, summary).SerializeToString()


def test_report_of_zeros_and_empty_histograms_keeps_their_presence():
    summary = Summary(features={"a": np.zeros(0, np.int64), "b": np.zeros(3, np.int64)},
                      prediction=np.zeros(0, np.int64), confusion=np.zeros(4, np.int64))
    meta = ReportMeta("d", "m", "1", {}, 0, 0, 0, "")
    msg = pb.WindowReport.FromString(pbwire.encode_report(meta, summary))
    assert msg == report_to_proto(meta, summary)
    assert msg.HasField("prediction") and msg.HasField("confusion")
    assert not msg.HasField("calibration")
    assert [list(f.histogram.counts) for f in msg.features] == [[], [0, 0, 0]]
    assert msg.seq == 0 and msg.window_start_unix_s == 0


@pytest.mark.parametrize("withheld, heartbeat", [(True, False), (False, True), (True, True)])
def test_withheld_and_heartbeat_reports_carry_nothing_private(withheld, heartbeat):
    summary = Summary(features={"a": np.array([1, -2, 3])}, prediction=np.array([5, 6]),
                      calibration=np.array([1, 1]), event_count=7)
    summary.latency.update(np.array([1.0, 2.0], np.float32))
    meta = ReportMeta("d", "m", "1", {"k": "v"}, 60, 60, 3, "h", private_withheld=withheld,
                      heartbeat=heartbeat, epsilon_spent=0.5)
    msg = pb.WindowReport.FromString(pbwire.encode_report(meta, summary))
    assert msg == report_to_proto(meta, summary)
    assert not msg.features and not msg.HasField("prediction")
    assert not msg.HasField("calibration") and msg.event_count == 7
    assert (msg.latency_kll == b"") is heartbeat


@pytest.mark.parametrize("field, value", [("seq", -1), ("seq", 2**64),
                                          ("window_length_s", 2**31),
                                          ("window_start_unix_s", 2**63)])
def test_out_of_range_fields_are_refused_like_protobuf(field, value):
    meta = dataclasses.replace(ReportMeta("d", "m", "1", {}, 0, 60, 1, ""), **{field: value})
    summary = Summary(features={}, prediction=None)
    with pytest.raises(ValueError):
        report_to_proto(meta, summary)
    with pytest.raises(ValueError):
        pbwire.encode_report(meta, summary)


def test_negative_counter_and_float_counts_are_refused_like_protobuf():
    meta = ReportMeta("d", "m", "1", {}, 0, 60, 1, "")
    negative = Summary(features={}, prediction=None, event_count=-1)
    with pytest.raises(ValueError):
        report_to_proto(meta, negative)
    with pytest.raises(ValueError):
        pbwire.encode_report(meta, negative)
    floats = Summary(features={"a": np.array([1.5])}, prediction=None)
    with pytest.raises(TypeError):
        report_to_proto(meta, floats)
    with pytest.raises(TypeError):
        pbwire.encode_report(meta, floats)


def test_enum_numbers_written_out_in_wire_match_the_proto():
    assert wire._TYPE_TO_PB == {NUMERIC: pb.FEATURE_TYPE_NUMERIC,
                                CATEGORICAL: pb.FEATURE_TYPE_CATEGORICAL}
    assert wire._UNIT_TO_PB == {"event": pb.PRIVACY_UNIT_EVENT,
                                DEVICE_DAY: pb.PRIVACY_UNIT_DEVICE_DAY}
    assert wire._MECH_TO_PB == {"discrete_laplace": pb.NOISE_MECHANISM_DISCRETE_LAPLACE,
                                DISCRETE_GAUSSIAN: pb.NOISE_MECHANISM_DISCRETE_GAUSSIAN,
                                NO_NOISE: pb.NOISE_MECHANISM_NONE}
    assert wire._TASK_TO_PB == {BINARY: pb.LABEL_TASK_BINARY,
                                MULTICLASS: pb.LABEL_TASK_MULTICLASS,
                                REGRESSION: pb.LABEL_TASK_REGRESSION}
    statuses = pb.ReportResponse.Status
    assert (pbwire.STATUS_UNSPECIFIED, pbwire.ACCEPTED, pbwire.DUPLICATE, pbwire.STALE_SEQ) == (
        statuses.Value("STATUS_UNSPECIFIED"), statuses.Value("ACCEPTED"),
        statuses.Value("DUPLICATE"), statuses.Value("STALE_SEQ"))


# -- envelope and renumbering --------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=64), _TEXT)
@example(b"", b"", "")
def test_envelope_is_what_protobuf_writes(report, signature, key_id):
    data = pbwire.encode_envelope(report, signature, key_id)
    expected = pb.ReportEnvelope(report=report, signature=signature, key_id=key_id)
    assert pb.ReportEnvelope.FromString(data) == expected
    assert data == expected.SerializeToString()
    assert pbwire.envelope_report(data) == report
    assert pbwire.encode_envelope(report) == pb.ReportEnvelope(report=report).SerializeToString()


def test_signed_envelope_verifies_and_parses():
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.signing import ReportSigner

    key = Ed25519PrivateKey.generate()
    report = pbwire.encode_report(ReportMeta("cam-ü", "m", "1", {"r": "eu"}, 60, 60, 9, "h"),
                                  Summary(features={}, prediction=None))
    env = pb.ReportEnvelope.FromString(ReportSigner(key, "cam-ü").envelope(report))
    assert env.report == report and env.key_id == "cam-ü"
    key.public_key().verify(env.signature, env.report)  # raises if it does not verify


@settings(max_examples=200, deadline=None)
@given(reports(), st.one_of(st.just(0), _U64))
def test_renumbering_equals_setting_seq_with_protobuf(report, seq):
    meta, summary = report
    envelope = pbwire.encode_envelope(pbwire.encode_report(meta, summary))
    renumbered = pbwire.report_with_seq(pbwire.envelope_report(envelope), seq)
    expected = report_to_proto(meta, summary)
    expected.seq = seq
    assert pb.WindowReport.FromString(renumbered) == expected
    if len(meta.labels) <= 1:
        assert renumbered == expected.SerializeToString()


def _varint(v: int) -> bytes:  # the test's own encoder, for hand-made inputs
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    if wire_type == 2:
        payload = _varint(len(payload)) + payload
    return _varint(number << 3 | wire_type) + payload


def test_renumbering_keeps_unknown_fields_and_drops_every_old_seq():
    base = report_to_proto(ReportMeta("d", "m", "1", {"a": "b"}, 60, 60, 4, "h"),
                           Summary(features={"f": np.array([1, 2])}, prediction=None))
    data = (base.SerializeToString() + _field(7, 0, _varint(99)) + _field(1000, 2, b"future")
            + _field(7, 0, _varint(5)))
    assert pb.WindowReport.FromString(data).seq == 5  # the last occurrence wins
    renumbered = pbwire.report_with_seq(data, 12)
    expected = pb.WindowReport.FromString(data)
    expected.seq = 12
    parsed = pb.WindowReport.FromString(renumbered)
    assert parsed == expected
    assert b"future" in renumbered
    assert pbwire.report_with_seq(data, 0).count(_field(7, 0, _varint(5))) == 0


def test_monitor_renumbering_matches_protobuf(tmp_path):
    from agent.monitor import Monitor

    spec = Spec("m", "1", (FeatureSpec("x", NUMERIC, edges=(0.0, 1.0)),))
    with Monitor("m", "1", "dev", {"k": "v"}, aggregator="127.0.0.1:1", spool_dir=tmp_path,
                 spec=spec, background=False) as mon:
        meta = ReportMeta("dev", "m", "1", {"k": "v"}, 60, 60, 3, spec.hash)
        summary = Summary.zero(spec)
        payload = pbwire.encode_envelope(pbwire.encode_report(meta, summary))
        out = pb.ReportEnvelope.FromString(mon._renumbered(payload, 77))
        expected = report_to_proto(meta, summary)
        expected.seq = 77
        assert pb.WindowReport.FromString(out.report) == expected
        assert out.signature == b"" and out.key_id == ""


# -- ReportResponse ------------------------------------------------------------------------------

_UNKNOWN_FIELDS = st.lists(st.one_of(
    st.tuples(st.integers(4, 2**29 - 1), st.just(0), _U64.map(_varint)),
    st.tuples(st.integers(4, 2**29 - 1), st.just(1), st.binary(min_size=8, max_size=8)),
    st.tuples(st.integers(4, 2**29 - 1), st.just(2), st.binary(max_size=20)),
    st.tuples(st.integers(4, 2**29 - 1), st.just(5), st.binary(min_size=4, max_size=4)),
    # a known field with the wrong wire type: protobuf takes it for an unknown one
    st.tuples(st.integers(1, 3), st.just(2), st.binary(max_size=5)),
    st.tuples(st.integers(1, 3), st.just(1), st.binary(min_size=8, max_size=8)),
), max_size=4).map(lambda fs: b"".join(_field(n, t, p) for n, t, p in fs))


def _agrees_with_protobuf(data: bytes) -> None:
    try:
        expected = pb.ReportResponse.FromString(data)
    except DecodeError:
        with pytest.raises(pbwire.WireError):
            pbwire.decode_report_response(data)
        return
    got = pbwire.decode_report_response(data)
    assert (got.status, got.seq, got.high_water_mark) == (
        expected.status, expected.seq, expected.high_water_mark)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.sampled_from(pb.ReportResponse.Status.values()), _I32), _U64, _U64,
       _UNKNOWN_FIELDS, _UNKNOWN_FIELDS)
def test_report_response_decodes_like_protobuf(status, seq, mark, before, after):
    msg = pb.ReportResponse(status=status, seq=seq, high_water_mark=mark).SerializeToString()
    got = pbwire.decode_report_response(msg)
    assert (got.status, got.seq, got.high_water_mark) == (status, seq, mark)
    _agrees_with_protobuf(before + msg + after)  # unknown fields around it: skipped
    _agrees_with_protobuf(msg + msg[:0] + _field(1, 0, _varint(pbwire.DUPLICATE)))


def test_unknown_fields_including_a_group_are_skipped():
    msg = pb.ReportResponse(status=pb.ReportResponse.STALE_SEQ, seq=3, high_water_mark=40)
    group = _field(9, 3, _field(1, 0, b"\x01") + _field(2, 2, b"xy")) + _varint(9 << 3 | 4)
    data = group + msg.SerializeToString() + _field(77, 5, b"abcd")
    _agrees_with_protobuf(data)
    assert pbwire.decode_report_response(data) == pbwire.ReportResponse(3, 3, 40)


def test_empty_response_is_all_defaults():
    assert pbwire.decode_report_response(b"") == pbwire.ReportResponse(0, 0, 0)


def test_truncated_response_is_refused_clearly():
    data = pb.ReportResponse(status=pb.ReportResponse.ACCEPTED, seq=2**40,
                             high_water_mark=2**63).SerializeToString() + _field(5, 2, b"abc")
    refused = 0
    for cut in range(len(data)):
        _agrees_with_protobuf(data[:cut])  # a cut at a field boundary is a valid message
        try:
            pbwire.decode_report_response(data[:cut])
        except pbwire.WireError as e:
            refused += 1
            assert "truncated" in str(e)
    assert refused >= len(data) - 4
    for bad in (b"\x08" + b"\xff" * 10 + b"\x01", b"\x0f", b"\x00\x01", b"\x0c"):
        with pytest.raises(pbwire.WireError):  # varint too long, wire type 7, field 0, end
            pbwire.decode_report_response(bad)
        with pytest.raises(DecodeError):
            pb.ReportResponse.FromString(bad)


class _Channel:
    """Answers each Report call with the given bytes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def unary_unary(self, method, request_serializer, response_deserializer):
        assert request_serializer is None and response_deserializer is None
        return lambda payload, timeout: self.answer


def test_uploader_retries_on_an_undecodable_response(tmp_path):
    from agent.spool import Spool

    spool = Spool(tmp_path / "spool.sqlite")
    try:
        spool.enqueue(0, lambda seq, dropped: b"envelope")
        up = Uploader(spool, _Channel(b"\x08\x96"))  # truncated varint
        assert up.deliver() is DeliveryResult.RETRY_LATER
        assert "undecodable ReportResponse" in up.last_error
        assert [r.seq for r in spool.pending()] == [1]
        up = Uploader(spool, _Channel(pb.ReportResponse(status=pb.ReportResponse.DUPLICATE,
                                                        seq=1).SerializeToString()))
        assert up.deliver() is DeliveryResult.EMPTY and up.duplicates == 1
    finally:
        spool.close()


# -- Spec (GetSpec) ------------------------------------------------------------------------------

def _same_as_protobuf(got, expected) -> None:
    """Field by field over the descriptor: what decode_spec reads is what protobuf parsed."""
    for f in expected.DESCRIPTOR.fields:
        mine, theirs = getattr(got, f.name), getattr(expected, f.name)
        if f.message_type is not None:
            if f.is_repeated:
                assert len(mine) == len(theirs), f.name
                for a, b in zip(mine, theirs, strict=True):
                    _same_as_protobuf(a, b)
            else:
                assert got.HasField(f.name) == expected.HasField(f.name), f.name
                _same_as_protobuf(mine, theirs)
        elif f.is_repeated:
            assert [repr(x) for x in mine] == [repr(x) for x in theirs], f.name
        else:
            assert repr(mine) == repr(theirs), f.name


_feature_pb = st.builds(pb.FeatureSpec, name=_TEXT, type=_I32,
                        edges=st.lists(_DOUBLE, max_size=5), vocabulary=st.lists(_TEXT, max_size=3),
                        reference_counts=st.lists(_I64, max_size=5))


@st.composite
def pb_specs(draw) -> pb.Spec:
    msg = pb.Spec(model=draw(_TEXT), model_version=draw(_TEXT),
                  features=draw(st.lists(_feature_pb, max_size=3)),
                  window_length_s=draw(_I32), hash=draw(_TEXT), created_unix_s=draw(_I64),
                  reference_rows=draw(_I64))
    if draw(st.booleans()):
        msg.prediction.CopyFrom(draw(_feature_pb))
    if draw(st.booleans()):
        msg.latency.reference_kll = draw(st.binary(max_size=10))
    if draw(st.booleans()):
        msg.privacy.CopyFrom(pb.PrivacySpec(
            unit=draw(_I32), mechanism=draw(_I32), epsilon_per_window=draw(_DOUBLE),
            delta=draw(_DOUBLE), daily_epsilon_budget=draw(_DOUBLE),
            max_events_per_window=draw(st.integers(0, 2**32 - 1))))
    if draw(st.booleans()):
        msg.labels.CopyFrom(pb.LabelSpec(
            task=draw(_I32), classes=draw(st.lists(_TEXT, max_size=3)),
            threshold=draw(_DOUBLE), calibration_edges=draw(st.lists(_DOUBLE, max_size=4)),
            residual_edges=draw(st.lists(_DOUBLE, max_size=4)),
            latency_edges=draw(st.lists(_DOUBLE, max_size=4))))
    return msg


@settings(max_examples=200, deadline=None)
@given(pb_specs(), _UNKNOWN_FIELDS)
def test_spec_decodes_like_protobuf(msg, unknown):
    data = msg.SerializeToString()
    _same_as_protobuf(pbwire.decode_spec(data), msg)
    _spec_agrees_with_protobuf(unknown + data)
    _spec_agrees_with_protobuf(data + unknown)


def _spec_agrees_with_protobuf(data: bytes) -> None:
    try:
        expected = pb.Spec.FromString(data)
    except DecodeError:
        with pytest.raises(pbwire.WireError):
            pbwire.decode_spec(data)
        return
    _same_as_protobuf(pbwire.decode_spec(data), expected)


def test_a_truncated_singular_message_is_refused_even_when_another_copy_follows():
    # The first `prediction` claims a 60-byte name it does not hold; merged by concatenation,
    # it would borrow the second copy's bytes. Protobuf refuses it (found by hypothesis).
    data = _field(4, 2, b"\x12<" + b"\x00" * 6) + _field(4, 2, _field(1, 2, b"x" * 60))
    with pytest.raises(DecodeError):
        pb.Spec.FromString(data)
    with pytest.raises(pbwire.WireError, match="truncated"):
        pbwire.decode_spec(data)


def test_spec_decoding_merges_repeated_messages_and_reads_unpacked_numbers():
    # A singular message given twice is merged; numbers may come unpacked (both are legal).
    data = (_field(1, 2, b"m") + _field(2, 2, b"1")
            + _field(3, 2, _field(1, 2, b"x") + _field(3, 1, struct.pack("<d", -0.5))
                     + _field(3, 1, struct.pack("<d", 2.0)) + _field(5, 0, _varint(2**64 - 3)))
            + _field(10, 2, _field(1, 0, b"\x02")) + _field(10, 2, _field(6, 0, _varint(7)))
            + _field(6, 0, _varint(2**64 - 1)))
    expected = pb.Spec.FromString(data)
    got = pbwire.decode_spec(data)
    _same_as_protobuf(got, expected)
    assert list(got.features[0].edges) == [-0.5, 2.0]
    assert got.features[0].reference_counts == [-3]
    assert (got.privacy.unit, got.privacy.max_events_per_window) == (2, 7)
    assert got.window_length_s == -1


SPECS = [
    Spec("detector", "3", (FeatureSpec("b", NUMERIC, edges=(-0.5, 0.0, 1e300),
                                       reference_counts=(0, 1, 2**62, 3, 4)),
                           FeatureSpec("scene", CATEGORICAL, vocabulary=("day", "ünï"))),
         prediction=FeatureSpec("label", CATEGORICAL, vocabulary=("cat", "dog")),
         latency_reference_kll=b"\x00kll", window_length_s=300, reference_rows=12345,
         created_unix_s=1_700_000_123),
    Spec("m", "v", (), privacy=PrivacySpec(DEVICE_DAY, DISCRETE_GAUSSIAN, 0.5, 1e-7, 3.0, 20),
         labels=LabelSpec(MULTICLASS, classes=("a", "b", "c"), calibration_edges=(0, 0.5, 1))),
    Spec("m", "v", (FeatureSpec("x", NUMERIC, edges=(0.0, 1.0)),),
         privacy=PrivacySpec(mechanism=NO_NOISE, epsilon_per_window=0.0),
         labels=LabelSpec(REGRESSION, residual_edges=(-1, 0, 1))),
]


@pytest.mark.parametrize("spec", SPECS)
def test_spec_from_hand_decoded_bytes_round_trips(spec):
    data = spec_to_proto(spec).SerializeToString()
    back = spec_from_proto(pbwire.decode_spec(data))
    assert back == spec and back.hash == spec.hash
    assert back.created_unix_s == spec.created_unix_s and back.labels == spec.labels
    assert back == spec_from_proto(pb.Spec.FromString(data))


def test_spec_without_privacy_gets_the_default():
    msg = spec_to_proto(SPECS[0])
    msg.ClearField("privacy")
    msg.hash = ""
    assert spec_from_proto(pbwire.decode_spec(msg.SerializeToString())).privacy == PrivacySpec()


def test_malformed_spec_is_refused():
    data = spec_to_proto(SPECS[0]).SerializeToString()
    for cut in range(len(data)):
        _spec_agrees_with_protobuf(data[:cut])
    bad_utf8 = _field(1, 2, b"\xff\xfe")
    with pytest.raises(DecodeError):
        pb.Spec.FromString(bad_utf8)
    with pytest.raises(pbwire.WireError, match="UTF-8"):
        pbwire.decode_spec(bad_utf8)
    with pytest.raises(pbwire.WireError, match="multiple of 8"):
        pbwire.decode_spec(_field(3, 2, _field(3, 2, b"\x00" * 7)))


@pytest.mark.parametrize("model, version, spec_hash", [("m", "", ""), ("détecteur", "3", "ab")])
def test_get_spec_request_is_what_protobuf_writes(model, version, spec_hash):
    assert pbwire.encode_get_spec_request(model, version, spec_hash) == pb.GetSpecRequest(
        model=model, model_version=version, hash=spec_hash).SerializeToString()


# -- no protobuf on a device -------------------------------------------------------------------

_DEVICE = textwrap.dedent("""
    import sys, tempfile, time
    from agent import Monitor
    from agent.spec import FeatureSpec, PrivacySpec, Spec
    spec = Spec("m", "1", tuple(FeatureSpec(f"f{i}", "numeric", edges=(0.0, 1.0, 2.0))
                                for i in range(5)), privacy=PrivacySpec(epsilon_per_window=1.0))
    now = [1_700_000_000.0]
    with tempfile.TemporaryDirectory() as d:
        mon = Monitor("m", "1", "dev", {"region": "eu"}, aggregator=sys.argv[1], spool_dir=d,
                      spec=spec, heartbeats=False, clock=lambda: now[0], background=False,
                      rpc_timeout_s=0.5)
        for _ in range(20):
            mon.observe({f.name: 0.5 for f in spec.features}, latency_ms=3.0)
        now[0] += spec.window_length_s + mon.grace_s + 1
        assert mon.poll(timeout_s=1.0) is False  # nobody listens: the report stays spooled
        stats = mon.stats()
        assert stats.windows_closed == 1 and stats.spool.pending == 1, stats
        assert stats.last_delivery_error, stats
        loaded = sorted(m for m in sys.modules if "protobuf" in m or "_pb2" in m)
        mon.close(timeout_s=0.5)
    print("loaded:", loaded)
""")


def test_a_device_ships_a_window_without_loading_protobuf():
    with socket.socket() as s:  # a port nobody listens on: the attempt is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", _DEVICE, f"127.0.0.1:{port}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "loaded: []"
