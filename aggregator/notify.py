"""Deliver alert notifications: Alertmanager-compatible webhooks, the log, or both.

    sink = MultiNotifier([LogNotifier(), WebhookNotifier(["https://hooks.example/am"])])
    sink.notify([Notification("firing", {"alertname": "ModelDrift", "severity": "page"},
                              {"summary": "PSI 0.31"}, starts_at_s=1.7e9, ends_at_s=None,
                              fingerprint="a1b2")])     # True: queued, returns at once
    ...
    sink.close(timeout_s=5.0)                           # drains, then stops the worker

The alert engine builds `Notification`s (frozen, engine-independent) and hands them to any
`Notifier`. The format lives apart from the transport: `alertmanager_payload` is a pure function
producing the Alertmanager v4 webhook JSON that receivers built for Alertmanager already parse.

`WebhookNotifier.notify` never blocks beyond enqueueing and never raises: each URL has its own
bounded queue (full: the oldest payload is dropped and counted) and its own worker thread, so a
dead or slow receiver delays nobody, not even the other receivers. A worker POSTs with a
per-request timeout and retries connection errors, timeouts and 5xx with exponential backoff;
any other answer (4xx, 3xx: redirects are not followed) is final. Outcomes are counted per URL
(`stats()`) and failures logged (the 1st, 2nd, 4th, 8th, ... of a streak, so a dead receiver
does not flood the log). URLs are shown only redacted (no userinfo, no query string),
in logs and in `stats()` keys; ``user:password@`` becomes an ``Authorization: Basic`` header.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import http.client
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

from agent.errors import ConfigError, ValidationError

__all__ = [
    "ZERO_TIME",
    "DeliveryStats",
    "LogNotifier",
    "MemoryNotifier",
    "MultiNotifier",
    "Notification",
    "Notifier",
    "WebhookNotifier",
    "alertmanager_payload",
    "format_timestamp",
    "group_key",
]

logger = logging.getLogger(__name__)

Status = Literal["firing", "resolved"]

#: Alertmanager's `endsAt` for an alert that is still firing (Go's zero `time.Time`).
ZERO_TIME = "0001-01-01T00:00:00Z"

_REQUIRED_LABELS = ("alertname", "severity")
_USER_AGENT = "fleetwatch-notify/1"
_MAX_RESPONSE_BYTES = 64 * 1024


# -- the input --------------------------------------------------------------------------------


def _str_map(field: str, value: Mapping[str, str]) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"expected a mapping, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValidationError(field, f"keys and values must be str, got {k!r}: {v!r}")
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class Notification:
    """One alert's state, as the engine hands it to a `Notifier`.

    `labels` identify the alert (must include non-empty ``alertname`` and ``severity``);
    `annotations` describe it (``summary``, ``runbook_url``, ``value``, ...). Times are Unix
    seconds; a resolved notification needs `ends_at_s`. Both mappings are copied read-only.
    """

    status: Status
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at_s: float
    ends_at_s: float | None
    fingerprint: str
    generator_url: str = ""

    def __post_init__(self) -> None:
        if self.status not in ("firing", "resolved"):
            raise ValidationError("status", f"must be 'firing' or 'resolved', got "
                                  f"{self.status!r}")
        labels = _str_map("labels", self.labels)
        for name in _REQUIRED_LABELS:
            if not labels.get(name):
                raise ValidationError("labels", f"label {name!r} is required")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "annotations", _str_map("annotations", self.annotations))
        if not _finite(self.starts_at_s):
            raise ValidationError("starts_at_s", f"must be a finite number, got "
                                  f"{self.starts_at_s!r}")
        if self.ends_at_s is None:
            if self.status == "resolved":
                raise ValidationError("ends_at_s", "a resolved notification needs ends_at_s")
        elif not _finite(self.ends_at_s) or self.ends_at_s < self.starts_at_s:
            raise ValidationError("ends_at_s", f"must be a finite number >= starts_at_s, got "
                                  f"{self.ends_at_s!r}")
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise ValidationError("fingerprint", "must be a non-empty str")
        if not isinstance(self.generator_url, str):
            raise ValidationError("generator_url", "must be a str")

    def __hash__(self) -> int:  # the mappings are not hashable; equal objects share these
        return hash((self.status, self.fingerprint, self.starts_at_s, self.ends_at_s))


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# -- the format -------------------------------------------------------------------------------


def format_timestamp(t_s: float) -> str:
    """RFC 3339 in UTC with a ``Z``, fractional seconds trimmed as Go's RFC3339Nano does.

    >>> format_timestamp(1700000000.25)
    '2023-11-14T22:13:20.25Z'
    """
    t = dt.datetime.fromtimestamp(t_s, tz=dt.UTC)
    frac = f".{t.microsecond:06d}".rstrip("0") if t.microsecond else ""
    return t.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"


def group_key(group_labels: Mapping[str, str]) -> str:
    """Alertmanager's group key for the root route: ``{}:{alertname="x", cohort="eu"}``."""
    pairs = ", ".join(f"{k}={json.dumps(str(v), ensure_ascii=False)}"
                      for k, v in sorted(group_labels.items()))
    return "{}:{" + pairs + "}"


