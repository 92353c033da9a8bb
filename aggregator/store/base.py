"""The storage interface the ingest and query paths are written against."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.spec import Spec
from agent.summary import Summary
from agent.wire import ReportMeta

__all__ = ["ACTIVITY_RESOLUTIONS", "REORDER_WINDOW", "AlertRecord", "Contribution",
           "IngestItem", "IngestOutcome", "LabelSet", "PrivacyStats", "Store", "activity_cover",
           "canonical_labels", "parse_labels", "rollup_resolutions", "time_cover"]

DAY_S = 86400
HOUR_S = 3600


# Replay protection: a report whose seq is more than this far below its device's high-water
# mark, and not stored, is taken for a replay (its raw copy may be gone with retention). Within
# it, reports merge in any order: the spool sends oldest first but may skip a dead letter.
REORDER_WINDOW = 10_000


class IngestOutcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"   # (device_id, seq) already stored: acknowledged, not merged again
    REPLAYED = "replayed"     # seq far below the device's high-water mark: never merged,
                              # answered STALE_SEQ with the mark (a device that lost its spool
                              # renumbers above it)
    SEQ_REUSED = "seq_reused"  # (device_id, seq) stored with OTHER bytes: not a resend (those
                              # are byte-identical) but a new report under a used seq, e.g.
                              # after a lost spool within the reorder window; never merged,
                              # answered like REPLAYED


@dataclass(frozen=True)
class PrivacyStats:
    devices: int
    devices_withholding: int
    reports: int
    reports_withheld: int
    max_day_epsilon: float
    mean_day_epsilon: float      # mean over devices of each device's largest daily spend


@dataclass(frozen=True)
class Contribution:
    """One device's share of a stored report.

    A device's own report is one contribution: (its device id, 1 report, withheld 0 or 1, its
    day_epsilon_spent). A report forwarded by a regional aggregator (`WindowReport.merged`)
    holds one per device that reported into it, so that the tier above counts devices,
    availability and privacy spend exactly as if every device had reported to it directly.
    Device counts and privacy stats are computed from contributions, never from the sender
    of a report (a regional aggregator is one sender for thousands of devices)."""

    device_id: str
    reports: int = 1
    withheld: int = 0
    max_day_epsilon: float = 0.0

    @staticmethod
    def of(meta: ReportMeta) -> Contribution:
        """A device report's own contribution."""
        return Contribution(meta.device_id, 1, int(meta.private_withheld),
                            meta.day_epsilon_spent)


