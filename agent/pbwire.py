"""A small hand-written proto3 wire codec for the messages on the agent's send path.

The protobuf runtime (`google.protobuf`, upb and its descriptor pool) costs a device ~2 MB of
RSS for the few messages an agent sends (docs/performance.md, "Footprint"), so the agent
encodes ReportEnvelope and WindowReport and decodes ReportResponse itself. Only what those
messages use is here: varints (int32/int64/uint64/bool/enum), zigzag sint64, fixed64 double,
length-delimited strings/bytes/messages, packed repeated sint64; and, for the GetSpec answer
of a device not given its spec, a decoder of Spec into objects `agent.wire.spec_from_proto`
reads like protobuf messages. The bytes are those the protobuf library writes (fields in
number order, defaults omitted, map entries with both key and value; the entries of `labels`
in the mapping's order, where protobuf's follow its hash table): tests/agent/test_pbwire.py
checks them against it. The aggregator, and the protobuf functions of `agent.wire`, keep
parsing and building with protobuf.
"""

from __future__ import annotations

import functools
import operator
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from agent.summary import LABEL_HISTOGRAMS

if TYPE_CHECKING:
    from agent.summary import Summary
    from agent.wire import ReportMeta

__all__ = [
    "ACCEPTED",
    "DUPLICATE",
    "STALE_SEQ",
    "STATUS_UNSPECIFIED",
    "ReportResponse",
    "WireError",
    "decode_report_response",
    "decode_spec",
    "encode_get_spec_request",
    "encode_envelope",
    "encode_report",
    "envelope_report",
    "report_with_seq",
]

# ReportResponse.Status (protos/fleetwatch.proto).
STATUS_UNSPECIFIED, ACCEPTED, DUPLICATE, STALE_SEQ = 0, 1, 2, 3

_VARINT, _FIXED64, _LEN, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_U64 = (1 << 64) - 1
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1
_MAX_FIELD = (1 << 29) - 1
_pack_double = struct.Struct("<d").pack

# WindowReport field numbers.
_SEQ = 7
# The Summary counters a WindowReport carries, by field number (uint64 each).
_COUNTERS_BEFORE_FEATURES = (("event_count", 9), ("error_count", 10))
_COUNTERS_AFTER_KLL = (("late_event_count", 14), ("invalid_value_count", 15),
                       ("unknown_feature_count", 16), ("spool_dropped_count", 17))
