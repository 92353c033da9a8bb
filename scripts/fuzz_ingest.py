"""Fuzz the ingest path: mutated valid reports and raw bytes into `Ingestor.ingest` on a real
SqliteStore, checking after every case what must hold whatever the input:

- ingest returns ACCEPTED / DUPLICATE (or another outcome) or raises `IngestRejected`; any
  other exception is a crash (its input is saved);
- every refusal increments exactly one reason counter, and every case exactly one counter;
- KLL bytes that pass `aggregator.kll_check` are first run through deserialize, merge and
  quantiles in a child process (`KllOracle`): a segfault or a hang there is reported with its
  input instead of killing this process;
- at the end, the store's rollups at every resolution hold exactly the sum of the accepted
  reports (nothing lost, nothing counted twice).

    .venv/bin/python scripts/fuzz_ingest.py --cases 100000            # plain mutation loop
    .venv/bin/python scripts/fuzz_ingest.py --atheris -- -runs=100000  # coverage-guided

Mutations are drawn through a `Chooser` (a random.Random here, hypothesis' data in
tests/aggregator/test_fuzz_ingest.py, atheris' FuzzedDataProvider with --atheris), so the
three drivers share one mutation vocabulary (`mutate`).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import random
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasketches import kll_floats_sketch  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402

from agent.errors import SketchError  # noqa: E402
from agent.spec import (  # noqa: E402
    BINARY,
    CATEGORICAL,
    DISCRETE_LAPLACE,
    NO_NOISE,
    NUMERIC,
    FeatureSpec,
    LabelSpec,
    PrivacySpec,
    Spec,
)
from agent.summary import LABEL_HISTOGRAMS, Summary  # noqa: E402
from agent.wire import ReportMeta, report_to_proto  # noqa: E402
from aggregator.ingest import Ingestor, IngestRejected  # noqa: E402
from aggregator.kll_check import check_kll_floats  # noqa: E402
from aggregator.store.base import IngestOutcome, rollup_resolutions  # noqa: E402
from aggregator.store.sqlite import SqliteStore  # noqa: E402
from aggregator.validate import Limits  # noqa: E402
from protos import fleetwatch_pb2 as pb  # noqa: E402

WINDOW_S = 60
# Small cardinality limits, so that the fuzzer reaches them.
LIMITS = Limits(max_label_values_per_key=6, max_label_keys_per_model=8)
ORACLE_TIMEOUT_S = 30.0


def make_specs() -> tuple[Spec, Spec]:
    """An exact spec (numeric and categorical features, a prediction) and a noisy one with
    binary labels."""
    ref = kll_floats_sketch(200)
    ref.update(np.random.default_rng(3).lognormal(2.5, 0.5, 3000).astype(np.float32))
    features = (FeatureSpec("temp", NUMERIC, edges=(-1.0, 0.0, 1.0)),
                FeatureSpec("scene", CATEGORICAL, vocabulary=("in", "out")))
    exact = Spec(model="fuzz", model_version="exact", features=features,
                 prediction=FeatureSpec("score", NUMERIC, edges=(0.0, 0.5, 1.0)),
                 latency_reference_kll=ref.serialize(), window_length_s=WINDOW_S,
                 privacy=PrivacySpec(mechanism=NO_NOISE))
    noisy = Spec(model="fuzz", model_version="noisy", features=features[:1],
                 prediction=FeatureSpec("score", NUMERIC, edges=(0.0, 0.5, 1.0)),
                 window_length_s=WINDOW_S,
                 privacy=PrivacySpec(mechanism=DISCRETE_LAPLACE, epsilon_per_window=1.0),
                 labels=LabelSpec(task=BINARY, classes=("no", "yes")))
    return exact, noisy


def _exact_counts(rng: np.random.Generator, length: int, n: int) -> np.ndarray:
    return rng.multinomial(n, np.full(length, 1.0 / length)).astype(np.int64)


def base_reports(specs: Sequence[Spec], now: float, seed: int = 0) -> list[pb.WindowReport]:
    """Valid reports of every shape: empty, single-item and full KLL forms, withheld and
    heartbeat reports, several label sets and windows (all in the last hour)."""
    rng = np.random.default_rng(seed)
    exact, noisy = specs
    out: list[pb.WindowReport] = []
    last = int(now) // WINDOW_S * WINDOW_S - WINDOW_S
    for i, (spec, n) in enumerate([(exact, 0), (exact, 1), (exact, 7), (exact, 300),
                                   (exact, 5000), (noisy, 1), (noisy, 50), (noisy, 2000)]):
        s = Summary.zero(spec)
        noise = 0 if spec is exact else 3
        for f in spec.features:
            s.features[f.name] = _exact_counts(rng, f.histogram_length, n) + rng.integers(
                -noise, noise + 1, f.histogram_length)
        assert spec.prediction is not None
        s.prediction = _exact_counts(rng, spec.prediction.histogram_length, n)
        if spec.labels is not None:
            labeled = n // 2
            s.labeled_count = labeled
            for name in spec.labels.histograms:
                length = spec.labels.histogram_length(name)
                setattr(s, name, _exact_counts(rng, length, labeled)
                        + rng.integers(-noise, noise + 1, length))
        if n:
            s.latency.update(rng.lognormal(3.0, 0.7, n).astype(np.float32))
        s.event_count, s.error_count = n, n // 10
        meta = ReportMeta(device_id="dev", model=spec.model, model_version=spec.model_version,
                          labels={"region": ["eu", "us"][i % 2], "hw": "jetson"},
                          window_start_unix_s=last - WINDOW_S * (i % 5), window_length_s=WINDOW_S,
                          seq=1, spec_hash=spec.hash, created_unix_ms=int(now * 1000) - 5000,
                          agent_version="fleetwatch-agent/0.1",
                          epsilon_spent=0.0 if spec is exact else 1.0,
                          day_epsilon_spent=0.0 if spec is exact else 3.0)
        out.append(report_to_proto(meta, s))
    withheld = ReportMeta(device_id="dev", model=noisy.model, model_version=noisy.model_version,
                          labels={"region": "eu"}, window_start_unix_s=last,
                          window_length_s=WINDOW_S, seq=1, spec_hash=noisy.hash,
                          private_withheld=True, day_epsilon_spent=10.0)
    s = Summary.zero(noisy)
    s.event_count = 10
    s.latency.update(np.arange(10, dtype=np.float32))
    out.append(report_to_proto(withheld, s))
    heartbeat = ReportMeta(device_id="dev", model=exact.model, model_version=exact.model_version,
                           labels={"region": "us"}, window_start_unix_s=last - WINDOW_S,
                           window_length_s=WINDOW_S, seq=1, spec_hash=exact.hash, heartbeat=True)
    out.append(report_to_proto(heartbeat, Summary.zero(exact)))
    return out


# -- the mutation vocabulary ---------------------------------------------------------------------

class Chooser(Protocol):
    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        ...

    def bytes(self, max_len: int) -> bytes: ...


def pick(c: Chooser, items: Sequence[Any]) -> Any:
    return items[c.int(0, len(items) - 1)]


class RandomChooser:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def bytes(self, max_len: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_len))


INT_FIELDS = ("window_start_unix_s", "window_length_s", "seq", "event_count", "error_count",
              "late_event_count", "invalid_value_count", "unknown_feature_count",
              "spool_dropped_count", "created_unix_ms", "clamped_event_count", "labeled_count",
              "labels_unmatched_count", "label_cache_evicted_count", "clamped_label_count")
BOOL_FIELDS = ("private_withheld", "heartbeat")
FLOAT_FIELDS = ("epsilon_spent", "day_epsilon_spent")
STR_FIELDS = ("device_id", "model", "model_version", "spec_hash", "agent_version")
EDGE_INTS = (0, 1, 2, 3, 59, 60, 61, 255, 256, (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 32) + 1,
             1 << 53, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
EDGE_FLOATS = (0.0, -0.0, 1.0, -1.0, 1e6, 1e6 + 1, 1e308, -1e308, 5e-324, float("nan"),
               float("inf"), float("-inf"))
EDGE_FLOAT32S = (0.0, -0.0, 1.0, -1.0, 1e6, 3.4e38, -3.4e38, 1e-45, float("nan"), float("inf"),
                 float("-inf"))
STRINGS = ("", "d", "dev-x", "x" * 129, "y" * 300, "\x00", "a\nb", "a\tb", "\x7f", "\u202e",
           "\u2028", "\ufeff", " pad", "pad ", "é", "Zürich", "=", ",", "a=b", "a,b", "\u00a0",
           "fuzz", "exact", "noisy", "0" * 64, "🙂")
HUGE_VARINTS = (b"\xff" * 9 + b"\x01", b"\x80" * 10, b"\xff" * 11, b"\x0a\xff\xff\xff\xff\x0f",
                b"\x12\xff\xff\xff\xff\x07", b"\x5a\xff\xff\xff\x7f", b"\x08\xff\xff\xff\xff"
                b"\xff\xff\xff\xff\xff\x01")


def _int_value(c: Chooser, current: int) -> int:
    roll = c.int(0, 3)
    if roll == 0:
        return pick(c, EDGE_INTS) * pick(c, (1, 1, -1))
    if roll == 1:
        return current + c.int(-3, 3)
    if roll == 2:
        return current * pick(c, (2, 10, -1)) + pick(c, (0, WINDOW_S, -WINDOW_S, 86400 * 365))
    return c.int(-(1 << 63), (1 << 64) - 1)


def _histograms(msg: pb.WindowReport) -> list[Any]:
    out = [f.histogram.counts for f in msg.features]
    out.append(msg.prediction.counts)
    out.extend(getattr(msg, name).counts for name in LABEL_HISTOGRAMS)
    return out


def _mutate_kll(c: Chooser, blob: bytes, others: Sequence[bytes]) -> bytes:
    b = bytearray(blob)
    op = c.int(0, 8)
    if not b or op == 0:
        return pick(c, others)  # a valid sketch, maybe not this report's
    if op == 1:
        for _ in range(c.int(1, 3)):
            b[c.int(0, len(b) - 1)] ^= 1 << c.int(0, 7)
    elif op == 2:
        b[c.int(0, len(b) - 1)] = c.int(0, 255)
    elif op == 3:
        del b[c.int(0, len(b) - 1):]
    elif op == 4:
        b += c.bytes(16)
    elif op == 5 and len(b) >= 16:  # forged n
        struct.pack_into("<Q", b, 8, pick(c, EDGE_INTS) % (1 << 64))
    elif op == 6 and len(b) >= 24:  # forged level count or offset
        if c.int(0, 1):
            b[18] = c.int(0, 255)
        else:
            h = c.int(0, max(0, min(b[18], (len(b) - 24) // 4)))
            struct.pack_into("<I", b, 20 + 4 * h, c.int(0, (1 << 32) - 1))
    elif op == 7 and len(b) >= 16:  # an item set to a special value
        pos = c.int(8, len(b) - 4) & ~3
        struct.pack_into("<f", b, pos, pick(c, EDGE_FLOAT32S))
    elif len(b) >= 8:  # two aligned 4-byte items swapped
        i, j = (c.int(0, (len(b) - 4) // 4) * 4 for _ in range(2))
        b[i:i + 4], b[j:j + 4] = b[j:j + 4], b[i:i + 4]
    else:
        b[c.int(0, len(b) - 1)] ^= 0xFF
    return bytes(b)


def _mutate_fields(c: Chooser, msg: pb.WindowReport, kll_pool: Sequence[bytes]) -> None:
    op = c.int(0, 13)
    try:
        if op == 0:
            name = pick(c, INT_FIELDS)
            setattr(msg, name, _int_value(c, getattr(msg, name)))
        elif op == 1:
            name = pick(c, BOOL_FIELDS)
            setattr(msg, name, not getattr(msg, name))
        elif op == 2:
            setattr(msg, pick(c, FLOAT_FIELDS), pick(c, EDGE_FLOATS))
        elif op == 3:
            setattr(msg, pick(c, STR_FIELDS), pick(c, STRINGS))
        elif op == 4:  # a label set, changed or new: values from a small pool hit the limits
            key = pick(c, ("region", "hw", "site", "k3", "k4", "k5", "k6", "k7", "", "a=b",
                           "\x01"))
            msg.labels[key] = pick(c, tuple(f"r{i}" for i in range(12)) + STRINGS)
        elif op == 5:
            if msg.labels:
                del msg.labels[pick(c, sorted(msg.labels))]
            else:
                for i in range(c.int(1, 40)):
                    msg.labels[f"key{i}"] = "v"
        elif op == 6:
            counts = pick(c, _histograms(msg))
            roll = c.int(0, 3)
            if roll == 0:
                counts.append(_int_value(c, 0) % (1 << 63) * pick(c, (1, -1)))
            elif roll == 1 and len(counts):
                del counts[-1]
            elif len(counts):
                i = c.int(0, len(counts) - 1)
                counts[i] = max(-(1 << 63), min((1 << 63) - 1, _int_value(c, counts[i])))
        elif op == 7 and msg.features:
            f = msg.features[c.int(0, len(msg.features) - 1)]
            f.name = pick(c, ("temp", "scene", "score", "", "x" * 300, "Temp"))
        elif op == 8 and msg.features:
            roll = c.int(0, 2)
            i = c.int(0, len(msg.features) - 1)
            if roll == 0:
                del msg.features[i]
            elif roll == 1:
                msg.features.add().CopyFrom(msg.features[i])
            else:
                msg.features.reverse()
        elif op == 9:
            msg.ClearField(pick(c, ("prediction", "latency_kll", "features", "labels")
                               + LABEL_HISTOGRAMS))
        elif op in (10, 11):
            msg.latency_kll = _mutate_kll(c, msg.latency_kll, kll_pool)
        elif op == 12:  # counts consistent with each other but far from the truth
            n = _int_value(c, msg.event_count) % (1 << 64)
            msg.event_count = n
            for counts in _histograms(msg)[:len(msg.features)]:
                if len(counts):
                    counts[0] += min(n, 1 << 40)
        else:
            msg.error_count = msg.event_count + pick(c, (0, 1))
            msg.late_event_count = msg.event_count + pick(c, (0, 1))
    except (ValueError, TypeError, IndexError, OverflowError):
        pass  # a value the field cannot hold: the mutation does not apply


def _mutate_bytes(c: Chooser, data: bytes) -> bytes:
    b = bytearray(data)
    op = c.int(0, 5)
    if not b:
        return bytes(c.bytes(8))
    if op == 0:
        for _ in range(c.int(1, 4)):
            b[c.int(0, len(b) - 1)] ^= 1 << c.int(0, 7)
    elif op == 1:
        b[c.int(0, len(b) - 1)] = c.int(0, 255)
    elif op == 2:
        del b[c.int(0, len(b) - 1):]
    elif op == 3:
        pos = c.int(0, len(b))
        b[pos:pos] = pick(c, HUGE_VARINTS)
    elif op == 4:  # a slice repeated (protobuf merges repeated and repeated-message fields)
        i = c.int(0, len(b) - 1)
        j = c.int(i, min(len(b), i + 64))
        b[j:j] = b[i:j]
    else:
        i = c.int(0, len(b) - 1)
        del b[i:i + c.int(1, 16)]
    return bytes(b)


@dataclass
class Case:
    """One input: how it was made, and the envelope bytes."""

    kind: str
    data: bytes


def mutate(c: Chooser, bases: Sequence[pb.WindowReport], kll_pool: Sequence[bytes],
           device: str, seq: int, last_accepted: bytes | None) -> Case:
    """One fuzz case: mostly a valid base report under field and byte mutations, sometimes raw
    bytes, sometimes a resend of the last accepted envelope (a duplicate)."""
    roll = c.int(0, 19)
    if roll == 0:
        return Case("raw", c.bytes(256))
    if roll == 1:  # (draws must not depend on state: hypothesis replays cases)
        return Case("resend", last_accepted or b"")
    msg = pb.WindowReport()
    msg.CopyFrom(pick(c, bases))
    msg.device_id, msg.seq = device, seq
    kinds = []
    for _ in range(c.int(0, 3)):
        _mutate_fields(c, msg, kll_pool)
        kinds.append("field")
    report = msg.SerializeToString()
    if c.int(0, 4) == 0:
        report = _mutate_bytes(c, report)
        kinds.append("report-bytes")
    env = pb.ReportEnvelope(report=report)
    if c.int(0, 9) == 0:
        env.signature, env.key_id = c.bytes(80), pick(c, STRINGS)
    data = env.SerializeToString()
    if c.int(0, 9) == 0:
        data = _mutate_bytes(c, data)
        kinds.append("envelope-bytes")
    return Case("+".join(kinds) or "valid", data)


# -- the datasketches oracle -----------------------------------------------------------------------

ORACLE_CHILD = r"""
import struct, sys
import numpy as np
import datasketches as ds