@dataclass(frozen=True)
class LabelSet:
    id: int
    labels: Mapping[str, str]

    def matches(self, selector: Mapping[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class AlertRecord:
    """One alert as stored in the history (a transition) or as it stands now.

    ``at_s`` is the event time of the transition (the end of the evaluated window);
    ``previous_state`` is empty for an alert that is not a transition. ``cohort`` holds
    (key, value) pairs in the rule's ``by`` order (sorted keys).
    """

    at_s: float
    rule: str
    kind: str
    model: str
    model_version: str
    fingerprint: str
    previous_state: str
    state: str
    cohort: tuple[tuple[str, str], ...]
    severity: str
    value: float
    threshold: float
    starts_at_s: float
    ends_at_s: float | None
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


def canonical_labels(labels: Mapping[str, str]) -> str:
    """The interned form of a label set: "k1=v1,k2=v2" with keys sorted."""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def parse_labels(text: str) -> dict[str, str]:
    """Parse "k=v,k2=v2" (the canonical form, and the CLI's selector syntax)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{part!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


def rollup_resolutions(window_length_s: int) -> tuple[int, ...]:
    """Resolutions kept for a spec, finest first: the window itself, then hour and day when
    they are whole multiples of it."""
    out = [window_length_s]
    for r in (HOUR_S, DAY_S):
        if r > out[-1] and r % out[-1] == 0:
            out.append(r)
    return tuple(out)


def time_cover(start: int, end: int, resolutions: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Cover window starts in [start, end) with as few rollup rows as possible.

    Returns (resolution, range_start, range_end) triples: rows of that resolution whose
    bucket start lies in [range_start, range_end) together hold exactly the windows starting
    in [start, end). `start` and `end` must be multiples of the finest resolution."""
    if start >= end:
        return []
    coarse, rest = resolutions[-1], resolutions[:-1]
    lo = -(-start // coarse) * coarse
    hi = (end // coarse) * coarse
    if not rest:
        return [(coarse, start, end)]
    if lo >= hi:
        return time_cover(start, end, rest)
    return time_cover(start, lo, rest) + [(coarse, lo, hi)] + time_cover(hi, end, rest)


# The buckets device counts and privacy sums are kept at beside each window
# (`device_activity`): a long range reads whole hours and days, and windows only at its edges.
ACTIVITY_RESOLUTIONS = (HOUR_S, DAY_S)


def activity_cover(start: int, end: int) -> tuple[list[tuple[int, int, int]],
                                                 list[tuple[int, int]]]:
    """[start, end) as whole `device_activity` buckets, (resolution, lo, hi) with bucket
    starts in [lo, hi), and the edges left over, (lo, hi) window-start ranges each shorter
    than an hour (or, with no whole hour inside, the range itself)."""
    whole, edges = [], []
    for res, lo, hi in time_cover(start, end, (1, *ACTIVITY_RESOLUTIONS)):
        if res == 1:
            edges.append((lo, hi))
        else:
            whole.append((res, lo, hi))
    return whole, edges


# What `Store.ingest_many` takes per report: ingest's arguments, in order.
IngestItem = tuple[ReportMeta, bytes, Summary, tuple[int, ...], Sequence[Contribution] | None]


class Store(Protocol):
    """What the aggregator needs from a database. Implementations are thread-safe."""

    def put_spec(self, spec: Spec) -> bool: ...

    def get_spec(self, model: str, model_version: str = "", spec_hash: str = "") -> Spec | None:
        ...

    def list_specs(self, model: str = "") -> list[Spec]: ...

    def ingest(self, meta: ReportMeta, envelope: bytes, summary: Summary,
               resolutions: tuple[int, ...],
               contributions: Sequence[Contribution] | None = None) -> IngestOutcome:
        """Deduplicate on (device_id, seq), refuse seqs below the device's high-water mark
        minus REORDER_WINDOW (REPLAYED), store the raw envelope, merge the summary into every
        resolution's rollup, record the contributions (None: the report's own,
        `Contribution.of(meta)`) for device counts and privacy stats, and raise the
        high-water mark, all in one transaction (which may hold other callers' reports too),
        and return only once it is durably committed."""
        ...

    def ingest_many(self, items: Sequence[IngestItem]) -> list[IngestOutcome | BaseException]:
        """`ingest` for several reports, ``(meta, envelope, summary, resolutions,
        contributions)`` each, written in as few transactions as fit (one, up to the store's
        batch limit); a report that fails fails alone: its entry is the exception, the others
        are stored. Returns once every one is durably committed (or failed)."""
        ...

    def high_water_mark(self, device_id: str) -> int | None:
        """The highest seq merged for the sender, None if none (told to a device whose seq
        was taken for a replay, so that it renumbers above it)."""
        ...

    def label_sets(self, spec_hash: str) -> list[LabelSet]: ...

    def model_label_sets(self, model: str) -> list[LabelSet]:
        """Every label set stored for any version (spec) of a model: label cardinality."""
        ...

    def merged_rollups(self, spec_hash: str, label_set_ids: Iterable[int],
                       cover: list[tuple[int, int, int]]) -> dict[int, Summary]:
        """Per label set, the merge of its rollups over the cover (absent when none)."""
        ...

    def device_count(self, spec_hash: str, label_set_ids: Iterable[int], start: int,
                     end: int) -> int:
        """Distinct devices with a contribution to a report of these label sets whose window
        starts in [start, end). Exact, never an estimate: availability divides two of these
        counts, and a fully reporting fleet must read exactly 1."""
        ...

    def privacy_stats(self, spec_hash: str, label_set_ids: Iterable[int], start: int,
                      end: int) -> PrivacyStats:
        """Per device (by contribution, as in `device_count`) over the range: reports,
        withheld reports, the largest day spend."""
        ...

    # -- several replicas on one database ------------------------------------------------------

    def sender_activity(self, spec_hash: str, received_since_ms: int
                        ) -> dict[str, tuple[int, int]]:
        """Per sender (the report's device_id: a device, or a regional aggregator) with a
        report of the spec received (wall clock, ms) at or after ``received_since_ms``: (its
        newest window start, when its last report was received in ms). The alert evaluator's
        watermark, read from the database so that the replica that leads alerting sees the
        reports every replica accepted."""
        ...

    def try_lead(self, role: str) -> int:
        """The epoch of this process's hold on the lease of ``role`` (e.g. "alerts"), taking
        it if free; 0 when another replica holds it (or it cannot be checked). Among replicas
        sharing one database at most one holds it at any time, and when its holder dies
        another can take it within a bounded time. The epoch is positive and the same for as
        long as the hold lasts; every new acquisition (including this process re-taking a
        lease it lost in between) answers a different one, so that a caller can tell that
        another replica may have acted meanwhile. An embedded single-process store always
        leads, with one constant epoch. Called often (every evaluator tick): cheap when
        already held."""
        ...

    # -- retention (aggregator.retention) -------------------------------------------------------

    def prune_raw(self, spec_hash: str, start: int, end: int, limit: int = 5000) -> int:
        """Drop the raw envelopes of at most ``limit`` of the spec's reports whose window
        starts in [start, end), keeping each report's row (its (device_id, seq) still
        deduplicates: a resend of a pruned report is a DUPLICATE, never merged again) and
        everything derived from it (rollups, device counts, privacy sums). One short
        transaction (ingest waits for it); returns the envelopes dropped (``limit``: call
        again)."""
        ...

    # -- alerting (aggregator.alerts.evaluator) -------------------------------------------------

    def window_range(self, spec_hash: str) -> tuple[int, int] | None:
        """(earliest, latest) window start of the reports stored for a spec, None if none."""
        ...

    def label_keys(self) -> set[str]:
        """Every label key any device has reported with."""
        ...

    def load_alert_state(self, model: str, model_version: str) -> tuple[float, str] | None:
        """(evaluated_until, snapshot JSON) of a model version's alert engine, None if none."""
        ...

    def save_alert_window(self, model: str, model_version: str, evaluated_until: float,
                          snapshot_json: str, transitions: Sequence[AlertRecord]) -> None:
        """Store the engine snapshot after a window and that window's transitions, in one
        transaction (so a restart neither loses nor repeats a transition)."""
        ...

    def alert_history(self, model: str = "", state: str = "", limit: int = 100
                      ) -> list[AlertRecord]:
        """Stored transitions, newest first, optionally only of a model / to a state."""
        ...

    def close(self) -> None: ...