_COUNTERS_AFTER_EPSILON = (("clamped_event_count", 23), ("labeled_count", 24))
_LABEL_FIELDS = dict(zip(LABEL_HISTOGRAMS, (25, 26, 27, 28), strict=True))
_COUNTERS_AFTER_HEARTBEAT = (("labels_unmatched_count", 30), ("label_cache_evicted_count", 31),
                             ("clamped_label_count", 32))


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message (truncated, bad tag, bad length)."""


# -- encoding ------------------------------------------------------------------------------------

@functools.cache
def _tag(field: int, wire_type: int) -> bytes:
    out = bytearray()
    _put_varint(out, (field << 3) | wire_type)
    return bytes(out)


def _put_varint(out: bytearray, v: int) -> None:
    """Append the varint of 0 <= v < 2**64."""
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _put_len(out: bytearray, field: int, data: bytes) -> None:
    out += _tag(field, _LEN)
    _put_varint(out, len(data))
    out += data


def _put_uint64(out: bytearray, field: int, value: int, name: str) -> None:
    v = operator.index(value)  # like protobuf: ints (numpy's too), never floats
    if not 0 <= v <= _U64:
        raise ValueError(f"{name}: {v} is out of range for uint64")
    if v:  # proto3: a default scalar is not written
        out += _tag(field, _VARINT)
        _put_varint(out, v)


def _put_int(out: bytearray, field: int, value: int, name: str, lo: int, hi: int) -> None:
    """int64 / int32: negative values are sign-extended to 64 bits (10 bytes), as protobuf."""
    v = operator.index(value)
    if not lo <= v <= hi:
        kind = "int32" if hi == _I32_MAX else "int64"
        raise ValueError(f"{name}: {v} is out of range for {kind}")
    if v:
        out += _tag(field, _VARINT)
        _put_varint(out, v & _U64)


def _put_bool(out: bytearray, field: int, value: bool) -> None:
    if value:
        out += _tag(field, _VARINT)
        out.append(1)


def _put_double(out: bytearray, field: int, value: float) -> None:
    data = _pack_double(float(value))
    if data != b"\0" * 8:  # protobuf compares the bits: -0.0 is written, 0.0 is not
        out += _tag(field, _FIXED64)
        out += data


def _put_string(out: bytearray, field: int, value: str, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name}: a str is needed, got {type(value).__name__}")
    if value:
        _put_len(out, field, value.encode("utf-8"))


def _put_bytes(out: bytearray, field: int, value: bytes) -> None:
    if value:
        _put_len(out, field, bytes(value))


def _packed_sint64(counts: np.ndarray) -> bytes:
    """The payload of a packed repeated sint64 (zigzag varints, no tag)."""
    a = np.asarray(counts)
    if a.dtype.kind not in "iu":
        raise TypeError(f"histogram counts must be integers, got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > _I64_MAX:
        raise ValueError("histogram counts: out of range for sint64")
    # A Python loop over the ~10 bins of a histogram: faster than numpy's per-call overhead.
    out = bytearray()
    for v in a.reshape(-1).tolist():
        z = (v << 1) ^ (v >> 63)  # zigzag: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...
        if z < 0x80:
            out.append(z)
        else:
            _put_varint(out, z)
    return bytes(out)


def _put_histogram(out: bytearray, field: int, counts: np.ndarray) -> None:
    """A present Histogram{repeated sint64 counts = 1} (empty counts: an empty message)."""
    packed = _packed_sint64(counts)
    inner = bytearray()
    if packed:
        _put_len(inner, 1, packed)
    _put_len(out, field, bytes(inner))


def encode_report(meta: ReportMeta, summary: Summary) -> bytes:
    """The serialized WindowReport that `agent.wire.report_to_proto(meta, summary)` builds."""
    s = summary
    released = not (meta.private_withheld or meta.heartbeat)  # nothing private otherwise
    out = bytearray()
    _put_string(out, 1, meta.device_id, "device_id")
    _put_string(out, 2, meta.model, "model")
    _put_string(out, 3, meta.model_version, "model_version")
    for k, v in dict(meta.labels).items():
        entry = bytearray()
        # protobuf writes both halves of a map entry, defaults included
        _put_len(entry, 1, _utf8(k, "labels"))
        _put_len(entry, 2, _utf8(v, "labels"))
        _put_len(out, 4, bytes(entry))
    _put_int(out, 5, meta.window_start_unix_s, "window_start_unix_s", _I64_MIN, _I64_MAX)
    _put_int(out, 6, meta.window_length_s, "window_length_s", _I32_MIN, _I32_MAX)
    _put_uint64(out, _SEQ, meta.seq, "seq")
    _put_string(out, 8, meta.spec_hash, "spec_hash")
    for name, field in _COUNTERS_BEFORE_FEATURES:
        _put_uint64(out, field, getattr(s, name), name)
    if released:
        for name, counts in s.features.items():
            feature = bytearray()
            _put_string(feature, 1, name, "features.name")
            _put_histogram(feature, 2, counts)
            _put_len(out, 11, bytes(feature))
        if s.prediction is not None:
            _put_histogram(out, 12, s.prediction)
    if not meta.heartbeat:  # an idle window sends no sketch bytes
        _put_bytes(out, 13, s.latency.serialize())
    for name, field in _COUNTERS_AFTER_KLL:
        _put_uint64(out, field, getattr(s, name), name)
    _put_int(out, 18, meta.created_unix_ms, "created_unix_ms", _I64_MIN, _I64_MAX)
    _put_string(out, 19, meta.agent_version, "agent_version")
    _put_bool(out, 20, meta.private_withheld)
    _put_double(out, 21, meta.epsilon_spent)
    _put_double(out, 22, meta.day_epsilon_spent)
    for name, field in _COUNTERS_AFTER_EPSILON:
        _put_uint64(out, field, getattr(s, name), name)
    if released:
        for name, counts in s.label_histograms().items():
            _put_histogram(out, _LABEL_FIELDS[name], counts)
    _put_bool(out, 29, meta.heartbeat)
    for name, field in _COUNTERS_AFTER_HEARTBEAT:
        _put_uint64(out, field, getattr(s, name), name)
    return bytes(out)


def _utf8(value: str, name: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{name}: a str is needed, got {type(value).__name__}")
    return value.encode("utf-8")


def encode_envelope(report: bytes, signature: bytes = b"", key_id: str = "") -> bytes:
    """A serialized ReportEnvelope{report = 1, signature = 2, key_id = 3}."""
    out = bytearray()
    _put_bytes(out, 1, report)
    _put_bytes(out, 2, signature)
    _put_string(out, 3, key_id, "key_id")
    return bytes(out)


# -- decoding ------------------------------------------------------------------------------------

def _get_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value mod 2**64, position after it); at most 10 bytes, like protobuf."""
    result = shift = 0
    for i in range(pos, min(pos + 10, len(buf))):
        b = buf[i]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _U64, i + 1
        shift += 7
    if len(buf) - pos < 10:
        raise WireError(f"truncated varint at byte {pos} of {len(buf)}")
    raise WireError(f"varint longer than 10 bytes at byte {pos}")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of the field, start of its value, end) for each
    top-level field of a message, unknown ones included; WireError on malformed bytes."""
    pos, n = 0, len(buf)
    while pos < n:
        start = pos
        tag, pos = _get_varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if not 0 < field <= _MAX_FIELD:
            raise WireError(f"bad field number {field} at byte {start}")
        value = pos
        pos = _skip(buf, pos, field, wire_type, start)
        yield field, wire_type, start, value, pos


def _skip(buf: bytes, pos: int, field: int, wire_type: int, start: int) -> int:
    """The position after a field's value."""
    n = len(buf)
    if wire_type == _VARINT:
        return _get_varint(buf, pos)[1]
    if wire_type in (_FIXED64, _FIXED32):
        end = pos + (8 if wire_type == _FIXED64 else 4)
    elif wire_type == _LEN:
        length, pos = _get_varint(buf, pos)
        end = pos + length
    elif wire_type == _START_GROUP:  # proto2 groups: never ours, skipped as protobuf does
        while True:
            if pos >= n:
                raise WireError(f"truncated group (field {field}) from byte {start}")
            at = pos
            tag, pos = _get_varint(buf, pos)
            if tag & 7 == _END_GROUP:
                if tag >> 3 != field:
                    raise WireError(f"mismatched end of group at byte {at}")
                return pos
            pos = _skip(buf, pos, tag >> 3, tag & 7, at)
    else:
        raise WireError(f"bad wire type {wire_type} (field {field}) at byte {start}")
    if end > n:
        raise WireError(f"truncated field {field} at byte {start}: needs {end - start} bytes, "
                        f"{n - start} left")
    return end