probe = ds.kll_floats_sketch(200)
probe.update(np.linspace(-10, 100, 1000).astype(np.float32))
fleet = ds.kll_floats_sketch(200)
inp, out = sys.stdin.buffer, sys.stdout
while True:
    head = inp.read(4)
    if len(head) < 4:
        break
    blob = inp.read(struct.unpack("<I", head)[0])
    try:
        s = ds.kll_floats_sketch.deserialize(blob)
        fleet.merge(s)
        fresh = ds.kll_floats_sketch(8)
        fresh.merge(s)
        fresh.merge(probe)
        if not s.is_empty():
            s.get_quantiles([0.0, 0.01, 0.5, 0.95, 0.99, 1.0])
            s.get_rank(s.get_quantile(0.3))
            s.get_cdf([1.0, 10.0])
        s.merge(probe)
        ds.kll_floats_sketch.deserialize(s.serialize()).get_quantile(0.5)
        if not fleet.is_empty():
            fleet.get_quantile(0.5)
        out.write("ok\n")
    except Exception as exc:
        out.write("error " + repr(exc).replace("\n", " ") + "\n")
    out.flush()
"""


class OracleCrash(AssertionError):
    """datasketches crashed or hung on bytes the KLL check passed."""


class KllOracle:
    """A child process that runs every KLL blob the check passes through deserialize, merge
    and quantiles before this process does: a crash kills the child, not the fuzzer."""

    def __init__(self, timeout_s: float = ORACLE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.proven: set[bytes] = set()
        self.calls = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-c", ORACLE_CHILD],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self._proc

    def prove(self, blob: bytes) -> None:
        if blob in self.proven:
            return
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        self.calls += 1
        try:
            proc.stdin.write(struct.pack("<I", len(blob)) + blob)
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s)
        line = proc.stdout.readline() if ready else b""
        if not line:  # end of file: the child died; nothing ready: it hangs
            self.close()
            raise OracleCrash(f"datasketches {'crashed' if ready else 'hung'} "
                              f"(exit {proc.returncode}) on KLL bytes the check passed: "
                              f"{blob.hex()}")
        # A Python-level error from datasketches is harmless (ingest maps it to a refusal).
        self.proven.add(blob)

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    stream.close()
            self._proc = None


# -- the harness -------------------------------------------------------------------------------

@dataclass
class Totals:
    """What the accepted reports of one spec add up to, counted from the reports themselves."""

    reports: int = 0
    events: int = 0
    errors: int = 0
    labeled: int = 0
    latencies: int = 0
    histograms: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, msg: pb.WindowReport, latency_n: int) -> None:
        self.reports += 1
        self.events += msg.event_count
        self.errors += msg.error_count
        self.labeled += msg.labeled_count
        self.latencies += latency_n
        parts = {f"feature:{f.name}": list(f.histogram.counts) for f in msg.features}
        if msg.HasField("prediction"):
            parts["prediction"] = list(msg.prediction.counts)
        for name in LABEL_HISTOGRAMS:
            if msg.HasField(name):
                parts[name] = list(getattr(msg, name).counts)
        for key, counts in parts.items():
            arr = np.asarray(counts, dtype=np.int64)
            self.histograms[key] = self.histograms.get(key, 0) + arr


class Harness:
    """An Ingestor on a real SqliteStore, and the invariants checked around every case."""

    def __init__(self, db: pathlib.Path, seed: int = 0) -> None:
        self.now = time.time()
        self.specs = make_specs()
        self.store = SqliteStore(db)
        for spec in self.specs:
            self.store.put_spec(spec)
        self.ingestor = Ingestor(self.store, LIMITS)
        self.bases = base_reports(self.specs, self.now, seed)
        self.kll_pool = sorted({b.latency_kll for b in self.bases if b.latency_kll})
        self.oracle = KllOracle()
        self.totals = {spec.hash: Totals() for spec in self.specs}
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.cases = 0
        self.last_accepted: bytes | None = None

    def next_case(self, c: Chooser) -> Case:
        # A fresh device per case: a mutated seq raises only that device's high-water mark.
        self.cases += 1
        return mutate(c, self.bases, self.kll_pool, f"dev-{self.cases:09d}", 1,
                      self.last_accepted)  # fixed length: draws must not depend on state

    def _latency_bytes(self, data: bytes) -> bytes:
        try:
            return pb.WindowReport.FromString(pb.ReportEnvelope.FromString(data).report
                                              ).latency_kll
        except DecodeError:
            return b""

    def run(self, case: Case) -> str:
        """Ingest one case and check the per-case invariants; returns the outcome or reason."""
        self.by_kind[case.kind] += 1
        kll = self._latency_bytes(case.data)
        if kll:
            try:
                check_kll_floats(kll)  # the loosest bounds ingest applies
            except SketchError:
                pass
            else:
                self.oracle.prove(kll)  # raises OracleCrash before this process is at risk
        ing = self.ingestor
        before = ing.stats()
        try:
            outcome = ing.ingest(case.data)
        except IngestRejected as e:
            after = ing.stats()
            diff = {r: n - before.rejected.get(r, 0) for r, n in after.rejected.items()
                    if n != before.rejected.get(r, 0)}
            assert diff == {e.reason: 1}, (diff, e.reason, e)
            assert (after.accepted, after.duplicates) == (before.accepted, before.duplicates)
            self.outcomes[f"rejected:{e.reason}"] += 1
            return e.reason
        after = ing.stats()
        counted = (after.accepted - before.accepted + after.duplicates - before.duplicates
                   + sum(after.rejected.values()) - sum(before.rejected.values()))
        assert counted == 1, (outcome, before, after)
        if outcome is IngestOutcome.ACCEPTED:
            assert after.accepted == before.accepted + 1
            msg = pb.WindowReport.FromString(pb.ReportEnvelope.FromString(case.data).report)
            n = kll_floats_sketch.deserialize(msg.latency_kll).n if msg.latency_kll else 0
            self.totals[msg.spec_hash].add(msg, n)
            self.last_accepted = case.data
        self.outcomes[outcome.value] += 1
        return outcome.value

    def check_totals(self) -> None:
        """The store's rollups, at every resolution, equal the sum of the accepted reports."""
        for spec in self.specs:
            want = self.totals[spec.hash]
            ids = [ls.id for ls in self.store.label_sets(spec.hash)]
            for res in rollup_resolutions(spec.window_length_s):
                merged = self.store.merged_rollups(spec.hash, ids, [(res, 0, 1 << 62)])
                got = Summary.zero(spec)
                for s in merged.values():
                    got.merge_in(s)
                where = f"{spec.model_version} at resolution {res}"
                assert got.report_count == want.reports, (where, got.report_count, want.reports)
                assert got.event_count == want.events, where
                assert got.error_count == want.errors, where
                assert got.labeled_count == want.labeled, where
                assert got.latency.n == want.latencies, where
                for key, counts in want.histograms.items():
                    kind, _, name = key.partition(":")
                    have = (got.features[name] if kind == "feature"
                            else got.prediction if kind == "prediction" else getattr(got, kind))
                    assert np.array_equal(have, counts), (where, key, have, counts)

    def close(self) -> None:
        self.oracle.close()
        self.store.close()

    def summary(self, elapsed_s: float) -> str:
        st = self.ingestor.stats()
        lines = [f"{self.cases} cases in {elapsed_s:.1f} s ({self.cases / elapsed_s:.0f} "
                 f"cases/s); KLL blobs proven in the child: {self.oracle.calls}",
                 f"accepted {st.accepted}, duplicates {st.duplicates}, refused "
                 f"{sum(st.rejected.values())}",
                 "refused by reason: " + ", ".join(f"{r} {n}" for r, n in
                                                   sorted(st.rejected.items())),
                 "cases by kind: " + ", ".join(f"{k} {n}" for k, n in
                                               self.by_kind.most_common(12))]
        return "\n".join(lines)


