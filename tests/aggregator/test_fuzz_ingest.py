"""Fuzzing the ingest path with hypothesis, a few thousand cases (scripts/fuzz_ingest.py runs
100,000 and more, and atheris).

Inputs are mutated valid envelopes (field mutations of a valid WindowReport: counts, histogram
lengths, KLL bytes, labels, strings, flags; then bit flips, truncations, huge varints and
repeated slices of the serialized report or envelope), raw bytes, and resends. They go into
`Ingestor.ingest` on a real SqliteStore, and `Harness.run` checks that ingest returns or raises
`IngestRejected`, nothing else; that each refusal increments exactly one reason counter and
each case exactly one counter; and that KLL bytes the layout check passes survive
datasketches in a child process first (a segfault or hang fails the test, and cannot kill
pytest). At the end the store's totals equal the sum of the accepted reports.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import fleetwatch_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_fuzz() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_ingest", ROOT / "scripts" /
                                                  "fuzz_ingest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_ingest"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class HypothesisChooser:
    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def bytes(self, max_len: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_len))


@pytest.fixture
def harness(tmp_path: pathlib.Path) -> Iterator:
    h = fuzz.Harness(tmp_path / "fuzz.sqlite")
    yield h
    h.close()


@pytest.mark.timeout(180)
def test_mutated_reports(harness) -> None:
    @settings(FUZZ, max_examples=1500)
    @given(st.data())
    def one(data: st.DataObject) -> None:
        harness.run(harness.next_case(HypothesisChooser(data)))

    one()
    harness.check_totals()
    st_ = harness.ingestor.stats()
    print("\n" + harness.summary(1.0).split("\n", 1)[1])
    # Every path was exercised: accepted, resent, and refused for many reasons.
    assert st_.accepted > 200 and st_.duplicates > 0
    assert {"malformed", "invalid", "bad_sketch", "unknown_spec"} <= set(st_.rejected)
    assert harness.oracle.calls > 10


@pytest.mark.timeout(120)
def test_raw_bytes(harness) -> None:
    @settings(FUZZ, max_examples=600)
    @given(st.binary(max_size=600))
    def one(data: bytes) -> None:
        harness.cases += 1
        harness.run(fuzz.Case("raw", data))

    one()
    st_ = harness.ingestor.stats()
    assert st_.accepted == 0 and sum(st_.rejected.values()) == harness.cases


@pytest.mark.timeout(120)
def test_kll_bytes(harness) -> None:
    """Reports that are valid but for their latency sketch: mutants of real sketches."""

    @settings(FUZZ, max_examples=600)
    @given(st.data())
    def one(data: st.DataObject) -> None:
        c = HypothesisChooser(data)
        msg = pb.WindowReport()
        msg.CopyFrom(fuzz.pick(c, harness.bases))
        harness.cases += 1
        msg.device_id, msg.seq = f"kll-{harness.cases:09d}", 1
        for _ in range(c.int(1, 3)):
            msg.latency_kll = fuzz._mutate_kll(c, msg.latency_kll, harness.kll_pool)
        harness.run(fuzz.Case("kll", pb.ReportEnvelope(report=msg.SerializeToString())
                              .SerializeToString()))

    one()
    harness.check_totals()
    st_ = harness.ingestor.stats()
    assert st_.rejected["bad_sketch"] > 100 and st_.accepted > 20


def test_the_oracle_reports_crashes_and_hangs() -> None:
    """The child-process guard itself can fail: a dying or hanging child is an OracleCrash."""
    blob = b"\x05\x01\x0f\x00"
    for source, what in [("import os; os.abort()", "crashed"),
                         ("import time; time.sleep(60)", "hung")]:
        oracle = fuzz.KllOracle(timeout_s=2.0)
        oracle._start = _child(oracle, source)  # type: ignore[method-assign]
        with pytest.raises(fuzz.OracleCrash, match=what):
            oracle.prove(blob)
        oracle.close()
    oracle = fuzz.KllOracle()
    sketch = harness_sketch()
    oracle.prove(sketch)
    oracle.prove(b"\x00garbage")  # a Python-level error in datasketches is no crash
    assert oracle.calls == 2 and sketch in oracle.proven
    oracle.close()


def _child(oracle, source: str):
    import subprocess

    def start():
        if oracle._proc is None:
            oracle._proc = subprocess.Popen([sys.executable, "-c", source],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return oracle._proc

    return start


def harness_sketch() -> bytes:
    from datasketches import kll_floats_sketch

    s = kll_floats_sketch(200)
    for x in range(500):
        s.update(float(x))
    return s.serialize()