@dataclass(frozen=True)
class ReportResponse:
    """The fields of a ReportResponse the agent reads (defaults: 0)."""

    status: int = STATUS_UNSPECIFIED
    seq: int = 0
    high_water_mark: int = 0


def decode_report_response(data: bytes) -> ReportResponse:
    """Parse a ReportResponse{Status status = 1; uint64 seq = 2; uint64 high_water_mark = 3}.

    Unknown fields (a newer aggregator) are skipped; the last occurrence of a field wins, as in
    protobuf. Raises WireError on malformed bytes."""
    buf = bytes(data)
    values = [STATUS_UNSPECIFIED, 0, 0]
    for field, wire_type, _start, value, _end in _fields(buf):
        if 1 <= field <= 3 and wire_type == _VARINT:
            values[field - 1] = _get_varint(buf, value)[0]
    status = values[0] & 0xFFFFFFFF  # an enum is an int32 on the wire
    if status > _I32_MAX:
        status -= 1 << 32
    return ReportResponse(status, values[1], values[2])


def envelope_report(envelope: bytes) -> bytes:
    """The `report` bytes of a serialized ReportEnvelope (field 1; the last one wins)."""
    buf = bytes(envelope)
    report = b""
    for field, wire_type, _start, value, end in _fields(buf):
        if field == 1 and wire_type == _LEN:
            report = buf[_get_varint(buf, value)[1]:end]
    return report