def _common(maps: Sequence[Mapping[str, str]]) -> dict[str, str]:
    first, rest = maps[0], maps[1:]
    return {k: v for k, v in sorted(first.items()) if all(m.get(k) == v for m in rest)}


def alertmanager_payload(notifications: Sequence[Notification], receiver: str,
                         external_url: str, group_labels: Mapping[str, str]) -> dict[str, Any]:
    """The Alertmanager v4 webhook body for one group of notifications (order kept).

    Top-level `status` is "firing" if any alert fires; `commonLabels` and
    `commonAnnotations` are the pairs every alert shares. Label maps are sorted by name, as
    Alertmanager (Go) serializes them.
    """
    if not notifications:
        raise ValidationError("notifications", "a payload needs at least one notification")
    alerts = [{
        "status": n.status,
        "labels": dict(sorted(n.labels.items())),
        "annotations": dict(sorted(n.annotations.items())),
        "startsAt": format_timestamp(n.starts_at_s),
        "endsAt": (ZERO_TIME if n.status == "firing" or n.ends_at_s is None
                   else format_timestamp(n.ends_at_s)),
        "generatorURL": n.generator_url,
        "fingerprint": n.fingerprint,
    } for n in notifications]
    return {
        "version": "4",
        "groupKey": group_key(group_labels),
        "truncatedAlerts": 0,
        "status": "firing" if any(n.status == "firing" for n in notifications) else "resolved",
        "receiver": receiver,
        "groupLabels": dict(sorted(group_labels.items())),
        "commonLabels": _common([n.labels for n in notifications]),
        "commonAnnotations": _common([n.annotations for n in notifications]),
        "externalURL": external_url,
        "alerts": alerts,
    }


# -- sinks ------------------------------------------------------------------------------------


@runtime_checkable
class Notifier(Protocol):
    """Where the alert engine sends notifications. `notify` must not block or raise."""

    def notify(self, notifications: Sequence[Notification]) -> bool:
        """Accept the notifications for delivery; False if they could not be accepted."""
        ...

    def close(self, timeout_s: float = 5.0) -> bool:
        """Deliver what is pending within `timeout_s`, then stop; True if nothing was left."""
        ...


class LogNotifier:
    """The "log" sink: one log record per notification (firing at WARNING, resolved at INFO)."""

    def __init__(self, log: logging.Logger | None = None) -> None:
        self._log = log or logger

    def notify(self, notifications: Sequence[Notification]) -> bool:
        for n in notifications:
            labels = ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())
                              if k not in _REQUIRED_LABELS)
            self._log.log(logging.WARNING if n.status == "firing" else logging.INFO,
                          "alert %s %s severity=%s {%s} fingerprint=%s summary=%r",
                          n.labels["alertname"], n.status.upper(), n.labels["severity"],
                          labels, n.fingerprint, n.annotations.get("summary", ""))
        return True

    def close(self, timeout_s: float = 5.0) -> bool:
        return True


