"""`Monitor`: the instrumentation API a model's host code calls.

    from agent import Monitor

    with Monitor(model="detector", model_version="3", device_id="cam-0042",
                 labels={"region": "eu", "hw": "jetson"},
                 aggregator="fleet.example:7070", spool_dir="/var/lib/fleetwatch") as mon:
        y = model(x)
        mon.observe({"brightness": x.brightness, "scene": x.scene}, prediction=y,
                    latency_ms=elapsed_ms)

`observe` never raises into the model's code and does no I/O: it bins the event into the open
window's accumulator. Closed windows are turned into reports, written to the durable spool and
uploaded by one background thread (or by `flush()` when `background=False`).

Ground truth arrives later: `observe(..., request_id=rid)` caches the prediction (bounded,
with a TTL) and `label(rid, y_true)` joins the label with it, counted into the window the
label arrives in. Idle windows (no event, no label) are reported as heartbeats, so that an
aggregator can tell a quiet device from a dead one.
"""

from __future__ import annotations

import collections
import logging
import os
import pathlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from agent.errors import ConfigError, SpecError
from agent.noise import RandomSource, SecureRandom
from agent.pbwire import (
    WireError,
    decode_spec,
    encode_envelope,
    encode_get_spec_request,
    encode_report,
    envelope_report,
    report_with_seq,
)
from agent.privacy import (
    PrivacyAccountant,
    Release,
    clamp_summary,
    noise_plan,
    noise_summary,
)
from agent.spec import DEVICE_DAY, Spec
from agent.spool import Spool, SpoolStats
from agent.summary import Summary
from agent.transport import TlsCredentials, make_channel
from agent.upload import Backoff, DeliveryResult, Uploader
from agent.window import CacheEntry, LabelBinner, WindowAccumulator, window_start
from agent.wire import ReportMeta, spec_from_proto

if TYPE_CHECKING:  # cryptography is imported when a signing key is given (see __init__)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.signing import ReportSigner

__all__ = ["Monitor", "MonitorStats"]

logger = logging.getLogger(__name__)

AGENT_VERSION = "fleetwatch-agent/0.1.0"
MAX_LABELS = 32
MAX_LABEL_LEN = 128
GET_SPEC_METHOD = "/fleetwatch.v1.Ingest/GetSpec"
MAX_REQUEST_ID_LEN = 256


@dataclass(frozen=True)
class MonitorStats:
    events: int
    events_without_spec: int
    windows_closed: int
    internal_errors: int
    spool: SpoolStats
    last_delivery_error: str | None
    # Under a noisy spec these input-derived counters are not reported: they are kept here.
    invalid_values_kept_local: int = 0
    unknown_features_kept_local: int = 0
    # Ground truth: labels joined with a cached prediction, labels with no cached prediction
    # (unknown, expired or evicted request id), predictions dropped from the cache before
    # their label came (capacity or TTL), and the predictions cached now.
    labels_joined: int = 0
    labels_unmatched: int = 0
    label_cache_evicted: int = 0
    label_cache_size: int = 0
    # Heartbeat reports spooled for idle windows (windows_closed counts the other reports).
    heartbeats: int = 0


@dataclass(frozen=True)
class _Heartbeat:
    """An idle window to report as a heartbeat."""

    spec: Spec
    start_unix_s: int


def _request_key(request_id: Any) -> str | None:
    """The cache key of a request id: a string, or an integer as its str(); None otherwise."""
    if isinstance(request_id, str):
        key = str(request_id)
    elif isinstance(request_id, (int, np.integer)) and not isinstance(request_id, bool):
        key = str(int(request_id))
    else:
        return None
    return key if 0 < len(key) <= MAX_REQUEST_ID_LEN else None


def _default_spool_dir(device_id: str) -> pathlib.Path:
    base = os.environ.get("FLEETWATCH_SPOOL_DIR")
    if base:
        return pathlib.Path(base) / device_id
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return pathlib.Path(state) / "fleetwatch" / device_id