def report_with_seq(report: bytes, seq: int) -> bytes:
    """A serialized WindowReport with its `seq` replaced, every other field's bytes kept.

    The new seq goes where protobuf would write it (before the first field numbered above
    7), so a report in canonical order stays in canonical order."""
    buf = bytes(report)
    new_seq = bytearray()
    _put_uint64(new_seq, _SEQ, seq, "seq")
    out = bytearray()
    placed = False
    for field, wire_type, start, _value, end in _fields(buf):
        if field == _SEQ and wire_type == _VARINT:
            continue  # the old seq (every occurrence: the last would win)
        if not placed and field > _SEQ:
            out += new_seq
            placed = True
        out += buf[start:end]
    if not placed:
        out += new_seq
    return bytes(out)


def encode_get_spec_request(model: str, model_version: str = "", spec_hash: str = "") -> bytes:
    """A serialized GetSpecRequest{model = 1, model_version = 2, hash = 3}."""
    out = bytearray()
    _put_string(out, 1, model, "model")
    _put_string(out, 2, model_version, "model_version")
    _put_string(out, 3, spec_hash, "hash")
    return bytes(out)


# -- Spec (GetSpec's answer) ---------------------------------------------------------------------

# Per message: field number -> (name, kind, repeated, schema of a message field).
_Schema = dict[int, tuple[str, str, bool, "_Schema | None"]]
_FEATURE_SPEC: _Schema = {1: ("name", "string", False, None), 2: ("type", "int32", False, None),
                          3: ("edges", "double", True, None),
                          4: ("vocabulary", "string", True, None),
                          5: ("reference_counts", "int64", True, None)}
_LATENCY_SPEC: _Schema = {1: ("reference_kll", "bytes", False, None)}
_PRIVACY_SPEC: _Schema = {1: ("unit", "int32", False, None), 2: ("mechanism", "int32", False, None),
                          3: ("epsilon_per_window", "double", False, None),
                          4: ("delta", "double", False, None),
                          5: ("daily_epsilon_budget", "double", False, None),
                          6: ("max_events_per_window", "uint32", False, None)}
_LABEL_SPEC: _Schema = {1: ("task", "int32", False, None), 2: ("classes", "string", True, None),
                        3: ("threshold", "double", False, None),
                        4: ("calibration_edges", "double", True, None),
                        5: ("residual_edges", "double", True, None),
                        6: ("latency_edges", "double", True, None)}
_SPEC: _Schema = {1: ("model", "string", False, None), 2: ("model_version", "string", False, None),
                  3: ("features", "message", True, _FEATURE_SPEC),
                  4: ("prediction", "message", False, _FEATURE_SPEC),
                  5: ("latency", "message", False, _LATENCY_SPEC),
                  6: ("window_length_s", "int32", False, None),
                  7: ("hash", "string", False, None),
                  8: ("created_unix_s", "int64", False, None),
                  9: ("reference_rows", "int64", False, None),
                  10: ("privacy", "message", False, _PRIVACY_SPEC),
                  11: ("labels", "message", False, _LABEL_SPEC)}
_DEFAULTS = {"string": "", "bytes": b"", "double": 0.0, "int32": 0, "int64": 0, "uint32": 0}
_unpack_doubles = struct.Struct("<d").iter_unpack


