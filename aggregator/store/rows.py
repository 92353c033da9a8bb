"""Row forms shared by the SQL stores (`SqliteStore`, `PostgresStore`): what a value looks
like in a table, independent of the backend. Only the placeholder differs between them
(``?`` for sqlite3, ``%s`` for psycopg), so the SQL built here takes it as ``ph``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from aggregator.store.base import AlertRecord, Contribution
from protos import fleetwatch_pb2 as pb

_ALERT_COLUMNS = ("at, rule, kind, model, model_version, fingerprint, previous_state, state, "
                  "cohort, severity, value, threshold, starts_at, ends_at, labels, annotations")
_ALERT_WIDTH = 16


def real(x: float) -> float | None:
    """NaN as NULL (SQLite stores NaN as NULL anyway; PostgreSQL is made to match)."""
    return None if math.isnan(x) else x


def alert_insert_sql(ph: str) -> str:
    """The INSERT of one `alert_history` row, with `alert_to_row`'s values."""
    return (f"INSERT INTO alert_history ({_ALERT_COLUMNS}) "
            f"VALUES ({', '.join([ph] * _ALERT_WIDTH)})")


def alert_to_row(t: AlertRecord) -> tuple[Any, ...]:
    return (t.at_s, t.rule, t.kind, t.model, t.model_version, t.fingerprint,
            t.previous_state, t.state, json.dumps([list(p) for p in t.cohort]),
            t.severity, real(t.value), real(t.threshold), t.starts_at_s,
            t.ends_at_s, json.dumps(dict(t.labels), sort_keys=True),
            json.dumps(dict(t.annotations), sort_keys=True))


def alert_history_query(model: str, state: str, limit: int, ph: str
                        ) -> tuple[str, tuple[Any, ...]]:
    """`Store.alert_history`'s SELECT (newest first) and its arguments; its rows go to
    `alert_from_row`."""
    where: list[str] = []
    args: list[Any] = []
    if model:
        where.append(f"model = {ph}")
        args.append(model)
    if state:
        where.append(f"state = {ph}")
        args.append(state)
    sql = (f"SELECT {_ALERT_COLUMNS} FROM alert_history"
           + (" WHERE " + " AND ".join(where) if where else "")
           + f" ORDER BY id DESC LIMIT {ph}")
    return sql, (*args, max(0, int(limit)))


def alert_from_row(r: Sequence[Any]) -> AlertRecord:
    return AlertRecord(
        at_s=r[0], rule=r[1], kind=r[2], model=r[3], model_version=r[4], fingerprint=r[5],
        previous_state=r[6], state=r[7],
        cohort=tuple((str(k), str(v)) for k, v in json.loads(r[8])), severity=r[9],
        value=math.nan if r[10] is None else r[10],
        threshold=math.nan if r[11] is None else r[11], starts_at_s=r[12], ends_at_s=r[13],
        labels=json.loads(r[14]), annotations=json.loads(r[15]))


def contributions_to_blob(contributions: Sequence[Contribution]) -> bytes:
    """`forward_pending.contributions`: the wire form (a WindowReport holding only them)."""
    return pb.WindowReport(contributions=[
        pb.Contribution(device_id=c.device_id, reports=c.reports, withheld=c.withheld,
                        max_day_epsilon=c.max_day_epsilon) for c in contributions
    ]).SerializeToString()


def contributions_from_blob(blob: bytes) -> list[Contribution]:
    return [Contribution(c.device_id, c.reports, c.withheld, c.max_day_epsilon)
            for c in pb.WindowReport.FromString(blob).contributions]


def check_store_args(reorder_window: int, readers: int) -> None:
    """The constructor arguments both stores take, checked alike."""
    if not isinstance(reorder_window, int) or reorder_window < 0:
        raise ValueError(f"reorder_window: must be a non-negative integer, got "
                         f"{reorder_window!r}")
    if not isinstance(readers, int) or readers < 1:
        raise ValueError(f"readers: must be a positive integer, got {readers!r}")