def _check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(labels, Mapping):
        raise ConfigError(f"labels: must be a mapping of strings, got {type(labels).__name__}")
    if len(labels) > MAX_LABELS:
        raise ConfigError(f"labels: at most {MAX_LABELS} labels, got {len(labels)}")
    out = {}
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError(f"labels: keys and values must be strings, got {k!r}={v!r}")
        if not k or len(k) > MAX_LABEL_LEN or len(v) > MAX_LABEL_LEN:
            raise ConfigError(f"labels: key {k!r}: keys must be 1-{MAX_LABEL_LEN} characters "
                              f"and values at most {MAX_LABEL_LEN}")
        if any(c in k for c in ",=") or any(c in v for c in ",="):
            raise ConfigError(f"labels: {k!r}={v!r}: ',' and '=' are not allowed (they "
                              "separate selector terms)")
        out[k] = v
    return out


class Monitor:
    """Summarizes a model's predictions per time window and ships them to the aggregator.

    Args:
        model, model_version: which spec to follow.
        device_id: this device's stable identity (the dedup key with `seq`).
        labels: the device's cohort labels, e.g. {"region": "eu", "hw": "jetson"}.
        aggregator: "host:port" of the aggregator's gRPC endpoint.
        spool_dir: where the durable spool lives (default: $FLEETWATCH_SPOOL_DIR/<device> or
            ~/.local/state/fleetwatch/<device>).
        clock: returns the current time in seconds; windows follow it (default time.time).
        spec: a Spec (or a path to spec JSON) to use instead of fetching it.
        channel: an existing gRPC channel to share (the caller keeps ownership).
        tls: the device's mutual-TLS files (`agent.transport.TlsCredentials`: the fleet CA,
            the device certificate and its key); without it the channel is plaintext, which
            an aggregator accepts on loopback only (docs/security.md).
        background: run the uploader thread; with False, call `flush()` to deliver.
        grace_s: how long a closed window still takes out-of-order events.
        noise_rng: the source of DP noise (default: the OS's cryptographically secure one;
            inject a seeded source in tests only).
        label_cache_size: predictions kept for `label()` at most (the oldest are evicted).
        label_ttl_s: how long a cached prediction waits for its label.
        heartbeats: report idle windows as heartbeats (from the window this monitor started
            in; a restarted agent does not claim the windows it was down for).
        max_heartbeat_windows: heartbeats at most per gap (older idle windows are skipped).
        signing_key: the device's Ed25519 report-signing key (a PEM file such as
            ``devices/<ID>.sign.key``, or the key): every report is signed, ``key_id`` the
            device id (docs/security.md).
    """

    def __init__(
        self,
        model: str,
        model_version: str,
        device_id: str,
        labels: Mapping[str, str] | None = None,
        aggregator: str | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] | None = None,
        *,
        spec: Spec | str | os.PathLike[str] | None = None,
        channel: grpc.Channel | None = None,
        tls: TlsCredentials | None = None,
        background: bool = True,
        grace_s: float = 2.0,
        max_spool_reports: int = 10_000,
        max_spool_bytes: int = 64 << 20,
        rpc_timeout_s: float = 10.0,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 60.0,
        tick_s: float = 1.0,
        noise_rng: RandomSource | None = None,
        label_cache_size: int = 100_000,
        label_ttl_s: float = 86400.0,
        heartbeats: bool = True,
        max_heartbeat_windows: int = 1440,
        signing_key: str | os.PathLike[str] | Ed25519PrivateKey | None = None,
    ) -> None:
        if not model or not model_version:
            raise ConfigError("model and model_version must be non-empty")
        if not device_id or not isinstance(device_id, str) or len(device_id) > 256:
            raise ConfigError("device_id must be a non-empty string of at most 256 characters")
        if aggregator is None and channel is None:
            raise ConfigError("give aggregator='host:port' (or a gRPC channel)")
        if tls is not None and channel is not None:
            raise ConfigError("tls: give it with aggregator=, not with channel= (a channel "
                              "given already has its credentials)")
        if grace_s < 0:
            raise ConfigError("grace_s must not be negative")
        if not isinstance(label_cache_size, int) or label_cache_size < 1:
            raise ConfigError(f"label_cache_size must be a positive integer, got "
                              f"{label_cache_size!r}")
        if not label_ttl_s > 0:
            raise ConfigError(f"label_ttl_s must be positive, got {label_ttl_s!r}")
        if not isinstance(max_heartbeat_windows, int) or max_heartbeat_windows < 1:
            raise ConfigError(f"max_heartbeat_windows must be a positive integer, got "
                              f"{max_heartbeat_windows!r}")
        self.model = model
        self.model_version = model_version
        self.device_id = device_id
        self.labels = _check_labels(labels or {})
        # Loaded before anything is opened, so a bad key file fails the constructor cleanly.
        self._signer: ReportSigner | None = None
        if signing_key is not None:
            # Imported here: cryptography adds ~8 MB to the agent's RSS (docs/performance.md),
            # a cost only devices that sign should pay.
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            from agent.signing import ReportSigner

            if isinstance(signing_key, Ed25519PrivateKey):
                self._signer = ReportSigner.from_key(signing_key, device_id)
            else:
                self._signer = ReportSigner.from_pem_file(signing_key, device_id)
        self.clock = clock or time.time
        self.grace_s = grace_s
        self._tick_s = tick_s
        self._owns_channel = channel is None
        self._channel = channel or make_channel(aggregator, tls,  # type: ignore[arg-type]
                                                backoff_base_s=backoff_base_s,
                                                backoff_cap_s=backoff_cap_s)
        self._rpc_timeout_s = rpc_timeout_s
        self._get_spec: Callable[..., Any] | None = None  # made when first needed
        spool_path = pathlib.Path(spool_dir) if spool_dir else _default_spool_dir(device_id)
        self.spool = Spool(spool_path / "spool.sqlite", max_reports=max_spool_reports,
                           max_bytes=max_spool_bytes)
        self._uploader = Uploader(self.spool, self._channel, rpc_timeout_s=rpc_timeout_s,
                                  rebuild=self._renumbered)
        self._backoff = Backoff(backoff_base_s, backoff_cap_s)
        self._next_attempt = 0.0
        self._deliver_lock = threading.Lock()

        # Noise comes from the OS's secure source; a seeded source is for tests only.
        self._noise_rng: RandomSource | None = noise_rng  # None: SecureRandom, on first use
        # Made when a device-day clamp first needs it: numpy.random adds ~3 MB of RSS
        # (docs/performance.md), which the default per-event unit never uses.
        self._clamp_rng: np.random.Generator | None = None

        self._lock = threading.Lock()
        self._open: dict[int, WindowAccumulator] = {}
        # The open window the last event went to: most events go to the same one, so the hot
        # path checks it before computing a window start (reset when it closes).
        self._current: WindowAccumulator | None = None
        self._closed: collections.deque[WindowAccumulator] = collections.deque()
        self._events = 0
        self._events_without_spec = 0
        self._windows_closed = 0
        self._internal_errors = 0
        self._invalid_kept = 0   # counters a noisy spec keeps off the wire
        self._unknown_kept = 0
        self._closed_flag = False

        # Ground truth: request id -> CacheEntry. Insertion order is (about) time order, so
        # expired entries are evicted lazily from the front.
        self._label_cache: collections.OrderedDict[str, CacheEntry] = collections.OrderedDict()
        self._label_cache_size = label_cache_size
        self._label_ttl_s = float(label_ttl_s)
        self._label_binner: LabelBinner | None = None
        self._labels_joined = 0
        self._labels_unmatched = 0
        self._label_evicted = 0
        # The spool keeps a copy of the cache, so that a restart does not turn the labels of
        # every prediction made before it into "unmatched": what the copy lacks (added) or
        # still holds (removed) is written with the next windows, off the hot path.
        self._cache_added: dict[str, CacheEntry] = {}
        self._cache_removed: set[str] = set()
        for key, entry in self.spool.label_cache_load(self.clock() - self._label_ttl_s,
                                                      label_cache_size):
            self._label_cache[key] = entry

        # Heartbeats: the start of the earliest window not yet reported, in memory only.
        self._heartbeats = heartbeats
        self._max_heartbeat_windows = max_heartbeat_windows
        self._started_at = self.clock()
        self._next_cover: int | None = None
        self._heartbeat_count = 0

        self.spec: Spec | None = None
        if spec is not None:
            self._set_spec(spec if isinstance(spec, Spec) else Spec.load(spec))
        else:
            self._load_spec(initial=True)

        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name=f"fleetwatch-{device_id}",
                                            daemon=True)
            self._thread.start()

    # -- spec ----------------------------------------------------------------------------------

    def _set_spec(self, spec: Spec) -> None:
        if spec.model != self.model or spec.model_version != self.model_version:
            raise SpecError("model", f"spec is for {spec.model}/{spec.model_version}, this "
                            f"monitor for {self.model}/{self.model_version}")
        self.spec = spec
        self.spool.cache_spec(self.model, self.model_version, spec.hash, spec.to_json())
        self._adopt(spec)

    def _adopt(self, spec: Spec) -> None:
        self._label_binner = LabelBinner(spec.labels) if spec.labels is not None else None
        if self._next_cover is None:
            self._next_cover = window_start(self._started_at, spec.window_length_s)

    def _load_spec(self, initial: bool = False) -> bool:
        """Fetch the spec from the aggregator, falling back to the spool's cached copy."""
        if self._get_spec is None:
            # Bytes both ways, parsed by agent.pbwire: no protobuf runtime on a device
            # (docs/performance.md, "Footprint").
            self._get_spec = self._channel.unary_unary(
                GET_SPEC_METHOD, request_serializer=None, response_deserializer=None)
        try:
            raw = self._get_spec(encode_get_spec_request(self.model, self.model_version),
                                 timeout=min(self._rpc_timeout_s, 5.0))
            spec = spec_from_proto(decode_spec(raw))
            with self._lock:
                self._set_spec(spec)
            return True
        except (grpc.RpcError, SpecError, WireError) as e:
            reason = e.details() if isinstance(e, grpc.RpcError) else str(e)
        if initial:
            cached = self.spool.cached_spec(self.model, self.model_version)
            if cached:
                self.spec = Spec.from_json(cached)
                self._adopt(self.spec)
                logger.info("using the cached spec %s (aggregator: %s)", self.spec.hash[:12],
                            reason)
                return True
        logger.warning("no spec for %s/%s yet (%s); events are counted but not summarized "
                       "until it arrives", self.model, self.model_version, reason)
        return False

    # -- the hot path --------------------------------------------------------------------------

    def observe(self, features: Mapping[str, Any], prediction: Any = None,
                latency_ms: float | None = None, error: bool = False, *,
                request_id: str | None = None, confidence: float | None = None) -> None:
        """Record one prediction. Never raises; problems are counted.

        With a `request_id` (and a spec with labels) the prediction is cached for
        `label(request_id, y_true)`; `confidence` (multiclass) is the probability the model
        gave its predicted class, for the calibration histogram."""
        try:
            with self._lock:
                now = self.clock()
                acc, late = self._window_for(now)
                if acc is None:
                    return
                acc.observe(features, prediction, latency_ms, bool(error), late)
                self._events += 1
                if request_id is not None and self._label_binner is not None:
                    self._cache_prediction(acc, now, request_id, prediction, confidence)
        except Exception as e:  # the model's code must never see our failures
            self._count_internal_error(e)
        if self._closed:
            self._wake.set()

    def observe_batch(self, features: Mapping[str, Any], predictions: Any = None,
                      latency_ms: Any = None, errors: Any = None, *,
                      request_ids: Any = None, confidences: Any = None) -> None:
        """Record a batch of predictions given as numpy arrays of equal length.

        `request_ids` (None entries: no label expected) and `confidences` as in `observe`."""
        try:
            n = self._batch_length(features, predictions, latency_ms, errors, request_ids,
                                   confidences)
            if n == 0:
                return
            with self._lock:
                now = self.clock()
                acc, late = self._window_for(now, n)
                if acc is None:
                    return
                acc.observe_batch(features, predictions, latency_ms, errors, n, late)
                self._events += n
                if request_ids is not None and self._label_binner is not None:
                    ids = np.asarray(request_ids, dtype=object).reshape(-1)
                    preds = (np.full(n, None, dtype=object) if predictions is None
                             else np.asarray(predictions, dtype=object).reshape(-1))
                    confs = (np.full(n, None, dtype=object) if confidences is None
                             else np.asarray(confidences, dtype=object).reshape(-1))
                    for rid, pred, conf in zip(ids.tolist(), preds.tolist(), confs.tolist(),
                                               strict=True):
                        if rid is not None:
                            self._cache_prediction(acc, now, rid, pred, conf)
        except Exception as e:
            self._count_internal_error(e)
        if self._closed:
            self._wake.set()

    @staticmethod
    def _batch_length(features: Mapping[str, Any], predictions: Any, latency_ms: Any,
                      errors: Any, request_ids: Any = None, confidences: Any = None) -> int:
        lengths = {name: np.shape(v)[0] if np.ndim(v) else 1 for name, v in features.items()}
        for name, v in (("predictions", predictions), ("latency_ms", latency_ms),
                        ("errors", errors), ("request_ids", request_ids),
                        ("confidences", confidences)):
            if v is not None:
                lengths[name] = np.shape(v)[0] if np.ndim(v) else 1
        distinct = set(lengths.values())
        if len(distinct) > 1:
            raise ValueError(f"arrays differ in length: {lengths}")
        return distinct.pop() if distinct else 0

    # -- ground truth --------------------------------------------------------------------------

    def label(self, request_id: str, y_true: Any) -> bool:
        """Join a label with the prediction cached for `request_id` (see `observe`).

        Counted into the window of the label's arrival (the clock now): one count in each of
        the task's label histograms. Returns False (and counts it) when no prediction is
        cached for the id: unknown, expired, evicted, or already labeled. Never raises."""
        try:
            with self._lock:
                joined = self._label_one(self.clock(), request_id, y_true)
        except Exception as e:
            self._count_internal_error(e)
            return False
        if self._closed:
            self._wake.set()
        return joined

    def label_batch(self, request_ids: Any, y_true: Any) -> int:
        """`label` for arrays of equal length; returns how many were joined."""
        try:
            ids = np.asarray(request_ids, dtype=object).reshape(-1).tolist()
            ys = np.asarray(y_true, dtype=object).reshape(-1).tolist()
            if len(ids) != len(ys):
                raise ValueError(f"request_ids has {len(ids)} entries, y_true {len(ys)}")
            joined = 0
            with self._lock:
                now = self.clock()
                for rid, y in zip(ids, ys, strict=True):
                    joined += self._label_one(now, rid, y)
        except Exception as e:
            self._count_internal_error(e)
            return 0
        if self._closed:
            self._wake.set()
        return joined

    def _cache_prediction(self, acc: WindowAccumulator, now: float, request_id: Any,
                          prediction: Any, confidence: Any) -> None:
        """Cache a prediction for its label (lock held)."""
        assert self._label_binner is not None
        key = _request_key(request_id)
        if key is None:
            acc.invalid += 1  # a request id of the wrong type: counted, never cached
            return
        cache = self._label_cache
        self._evict_expired(acc, now)
        cache.pop(key, None)  # a repeated id: the newer prediction is the one labeled
        entry = self._label_binner.cache_entry(now, prediction, confidence)
        cache[key] = entry
        self._cache_added[key] = entry
        self._cache_removed.discard(key)
        if len(cache) > self._label_cache_size:
            self._forget(cache.popitem(last=False)[0])
            self._count_evicted(acc)

    def _evict_expired(self, acc: WindowAccumulator, now: float) -> None:
        cache, cutoff = self._label_cache, now - self._label_ttl_s
        while cache:
            oldest = next(iter(cache.values()))
            if oldest[0] >= cutoff:
                return
            self._forget(cache.popitem(last=False)[0])
            self._count_evicted(acc)

    def _forget(self, key: str) -> None:
        """A cache entry left (joined or evicted): the spool's copy must drop it (lock held)."""
        if self._cache_added.pop(key, None) is None:
            self._cache_removed.add(key)

    def _persist_label_cache(self) -> None:
        """Bring the spool's copy of the label cache up to date (I/O: never on the hot path)."""
        with self._lock:
            if not self._cache_added and not self._cache_removed:
                return
            added, self._cache_added = self._cache_added, {}
            removed, self._cache_removed = self._cache_removed, set()
            min_t = self.clock() - self._label_ttl_s
        try:
            self.spool.label_cache_update(added, removed, min_t)
        except Exception:
            with self._lock:  # try again next time; newer changes win over these
                for k, v in added.items():
                    if k not in self._cache_removed:
                        self._cache_added.setdefault(k, v)
                self._cache_removed |= {k for k in removed if k not in self._cache_added}
            raise

    def _count_evicted(self, acc: WindowAccumulator) -> None:
        """An eviction is reported by the window it happened in."""
        self._label_evicted += 1
        acc.label_cache_evicted += 1

    def _label_one(self, now: float, request_id: Any, y_true: Any) -> bool:
        """Join one label (lock held), or count it unmatched, in the window of `now`."""
        acc, _late = self._window_for(now) if self.spec is not None else (None, False)
        binner = self._label_binner
        key = _request_key(request_id)
        entry = None
        if acc is not None and binner is not None and key is not None:
            self._evict_expired(acc, now)
            entry = self._label_cache.pop(key, None)
            if entry is not None:
                self._forget(key)
            if entry is not None and entry[0] < now - self._label_ttl_s:
                self._count_evicted(acc)  # expired behind a younger one (the clock went back)
                entry = None
        if acc is None or binner is None or entry is None:
            self._labels_unmatched += 1
            if acc is not None:
                acc.labels_unmatched += 1
            return False
        binner.add(acc, entry, y_true, now)
        self._labels_joined += 1
        return True

    # -- windows -------------------------------------------------------------------------------

    def _window_for(self, t: float, n: int = 1) -> tuple[WindowAccumulator | None, bool]:
        spec = self.spec
        acc = self._current
        if acc is not None and acc.start_unix_s <= t < acc.end_unix_s and acc.spec is spec:
            return acc, False
        if spec is None:
            self._events_without_spec += n
            return None, False
        ws = window_start(t, spec.window_length_s)
        acc = self._open.get(ws)
        if acc is not None:
            self._current = acc
            return acc, False
        if self._open and ws < max(self._open):
            # Its window already closed: count the event in the newest window, as late.
            return self._open[max(self._open)], True
        acc = WindowAccumulator(spec, ws)
        self._open[ws] = acc
        self._current = acc
        self._close_expired(t)
        return acc, False

    def _close_expired(self, now: float) -> None:
        """Move windows whose end plus grace has passed to the closed queue, and heartbeats
        for the idle windows among them (lock held)."""
        for ws in sorted(self._open):
            acc = self._open[ws]
            if acc.end_unix_s + self.grace_s <= now:
                self._close(acc)
        if self.spec is not None:
            # Every window before the one holding now - grace has ended, grace included.
            self._cover_until(window_start(now - self.grace_s, self.spec.window_length_s))

    def _close(self, acc: WindowAccumulator) -> None:
        """Queue an open window's report, after heartbeats for the idle windows before it."""
        self._cover_until(acc.start_unix_s)
        del self._open[acc.start_unix_s]
        if self._current is acc:
            self._current = None
        self._closed.append(acc)
        if self._next_cover is not None:
            self._next_cover = max(self._next_cover, acc.end_unix_s)

    def _cover_until(self, end: int) -> None:
        """Queue heartbeats for the unreported windows that start before `end` (lock held)."""
        start, spec = self._next_cover, self.spec
        if start is None or spec is None or end <= start:
            return
        self._next_cover = end
        if not self._heartbeats:
            return
        length = spec.window_length_s
        idle = (end - start) // length
        if idle > self._max_heartbeat_windows:
            logger.warning("no report for %d windows (clock jump or stall since %d): heartbeats "
                           "for the last %d only", idle, start, self._max_heartbeat_windows)
            start = end - self._max_heartbeat_windows * length
        for ws in range(start, end, length):
            if ws not in self._open:
                self._closed.append(_Heartbeat(spec, ws))

    def _count_internal_error(self, exc: Exception) -> None:
        self._internal_errors += 1
        if self._internal_errors in (1, 10, 100, 1000) or self._internal_errors % 10000 == 0:
            logger.error("fleetwatch monitor internal error #%d (the event was dropped): %r",
                         self._internal_errors, exc, exc_info=exc)

    # -- closing windows and delivering -------------------------------------------------------

    def _spool_closed(self) -> None:
        """Turn closed windows into reports in the spool (I/O: never on the hot path).

        The label cache's copy is brought up to date with them: once per closed window, not
        on every tick (one durable write a minute per device, not one a second)."""
        if self._closed:
            self._persist_label_cache()
        while True:
            with self._lock:
                if not self._closed:
                    return
                item = self._closed.popleft()
            heartbeat = isinstance(item, _Heartbeat) or item.idle
            release: Release | None = None
            if heartbeat:
                # No event and no label: no histograms, no latency sketch, no noise, no spend
                # (an idle window may still have counted unmatched labels and evictions).
                summary = Summary(features={}, prediction=None, report_count=1,
                                  heartbeat_count=1)
                if isinstance(item, WindowAccumulator):
                    summary.labels_unmatched_count = item.labels_unmatched
                    summary.label_cache_evicted_count = item.label_cache_evicted
            else:
                assert isinstance(item, WindowAccumulator)
                summary = item.to_summary()
                release = self._release(item, summary)
            start, spec = item.start_unix_s, item.spec

            def build(seq: int, dropped: int, start: int = start, spec: Spec = spec,
                      summary: Summary = summary, release: Release | None = release,
                      heartbeat: bool = heartbeat) -> bytes:
                summary.spool_dropped_count = dropped
                meta = ReportMeta(
                    device_id=self.device_id, model=self.model, model_version=self.model_version,
                    labels=self.labels, window_start_unix_s=start,
                    window_length_s=spec.window_length_s, seq=seq, spec_hash=spec.hash,
                    created_unix_ms=int(time.time() * 1000), agent_version=AGENT_VERSION,
                    private_withheld=release is not None and not release.allowed,
                    epsilon_spent=release.epsilon if release else 0.0,
                    day_epsilon_spent=release.day_epsilon if release else 0.0,
                    heartbeat=heartbeat)
                # Hand-encoded, the bytes protobuf would write (agent.pbwire): no protobuf
                # runtime on the send path.
                report = encode_report(meta, summary)
                if self._signer is not None:
                    return self._signer.envelope(report)
                return encode_envelope(report)

            self.spool.enqueue(start, build)
            if heartbeat:
                self._heartbeat_count += 1
            else:
                self._windows_closed += 1

    def _renumbered(self, payload: bytes, seq: int) -> bytes:
        """A spooled envelope with its report's seq replaced (signed again when signing).

        Replaced at the wire level (agent.pbwire): every other field keeps its bytes."""
        data = report_with_seq(envelope_report(payload), seq)
        if self._signer is not None:
            return self._signer.envelope(data)
        return encode_envelope(data)

    def _release(self, acc: WindowAccumulator, summary: Summary) -> Release | None:
        """Clamp, ask the accountant, and noise the private histograms (None: no noise)."""
        plan = noise_plan(acc.spec)
        if plan is None:
            return None
        # Invalid values and unknown feature names are counted from the model's inputs: exact
        # counts of them would leak what the noise protects. They stay on the device
        # (MonitorStats) under a noisy spec.
        self._invalid_kept += summary.invalid_value_count
        self._unknown_kept += summary.unknown_feature_count
        summary.invalid_value_count = summary.unknown_feature_count = 0
        if acc.spec.privacy.unit == DEVICE_DAY:
            if self._clamp_rng is None:
                # os.urandom, not `secrets`: secrets loads hmac and OpenSSL's hashlib (~1 MB).
                self._clamp_rng = np.random.default_rng(
                    int.from_bytes(os.urandom(16), "little"))
            clamp_summary(summary, acc.spec.privacy.max_events_per_window, self._clamp_rng)
        release = PrivacyAccountant(self.spool, acc.spec, plan).reserve(acc.start_unix_s)
        if release.allowed:
            if self._noise_rng is None:
                self._noise_rng = SecureRandom()
            noise_summary(summary, plan, self._noise_rng)
        return release

    def _deliver(self, deadline: float | None) -> DeliveryResult:
        with self._deliver_lock:
            result = self._uploader.deliver(deadline)
        if result is DeliveryResult.RETRY_LATER:
            self._next_attempt = time.monotonic() + self._backoff.next_delay_s()
        elif result is DeliveryResult.EMPTY:
            self._backoff.reset()
            self._next_attempt = 0.0
        return result

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.spec is None and time.monotonic() >= self._next_attempt:
                    if not self._load_spec():
                        self._next_attempt = time.monotonic() + self._backoff.next_delay_s()
                with self._lock:
                    self._close_expired(self.clock())
                self._spool_closed()
                if self.spec is not None and time.monotonic() >= self._next_attempt:
                    self._deliver(None)
            except Exception:
                logger.exception("fleetwatch background loop error")
            wait = self._tick_s
            if self._next_attempt:
                wait = max(0.05, min(wait, self._next_attempt - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()

    def poll(self, timeout_s: float = 10.0) -> bool:
        """Close the windows the clock has moved past, spool them and try to deliver.

        What the background thread does on each tick; call it yourself with
        `background=False`. Returns True when the spool is empty afterwards."""
        if self.spec is None:
            self._load_spec()
        with self._lock:
            self._close_expired(self.clock())
        self._spool_closed()
        return self._deliver(time.monotonic() + timeout_s) is DeliveryResult.EMPTY

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Close every open window and try to deliver everything spooled.

        Returns True when the spool is empty afterwards (everything acknowledged)."""
        deadline = time.monotonic() + timeout_s
        if self.spec is None:
            self._load_spec()
        with self._lock:
            self._close_expired(self.clock())
            for ws in sorted(self._open):
                self._close(self._open[ws])
        self._spool_closed()
        return self._deliver(deadline) is DeliveryResult.EMPTY

    def stats(self) -> MonitorStats:
        with self._lock:
            cached = len(self._label_cache)
        return MonitorStats(self._events, self._events_without_spec, self._windows_closed,
                            self._internal_errors, self.spool.stats(), self._uploader.last_error,
                            self._invalid_kept, self._unknown_kept,
                            labels_joined=self._labels_joined,
                            labels_unmatched=self._labels_unmatched,
                            label_cache_evicted=self._label_evicted,
                            label_cache_size=cached, heartbeats=self._heartbeat_count)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush, stop the background thread and release the spool. Idempotent."""
        if self._closed_flag:
            return
        self._closed_flag = True
        try:
            self.flush(timeout_s)
        finally:
            self._stop.set()
            self._wake.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
            if self._owns_channel:
                self._channel.close()
            self.spool.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