class _Message:
    """A decoded message read like a protobuf one: attributes, and HasField for messages.

    Absent fields read as their defaults (an absent message as an empty one)."""

    def __init__(self, schema: _Schema, values: dict[str, object], present: set[str]) -> None:
        self._schema = schema
        self._present = present
        for name, kind, repeated, sub in schema.values():
            if name in values:
                setattr(self, name, values[name])
            elif repeated:
                setattr(self, name, [])
            elif kind == "message":
                assert sub is not None
                setattr(self, name, _Message(sub, {}, set()))
            else:
                setattr(self, name, _DEFAULTS[kind])

    def HasField(self, name: str) -> bool:  # noqa: N802 - protobuf's name, read by agent.wire
        return name in self._present


def _scalar(kind: str, v: int) -> int:
    if kind == "int64":
        return v - (1 << 64) if v > _I64_MAX else v
    v &= 0xFFFFFFFF  # 32-bit fields keep the low 32 bits, as protobuf
    if kind == "int32" and v > _I32_MAX:
        v -= 1 << 32
    return v


def _decode(buf: bytes, schema: _Schema) -> _Message:
    values: dict[str, object] = {}
    parts: dict[str, list[bytes]] = {}  # a singular message seen twice is merged: concatenated
    for field, wire_type, _start, value, end in _fields(buf):
        spec = schema.get(field)
        if spec is None:
            continue  # unknown (a newer aggregator): skipped
        name, kind, repeated, sub = spec
        if wire_type == _LEN:
            data = buf[_get_varint(buf, value)[1]:end]
            if kind == "message":
                assert sub is not None
                if repeated:
                    values.setdefault(name, []).append(_decode(data, sub))  # type: ignore[union-attr]
                else:
                    parts.setdefault(name, []).append(data)
            elif kind in ("string", "bytes"):
                item: object = data
                if kind == "string":
                    try:
                        item = data.decode("utf-8")
                    except UnicodeDecodeError:
                        raise WireError(f"field {name!r} is not valid UTF-8") from None
                if repeated:
                    values.setdefault(name, []).append(item)  # type: ignore[union-attr]
                else:
                    values[name] = item
            elif repeated:  # packed numbers
                out = values.setdefault(name, [])
                assert isinstance(out, list)
                if kind == "double":
                    if len(data) % 8:
                        raise WireError(f"packed {name!r}: {len(data)} bytes, not a multiple of 8")
                    out.extend(x for (x,) in _unpack_doubles(data))
                else:
                    pos = 0
                    while pos < len(data):
                        v, pos = _get_varint(data, pos)
                        out.append(_scalar(kind, v))
            continue  # a LEN field of a singular number: not ours, skipped as unknown
        if kind == "double" and wire_type == _FIXED64:
            item = struct.unpack_from("<d", buf, value)[0]
        elif kind in ("int32", "int64", "uint32") and wire_type == _VARINT:
            item = _scalar(kind, _get_varint(buf, value)[0])
        else:
            continue  # the wrong wire type for the field: an unknown field to protobuf too
        if repeated:
            values.setdefault(name, []).append(item)  # type: ignore[union-attr]
        else:
            values[name] = item
    for name, chunks in parts.items():
        sub = next(s for n, _k, _r, s in schema.values() if n == name)
        assert sub is not None
        if len(chunks) > 1:
            # Concatenation is protobuf's merge, but only of messages that are each whole:
            # a truncated one must not borrow the next one's bytes (protobuf refuses it).
            for chunk in chunks:
                _decode(chunk, sub)
        values[name] = _decode(b"".join(chunks), sub)
    return _Message(schema, values, set(parts))


def decode_spec(data: bytes) -> _Message:
    """Parse a serialized Spec into what `agent.wire.spec_from_proto` takes in place of a
    `fleetwatch_pb2.Spec` (the GetSpec answer, without protobuf). WireError if malformed."""
    return _decode(bytes(data), _SPEC)