class MemoryNotifier:
    """An in-memory fake for tests: keeps every batch it was given, in order."""

    def __init__(self) -> None:
        self.batches: list[tuple[Notification, ...]] = []
        self.closed = False

    @property
    def notifications(self) -> list[Notification]:
        return [n for batch in self.batches for n in batch]

    def notify(self, notifications: Sequence[Notification]) -> bool:
        if self.closed:
            return False
        self.batches.append(tuple(notifications))
        return True

    def close(self, timeout_s: float = 5.0) -> bool:
        self.closed = True
        return True


class MultiNotifier:
    """Fan-out: every notifier gets every batch; one failing sink does not stop the others."""

    def __init__(self, notifiers: Sequence[Notifier]) -> None:
        self._notifiers = tuple(notifiers)

    def notify(self, notifications: Sequence[Notification]) -> bool:
        batch = tuple(notifications)
        ok = True
        for sink in self._notifiers:
            try:
                ok = sink.notify(batch) and ok
            except Exception:  # a sink must never break the alert engine
                logger.exception("notifier %s raised", type(sink).__name__)
                ok = False
        return ok

    def close(self, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        ok = True
        for sink in self._notifiers:
            try:
                ok = sink.close(max(0.0, deadline - time.monotonic())) and ok
            except Exception:
                logger.exception("notifier %s raised on close", type(sink).__name__)
                ok = False
        return ok


# -- the webhook sink -------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryStats:
    """Outcomes for one webhook URL, counted in payloads (one per group per `notify` call)."""

    delivered: int = 0
    failed: int = 0   # gave up: 4xx/3xx, or retries exhausted
    dropped: int = 0  # never attempted: pushed out of a full queue, or left at close
    retried: int = 0  # extra attempts made
    pending: int = 0  # queued, not yet attempted


def _redact(split: urllib.parse.SplitResult) -> str:
    netloc = split.netloc.rpartition("@")[2]
    query = "?..." if split.query else ""
    return urllib.parse.urlunsplit((split.scheme, netloc, split.path, "", "")) + query


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx answer becomes an HTTPError: final, not followed


class _Endpoint:
    """One URL: its queue, counters and worker thread."""

    def __init__(self, url: str, index: int) -> None:
        try:
            split = urllib.parse.urlsplit(url)
            split.port  # noqa: B018 -- raises ValueError on a malformed port
        except ValueError as e:
            raise ConfigError(f"urls[{index}]: not a valid URL ({e})") from None
        self.name = _redact(split)
        if split.scheme not in ("http", "https"):
            raise ConfigError(f"urls[{index}]: only http and https URLs are supported, got "
                              f"{split.scheme or 'no'} scheme in {self.name!r}")
        if not split.hostname:
            raise ConfigError(f"urls[{index}]: no host in {self.name!r}")
        self.url = urllib.parse.urlunsplit((split.scheme, split.netloc.rpartition("@")[2],
                                            split.path or "/", split.query, ""))
        self.headers = {"Content-Type": "application/json", "User-Agent": _USER_AGENT}
        if split.username is not None:
            cred = (f"{urllib.parse.unquote(split.username)}:"
                    f"{urllib.parse.unquote(split.password or '')}")
            self.headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        self.cond = threading.Condition()
        self.queue: collections.deque[bytes] = collections.deque()
        self.delivered = self.failed = self.dropped = self.retried = 0
        self.thread: threading.Thread | None = None

    def stats(self) -> DeliveryStats:
        with self.cond:
            return DeliveryStats(self.delivered, self.failed, self.dropped, self.retried,
                                 len(self.queue))


class WebhookNotifier:
    """POSTs Alertmanager v4 webhook payloads to every URL, from background threads.

    Each `notify` call becomes one payload per group of notifications sharing the values of
    the `group_by` labels (default: one group per ``alertname``), queued for every URL. A queue
    holds at most `max_queue` payloads; when full, the oldest is dropped and counted.
    A delivery is tried once plus up to `retries` times, waiting ``backoff_s * 2**attempt``
    between tries, on connection errors, timeouts (`timeout_s` per request) and 5xx.

    Call `close` (or use it as a context manager) to drain the queues and stop the threads.
    """

    def __init__(self, urls: Sequence[str], *, timeout_s: float = 5.0, max_queue: int = 1000,
                 retries: int = 3, backoff_s: float = 0.5, receiver: str = "fleetwatch",
                 external_url: str = "", group_by: Sequence[str] = ("alertname",)) -> None:
        if isinstance(urls, str) or not urls:
            raise ConfigError("urls: give a non-empty sequence of webhook URLs")
        if not (_finite(timeout_s) and timeout_s > 0):
            raise ConfigError(f"timeout_s: must be > 0, got {timeout_s!r}")
        if not (isinstance(max_queue, int) and max_queue >= 1):
            raise ConfigError(f"max_queue: must be an int >= 1, got {max_queue!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise ConfigError(f"retries: must be an int >= 0, got {retries!r}")
        if not (_finite(backoff_s) and backoff_s >= 0):
            raise ConfigError(f"backoff_s: must be >= 0, got {backoff_s!r}")
        self._endpoints = [_Endpoint(u, i) for i, u in enumerate(urls)]
        names = [e.name for e in self._endpoints]
        if len(set(names)) != len(names):
            raise ConfigError(f"urls: duplicate URLs {sorted(names)!r}")
        self._timeout_s = float(timeout_s)
        self._max_queue = max_queue
        self._retries = retries
        self._backoff_s = float(backoff_s)
        self._receiver = receiver
        self._external_url = external_url
        self._group_by = tuple(group_by)
        # Proxies come from the environment, read once here; redirects are not followed.
        self._opener = urllib.request.build_opener(_NoRedirect())
        self._closing = False
        self._abort = threading.Event()
        for i, ep in enumerate(self._endpoints):
            ep.thread = threading.Thread(target=self._run, args=(ep,), daemon=True,
                                         name=f"fleetwatch-notify-{i}")
            ep.thread.start()

    def __enter__(self) -> WebhookNotifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the caller's side ---------------------------------------------------------------------

    def notify(self, notifications: Sequence[Notification]) -> bool:
        """Queue the notifications for every URL; False only once closed. Never blocks."""
        if self._closing:
            logger.warning("notify() after close(): %d notifications not sent",
                           len(notifications))
            return False
        try:
            bodies = [json.dumps(alertmanager_payload(group, self._receiver,
                                                      self._external_url, labels)).encode()
                      for labels, group in self._groups(notifications)]
        except Exception:  # never raise into the alert engine
            logger.exception("could not build the webhook payload")
            return False
        for ep in self._endpoints:
            for body in bodies:
                self._enqueue(ep, body)
        return True

    def _groups(self, notifications: Sequence[Notification]
                ) -> list[tuple[dict[str, str], list[Notification]]]:
        groups: dict[tuple[tuple[str, str], ...], list[Notification]] = {}
        for n in notifications:
            key = tuple((k, n.labels[k]) for k in self._group_by if k in n.labels)
            groups.setdefault(key, []).append(n)
        return [(dict(k), g) for k, g in groups.items()]

    def _enqueue(self, ep: _Endpoint, body: bytes) -> None:
        with ep.cond:
            if self._abort.is_set():  # lost a race with close(): count it, do not queue it
                ep.dropped += 1
                return
            dropped = 0
            while len(ep.queue) >= self._max_queue:
                ep.queue.popleft()
                dropped += 1
            ep.dropped += dropped
            total = ep.dropped
            ep.queue.append(body)
            ep.cond.notify()
        if dropped and total & (total - 1) == 0:  # log at 1, 2, 4, 8, ... drops
            logger.warning("webhook %s: queue full (%d), dropped the oldest payload (%d "
                           "dropped so far)", ep.name, self._max_queue, total)

    def stats(self) -> dict[str, DeliveryStats]:
        """Counters per URL, keyed by the redacted URL."""
        return {ep.name: ep.stats() for ep in self._endpoints}

    def close(self, timeout_s: float = 5.0) -> bool:
        """Stop taking notifications, deliver what is queued within `timeout_s`, then stop.

        Payloads still queued at the deadline are dropped (and counted); a request in flight
        ends within its own timeout on a daemon thread. True if everything was delivered or
        given up on before the deadline.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        self._closing = True
        for ep in self._endpoints:
            with ep.cond:
                ep.cond.notify_all()
        for ep in self._endpoints:
            assert ep.thread is not None
            ep.thread.join(max(0.0, deadline - time.monotonic()))
        self._abort.set()  # wakes workers out of their backoff
        drained = True
        for ep in self._endpoints:
            with ep.cond:
                left = len(ep.queue)
                ep.queue.clear()
                ep.dropped += left
                ep.cond.notify_all()
            if left or (ep.thread is not None and ep.thread.is_alive()):
                drained = False
                logger.warning("webhook %s: closed with %d payloads undelivered", ep.name, left)
        return drained

    # -- the worker's side ---------------------------------------------------------------------

    def _run(self, ep: _Endpoint) -> None:
        streak = 0  # consecutive failed deliveries: logged at 1, 2, 4, 8, ... not each one
        while True:
            with ep.cond:
                while not ep.queue and not self._closing:
                    ep.cond.wait()
                if not ep.queue or self._abort.is_set():
                    return
                body = ep.queue.popleft()
            try:
                error = self._deliver(ep, body)
            except Exception as e:  # a bug here must not kill the worker
                logger.exception("webhook %s: delivery crashed", ep.name)
                error = f"crashed: {type(e).__name__}"
            with ep.cond:
                if error is None:
                    ep.delivered += 1
                else:
                    ep.failed += 1
            if error is None:
                if streak:
                    logger.info("webhook %s: delivering again after %d failed deliveries",
                                ep.name, streak)
                streak = 0
                continue
            streak += 1
            level = logging.WARNING if streak & (streak - 1) == 0 else logging.DEBUG
            logger.log(level, "webhook %s: delivery failed (%s); %d failed in a row", ep.name,
                       error, streak)

    def _deliver(self, ep: _Endpoint, body: bytes) -> str | None:
        """POST one payload, retrying what may pass later; None if delivered, else why not."""
        reason = ""
        for attempt in range(self._retries + 1):
            if attempt:
                if self._abort.wait(self._backoff_s * 2 ** (attempt - 1)):
                    return f"closed while retrying after {reason}"
                with ep.cond:
                    ep.retried += 1
            request = urllib.request.Request(ep.url, data=body, headers=ep.headers,
                                             method="POST")
            try:
                with self._opener.open(request, timeout=self._timeout_s) as response:
                    response.read(_MAX_RESPONSE_BYTES)
                return None
            except urllib.error.HTTPError as e:
                e.close()
                if not 500 <= e.code < 600:
                    return f"refused with HTTP {e.code} {e.reason}, not retried"
                reason = f"HTTP {e.code} {e.reason}"
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
                cause = e.reason if isinstance(e, urllib.error.URLError) else e
                reason = f"{type(cause).__name__}: {cause}"
            logger.debug("webhook %s: attempt %d failed: %s", ep.name, attempt + 1, reason)
        return f"gave up after {self._retries + 1} attempts, last: {reason}"