# -- drivers -------------------------------------------------------------------------------------

def run_loop(cases: int, seed: int, db: pathlib.Path, crash_dir: pathlib.Path,
             report: Callable[[str], None] = print) -> int:
    """The plain mutation loop; returns the number of crashes."""
    harness = Harness(db, seed)
    chooser = RandomChooser(random.Random(seed))
    crashes = 0
    start = time.monotonic()
    try:
        for i in range(cases):
            case = harness.next_case(chooser)
            try:
                harness.run(case)
            except Exception as e:  # a crash: keep its input and go on
                crashes += 1
                crash_dir.mkdir(parents=True, exist_ok=True)
                path = crash_dir / f"crash-{seed}-{i}.bin"
                path.write_bytes(case.data)
                report(f"CRASH case {i} ({case.kind}): {type(e).__name__}: {e} -> {path}")
                if isinstance(e, OracleCrash):
                    break
            if (i + 1) % 20_000 == 0:
                report(f"... {i + 1} cases, {(i + 1) / (time.monotonic() - start):.0f}/s")
        harness.check_totals()
        report("totals: the store's rollups at every resolution equal the sum of the "
               f"{harness.ingestor.stats().accepted} accepted reports")
    finally:
        report(harness.summary(time.monotonic() - start))
        report(f"crashes: {crashes}")
        harness.close()
    return crashes


class FdpChooser:
    def __init__(self, fdp: Any) -> None:
        self.fdp = fdp

    def int(self, lo: int, hi: int) -> int:
        return int(self.fdp.ConsumeIntInRange(lo, hi))

    def bytes(self, max_len: int) -> bytes:
        return bytes(self.fdp.ConsumeBytes(self.fdp.ConsumeIntInRange(0, max_len)))


def run_atheris(argv: list[str], db: pathlib.Path) -> None:
    import atheris  # optional: pip install -e '.[fuzz]'

    harness = Harness(db)
    start = time.monotonic()

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        if fdp.ConsumeBool():  # the input itself, as an envelope
            harness.cases += 1
            harness.run(Case("atheris-raw", fdp.ConsumeBytes(fdp.remaining_bytes())))
        else:
            harness.run(harness.next_case(FdpChooser(fdp)))
        if harness.cases % 20_000 == 0:  # libFuzzer exits without unwinding: check as we go
            harness.check_totals()
            print("totals: the store's rollups at every resolution equal the sum of the "
                  f"{harness.ingestor.stats().accepted} accepted reports")
            print(harness.summary(time.monotonic() - start), flush=True)

    atheris.instrument_all()  # coverage of the (already imported) ingest path guides it
    atheris.Setup([sys.argv[0], *argv], one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--db", type=pathlib.Path, default=None,
                   help="SQLite file (default: in a temporary directory)")
    p.add_argument("--crash-dir", type=pathlib.Path, default=pathlib.Path("fuzz-crashes"))
    p.add_argument("--atheris", action="store_true",
                   help="coverage-guided fuzzing with atheris; arguments after -- go to it")
    ns, rest = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        db = ns.db or pathlib.Path(tmp) / "fuzz.sqlite"
        if ns.atheris:
            run_atheris([a for a in rest if a != "--"], db)
            return 0
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        return 1 if run_loop(ns.cases, ns.seed, db, ns.crash_dir) else 0


if __name__ == "__main__":
    sys.exit(main())
