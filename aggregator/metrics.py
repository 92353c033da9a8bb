"""Prometheus metrics of the aggregator, computed when scraped (served by `aggregator.http`).

    metrics = Metrics(store, ingestor, alerts, MetricsConfig(groupings=(("region", "hw"),)))
    body = metrics.exposition()          # the text format, what GET /metrics answers

Per cohort SLIs, drift, privacy state and telemetry cost are computed at scrape time with the
same functions the Query API uses (`aggregator.query.cohort_health`, `cohort_privacy`) over
the trailing ``range_s`` (whole windows, ending at the last closed window at the scrape), so a
scraped value equals what the Query API answers for that cohort over the range the scrape
exposes (``fleetwatch_metrics_range_{start,end}_seconds``; `health --since RANGE` aligns its
range outward and may hold one window more), latency quantiles within the KLL rank error.

Cardinality is bounded by configuration: cohorts of the configured ``groupings`` only (default:
the whole fleet plus each label key on its own, never every combination of keys), at most
``max_cohorts`` of them per scrape over all models (the worst kept, the number left out in
``fleetwatch_metrics_cohorts_dropped``). Every metric and its labels: docs/metrics.md.

Everything lives in the `Metrics` object's own `CollectorRegistry`, never the process-global
default one, so two aggregators in one process (the tests) never see each other's metrics.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.errors import ConfigError
from aggregator.alerts.evaluator import AlertEvaluator
from aggregator.ingest import Ingestor
from aggregator.notify import Notification
from aggregator.query import CohortHealth, CohortPrivacy, cohort_health, cohort_privacy
from aggregator.render import cohort_status
from aggregator.service import health_to_proto
from aggregator.store.base import DAY_S, Store, canonical_labels, parse_labels

__all__ = ["AlertCounter", "Metrics", "MetricsConfig", "QueryTimer", "parse_groupings"]

logger = logging.getLogger(__name__)

PREFIX = "fleetwatch_"
FLEET = "fleet"  # the `grouping` label of the whole-fleet cohorts
DEFAULT_RANGE_S = 300.0
DEFAULT_MAX_COHORTS = 100
# Query latency buckets (seconds): a health query over a day of a large fleet takes ~0.1-1 s.
QUERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUERY_PREFIX = "/fleetwatch.v1.Query/"
# Our own label names: a device label key equal to one of these is exposed as label_<key>.
_RESERVED = frozenset({"model", "model_version", "grouping", "quantile", "feature", "rule",
                       "severity", "state", "slo", "window", "reason", "api", "method", "le",
                       "job", "instance"})
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_QUANTILES = (("0.5", "latency_p50_ms"), ("0.95", "latency_p95_ms"), ("0.99", "latency_p99_ms"))
# Ground-truth SLIs exposed when the model gets labels: (metric suffix, CohortHealth attribute).
_GROUND_TRUTH = (("accuracy_ratio", "accuracy"), ("f1_ratio", "f1"), ("ece_ratio", "ece"),
                 ("mae", "mae"), ("rmse", "rmse"), ("labeled", "labeled"))


def parse_groupings(texts: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    """``["region,hw", "region"]`` (repeated ``--metrics-by``) -> ``(("hw", "region"),
    ("region",))``; ``"fleet"`` or ``""`` stands for the whole fleet."""
    out: list[tuple[str, ...]] = []
    for text in texts:
        keys = tuple(sorted({k.strip() for k in text.split(",") if k.strip()}))
        if keys == (FLEET,):
            keys = ()
        if keys not in out:
            out.append(keys)
    return tuple(out)


@dataclass(frozen=True)
class MetricsConfig:
    """``groupings``: the label-key tuples cohorts are formed by (``()`` is the whole fleet);
    empty: the fleet plus each label key the devices report, alone. ``range_s``: the trailing
    range the per-cohort values cover. ``max_cohorts``: cohorts exposed per scrape, over every
    model and grouping (the worst kept)."""

    groupings: tuple[tuple[str, ...], ...] = ()
    range_s: float = DEFAULT_RANGE_S
    max_cohorts: int = DEFAULT_MAX_COHORTS

    def __post_init__(self) -> None:
        if isinstance(self.groupings, str):
            raise ConfigError("groupings: give a sequence of key tuples, e.g. "
                              "(('region', 'hw'),), not one string")
        groupings = tuple(tuple(g) for g in self.groupings)
        for g in groupings:
            if any(not isinstance(k, str) or not k or "," in k or "=" in k for k in g):
                raise ConfigError(f"groupings: {g!r} holds an empty or malformed label key")
        object.__setattr__(self, "groupings", groupings)
        if not (isinstance(self.range_s, int | float) and math.isfinite(self.range_s)
                and 1 <= self.range_s <= 31 * DAY_S):
            raise ConfigError(f"range_s: must be between 1 s and 31 days, got {self.range_s!r}")
        if not isinstance(self.max_cohorts, int) or isinstance(self.max_cohorts, bool) \
                or not 1 <= self.max_cohorts <= 100_000:
            raise ConfigError(f"max_cohorts: must be an integer in [1, 100000], got "
                              f"{self.max_cohorts!r}")


class AlertCounter:
    """A `Notifier` that counts firing notifications per (model, version, rule, severity):
    the alert rate per rule (a noisy rule is itself a problem). Never blocks, never raises."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._firing: dict[tuple[str, str, str, str], int] = {}

    def notify(self, notifications: Sequence[Notification]) -> bool:
        with self._lock:
            for n in notifications:
                if n.status != "firing":
                    continue
                key = (n.labels.get("model", ""), n.labels.get("model_version", ""),
                       n.labels["alertname"], n.labels["severity"])
                self._firing[key] = self._firing.get(key, 0) + 1
        return True

    def close(self, timeout_s: float = 5.0) -> bool:
        return True

    def counts(self) -> dict[tuple[str, str, str, str], int]:
        with self._lock:
            return dict(self._firing)


class QueryTimer(grpc.aio.ServerInterceptor):
    """Observes the duration of every Query RPC into ``observe(method, seconds)`` (an
    interceptor of the asyncio server; the Query handlers are plain functions it runs in its
    thread pool)."""

    def __init__(self, observe: Callable[[str, float], None]) -> None:
        self.observe = observe

    async def intercept_service(self, continuation: Callable[[Any], Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(QUERY_PREFIX):
            return handler
        behaviour, name = handler.unary_unary, method[len(QUERY_PREFIX):]

        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            t0 = time.perf_counter()
            try:
                return behaviour(request, context)
            finally:
                self.observe(name, time.perf_counter() - t0)

        return grpc.unary_unary_rpc_method_handler(
            timed, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class Metrics:
    """The aggregator's metrics: one registry holding the scrape-time collector and the query
    latency histogram. Thread-safe (scrapes may overlap)."""

    def __init__(self, store: Store, ingestor: Ingestor, alerts: AlertEvaluator | None = None,
                 config: MetricsConfig | None = None, *, alert_counter: AlertCounter | None = None,
                 clock: Callable[[], float] = time.time,
                 forwarding: Callable[[], dict[str, int]] | None = None) -> None:
        self.config = config or MetricsConfig()
        self.registry = CollectorRegistry(auto_describe=False)
        self.query_seconds = Histogram(
            "fleetwatch_query_duration_seconds",
            "Duration of operator queries: gRPC Query methods and the HTTP JSON API.",
            ["api", "method"], buckets=QUERY_BUCKETS, registry=self.registry)
        self.collector = FleetCollector(store, ingestor, alerts, self.config,
                                        alert_counter=alert_counter, clock=clock,
                                        forwarding=forwarding)
        self.registry.register(self.collector)

    def observe_query(self, api: str, method: str, seconds: float) -> None:
        self.query_seconds.labels(api, method).observe(seconds)

    def grpc_interceptor(self) -> QueryTimer:
        return QueryTimer(lambda method, s: self.observe_query("grpc", method, s))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _label_names(keys: Iterable[str]) -> dict[str, str]:
    """Device label key -> a valid Prometheus label name, distinct and not one of ours."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for key in sorted(set(keys)):
        name = re.sub(r"[^a-zA-Z0-9_]", "_", key)
        if not _LABEL_NAME.fullmatch(name) or name.startswith("__") or name in _RESERVED:
            name = "label_" + name
        base, n = name, 2
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        out[key] = name
    return out


@dataclass(frozen=True)
class _Cohort:
    health: CohortHealth
    grouping: tuple[str, ...]
    privacy: CohortPrivacy | None
    bytes_total: int
    bytes_last_day: int


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _badness(c: _Cohort) -> tuple:
    """Sort key, worst first: the fleet cohorts, then by health problems, largest PSI, error
    rate, lowest availability."""
    h = c.health
    problems = len(cohort_status(health_to_proto(h)))
    psi = max((f.scores.psi for f in h.features if _finite(f.scores.psi)), default=0.0)
    return (c.grouping != (), -problems, -psi,
            -(h.error_rate if _finite(h.error_rate) else 0.0),
            h.availability if _finite(h.availability) else 1.0)


# A regional aggregator's forwarding (Admin.ServerStats forwarding): (name, help, is_counter).
_FORWARDING = (
    ("forwarded", "Forwarded reports built from closed windows since start.", True),
    ("sent", "Forwarded reports the upstream accepted since start.", True),
    ("duplicates", "Forwarded reports the upstream already had (acknowledgement lost).", True),
    ("dead_letters", "Forwarded reports the upstream refused for good since start.", True),
    ("pending", "Accepted reports not yet in a forwarded report.", False),
    ("outbox", "Forwarded reports not yet acknowledged by the upstream.", False),
    ("dead_letter_rows", "Forwarded reports kept in forward_dead_letters.", False),
    ("leading", "1 if this replica holds the region's forwarding lease (builds and sends).",
     False),
)


def _forwarding_metrics(counts: dict[str, int]) -> Iterator[Metric]:
    for name, text, counter in _FORWARDING:
        if counter:
            yield CounterMetricFamily(f"{PREFIX}forward_{name}", text,
                                      value=counts.get(name, 0))
        else:
            yield _gauge(f"forward_{name}", text, counts.get(name, 0))


class FleetCollector(Collector):
    """Computes every metric but the query histogram at each scrape (see the module doc)."""

    def __init__(self, store: Store, ingestor: Ingestor, alerts: AlertEvaluator | None,
                 config: MetricsConfig, *, alert_counter: AlertCounter | None = None,
                 clock: Callable[[], float] = time.time,
                 forwarding: Callable[[], dict[str, int]] | None = None) -> None:
        self.store = store
        self.forwarding = forwarding   # a regional aggregator's (aggregator.forward)
        self.ingestor = ingestor
        self.alerts = alerts
        self.config = config
        self.alert_counter = alert_counter
        self.clock = clock
        self.started_unix_s = clock()
        self.scrape_errors = 0

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        yield from self._server_metrics()
        try:
            yield from self._cohort_metrics()
        except Exception:  # a scrape must answer; what failed is logged and counted
            self.scrape_errors += 1
            logger.exception("metrics: computing the cohort metrics failed")
        try:
            yield from self._alert_metrics()
        except Exception:
            self.scrape_errors += 1
            logger.exception("metrics: computing the alert metrics failed")
        errors = CounterMetricFamily(f"{PREFIX}metrics_scrape_errors",
                                     "Scrapes whose cohort or alert metrics failed (logged).")
        errors.add_metric([], self.scrape_errors)
        yield errors
        yield _gauge("metrics_collect_seconds", "Time this scrape took to compute.",
                     time.perf_counter() - t0)

    # -- the aggregator's own health ------------------------------------------------------------

    def _server_metrics(self) -> Iterator[Metric]:
        stats = self.ingestor.stats()
        accepted = CounterMetricFamily(f"{PREFIX}reports_accepted",
                                       "Reports accepted and merged (Admin.ServerStats "
                                       "accepted); rate() is the ingest rate.")
        accepted.add_metric([], stats.accepted)
        yield accepted
        duplicates = CounterMetricFamily(f"{PREFIX}reports_duplicate",
                                         "Reports acknowledged as duplicates, not merged again.")
        duplicates.add_metric([], stats.duplicates)
        yield duplicates
        rejected = CounterMetricFamily(f"{PREFIX}reports_rejected",
                                       "Reports and calls refused, by reason (Admin.ServerStats "
                                       "rejected).", labels=["reason"])
        for reason, n in sorted(stats.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        received = CounterMetricFamily(f"{PREFIX}received_bytes",
                                       "Envelope bytes of accepted reports since start.")
        received.add_metric([], sum(self.ingestor.received_bytes().values()))
        yield received
        yield _gauge("aggregator_start_time_seconds", "When this aggregator started (Unix s).",
                     self.started_unix_s)
        if self.forwarding is not None:
            yield from _forwarding_metrics(self.forwarding())

    # -- per cohort -----------------------------------------------------------------------------

    def _groupings(self, spec_hash: str) -> tuple[tuple[str, ...], ...]:
        if self.config.groupings:
            return self.config.groupings
        keys = sorted({k for ls in self.store.label_sets(spec_hash) for k in ls.labels})
        return ((), *((k,) for k in keys))

    def _cohort_metrics(self) -> Iterator[Metric]:
        now = self.clock()
        cohorts: list[_Cohort] = []
        ranges: list[tuple[str, str, int, int]] = []
        references: list[tuple[str, str, tuple[float, float, float]]] = []
        budgets: list[tuple[str, str, float]] = []
        bytes_total = self.ingestor.received_bytes()
        bytes_day = self.ingestor.received_bytes(since_unix_s=now - DAY_S)
        specs = self.store.list_specs()
        versions = sorted({(s.model, s.model_version) for s in specs})
        for model, version in versions:
            spec = self.store.get_spec(model, version)
            if spec is None:
                continue
            hashes = {s.hash for s in specs if (s.model, s.model_version) == (model, version)}
            # Exactly range_s in whole windows (rounded up), ending with the window in progress.
            window = spec.window_length_s
            end = -(-int(now) // window) * window
            start = end - -(-int(self.config.range_s) // window) * window
            first = True
            for grouping in self._groupings(spec.hash):
                healths = cohort_health(self.store, model, version, {}, grouping, start, end,
                                        now=now)
                if first and healths:
                    ranges.append((model, version, healths[0].start_unix_s,
                                   healths[0].end_unix_s))
                    references.append((model, version, healths[0].reference_latency_ms))
                    budgets.append((model, version, spec.privacy.daily_epsilon_budget))
                    first = False
                privacy = {canonical_labels(p.cohort): p for p in cohort_privacy(
                    self.store, model, version, {}, grouping, start, end, now=now)}
                for h in healths:
                    def in_cohort(canonical: str, h: CohortHealth = h,
                                  grouping: tuple[str, ...] = grouping) -> bool:
                        labels = parse_labels(canonical)
                        return all(labels.get(k, "") == h.cohort.get(k, "") for k in grouping)

                    cohorts.append(_Cohort(
                        h, grouping, privacy.get(canonical_labels(h.cohort)),
                        sum(n for (sh, ls), n in bytes_total.items()
                            if sh in hashes and in_cohort(ls)),
                        sum(n for (sh, ls), n in bytes_day.items()
                            if sh in hashes and in_cohort(ls))))
        cohorts.sort(key=_badness)
        kept, dropped = cohorts[:self.config.max_cohorts], len(cohorts) - self.config.max_cohorts
        yield _gauge("metrics_cohorts", "Cohorts exposed by this scrape.", len(kept))
        yield _gauge("metrics_cohorts_dropped",
                     "Cohorts left out by the --metrics-max-cohorts bound (the worst are kept).",
                     max(0, dropped))
        yield _gauge("metrics_max_cohorts", "The configured bound on cohorts per scrape.",
                     self.config.max_cohorts)
        yield _gauge("metrics_range_seconds", "The configured trailing range of the cohort "
                     "metrics.", self.config.range_s)

        model_labels = ["model", "model_version"]
        fam = GaugeMetricFamily(f"{PREFIX}metrics_range_start_seconds",
                                "Start of the range the cohort metrics cover (Unix s, window "
                                "aligned; query the API with it to get the same values).",
                                labels=model_labels)
        fam_end = GaugeMetricFamily(f"{PREFIX}metrics_range_end_seconds",
                                    "End (exclusive) of the range the cohort metrics cover.",
                                    labels=model_labels)
        for model, version, lo, hi in ranges:
            fam.add_metric([model, version], lo)
            fam_end.add_metric([model, version], hi)
        yield fam
        yield fam_end
        ref = GaugeMetricFamily(f"{PREFIX}model_reference_latency_ms",
                                "The spec's reference latency quantiles.",
                                labels=[*model_labels, "quantile"])
        for model, version, quantiles in references:
            for (q, _), v in zip(_QUANTILES, quantiles, strict=True):
                if _finite(v):
                    ref.add_metric([model, version, q], v)
        yield ref
        budget = GaugeMetricFamily(f"{PREFIX}model_privacy_daily_epsilon_budget",
                                   "The spec's daily privacy budget per device (0: none).",
                                   labels=model_labels)
        for model, version, eps in budgets:
            budget.add_metric([model, version], eps)
        yield budget
        yield from _cohort_families(kept)

    # -- alerts ---------------------------------------------------------------------------------

    def _alert_metrics(self) -> Iterator[Metric]:
        yield _gauge("alert_rules_loaded", "1 when the aggregator evaluates alert rules.",
                     1.0 if self.alerts is not None else 0.0)
        firing = CounterMetricFamily(
            f"{PREFIX}alert_firing_notifications",
            "Firing notifications sent per rule since start (escalations included): the "
            "alert rate per rule.", labels=["model", "model_version", "rule", "severity"])
        if self.alert_counter is not None:
            for key, n in sorted(self.alert_counter.counts().items()):
                firing.add_metric(list(key), n)
        yield firing
        if self.alerts is None:
            return
        # Replicas on one database: which one evaluates, and that only it does.
        yield _gauge("alert_leader", "1 while this replica holds the alert lease and "
                     "evaluates the rules.", 1.0 if self.alerts.leading else 0.0)
        yield CounterMetricFamily(f"{PREFIX}alert_windows_evaluated",
                                  "Windows this replica evaluated the rules on since start.",
                                  value=self.alerts.windows_evaluated)
        view = self.alerts.view(resolved_limit=0)
        current = [a for a in view.alerts if a.state in ("pending", "firing")]
        names = _label_names({k for a in current for k, _ in a.cohort}
                             | {k for b in view.budgets for k, _ in b.budget.cohort})
        keys = sorted(names)
        cohort_names = [names[k] for k in keys]
        active = GaugeMetricFamily(
            f"{PREFIX}alert_active", "1 per alert pending or firing, as the evaluator holds it.",
            labels=["model", "model_version", "rule", "severity", "state", *cohort_names])
        for a in current:
            cohort = dict(a.cohort)
            active.add_metric([a.model, a.model_version, a.rule, a.severity, a.state,
                               *(cohort.get(k, "") for k in keys)], 1.0)
        yield active
        left = GaugeMetricFamily(f"{PREFIX}slo_budget_left_ratio",
                                 "Share of the SLO's error budget left over its period.",
                                 labels=["model", "model_version", "slo", *cohort_names])
        burn = GaugeMetricFamily(f"{PREFIX}slo_burn_rate",
                                 "The SLO's error budget burn rate over each alert window.",
                                 labels=["model", "model_version", "slo", "window",
                                         *cohort_names])
        for mb in view.budgets:
            b = mb.budget
            cohort = dict(b.cohort)
            values = [cohort.get(k, "") for k in keys]
            if _finite(b.left_fraction):
                left.add_metric([mb.model, mb.model_version, b.slo, *values], b.left_fraction)
            for window, rate in sorted(b.burn_rates.items()):
                if _finite(rate):
                    burn.add_metric([mb.model, mb.model_version, b.slo, window, *values], rate)
        yield left
        yield burn


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


def _cohort_families(cohorts: Sequence[_Cohort]) -> Iterator[Metric]:
    """The per-cohort families; labels: model, model_version, grouping, then every grouping
    key (empty where a cohort's grouping lacks it)."""
    names = _label_names(k for c in cohorts for k in c.grouping)
    keys = sorted(names)
    base = ["model", "model_version", "grouping", *(names[k] for k in keys)]
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

    def fam(name: str, doc: str, extra: Sequence[str] = (), counter: bool = False
            ) -> GaugeMetricFamily | CounterMetricFamily:
        if name not in families:
            cls = CounterMetricFamily if counter else GaugeMetricFamily
            families[name] = cls(f"{PREFIX}cohort_{name}", doc, labels=[*base, *extra])
        return families[name]

    def put(name: str, doc: str, labels: Sequence[str], value: float,
            extra_names: Sequence[str] = (), extra: Sequence[str] = (),
            counter: bool = False) -> None:
        f = fam(name, doc, extra_names, counter)  # declared even when NaN: stable families
        if _finite(value):
            f.add_metric([*labels, *extra], float(value))

    for c in cohorts:
        h = c.health
        labels = [h.model, h.model_version, ",".join(c.grouping) or FLEET,
                  *(str(h.cohort.get(k, "")) if k in c.grouping else "" for k in keys)]
        put("devices", "Devices that reported in the range.", labels, h.devices)
        put("reports", "Reports merged in the range (heartbeats included).", labels, h.reports)
        put("events", "Predictions observed in the range.", labels, h.events)
        put("errors", "Predictions that failed in the range.", labels, h.errors)
        put("error_ratio", "errors / events in the range.", labels, h.error_rate)
        for (q, attr) in _QUANTILES:
            put("latency_ms", "Latency quantiles over the range (merged KLL sketch).", labels,
                getattr(h, attr), ["quantile"], [q])
        put("availability_ratio", "Devices that reported in the range over those that did in "
            "the day before its end.", labels, h.availability)
        put("problems", "Health problems (drift, insufficient data, latency, errors), as "
            "`fleetwatch health` lists them; 0 is healthy.", labels,
            len(cohort_status(health_to_proto(h))))
        put("spool_dropped", "Reports the devices' spools dropped (full), as reported in the "
            "range.", labels, h.spool_dropped)
        put("withheld_reports", "Reports in the range whose private signals were withheld "
            "(privacy budget spent).", labels, h.withheld_reports)
        for suffix, attr in _GROUND_TRUTH:
            if h.ground_truth.task:
                put(suffix, f"Ground-truth SLI {attr} over the range (labeled predictions).",
                    labels, getattr(h, attr, math.nan))
        for f in (*h.features, *([h.prediction] if h.prediction is not None else [])):
            put("feature_psi", "PSI of the feature against the reference over the range.",
                labels, f.scores.psi, ["feature"], [f.name])
            put("feature_drifting", "1 when the feature drifts (PSI over the threshold and "
                "significant under the cohort's noise).", labels, 1.0 if f.drifting else 0.0,
                ["feature"], [f.name])
        p = c.privacy
        if p is not None:
            put("privacy_devices_withholding", "Devices that withheld private signals in the "
                "range (budget spent).", labels, p.stats.devices_withholding)
            put("privacy_day_epsilon_max", "Largest daily epsilon a device spent (range).",
                labels, p.stats.max_day_epsilon)
            put("privacy_day_epsilon_mean", "Mean over devices of the largest daily epsilon "
                "spent (range).", labels, p.stats.mean_day_epsilon)
        put("received_bytes", "Envelope bytes of the cohort's accepted reports since the "
            "aggregator started.", labels, c.bytes_total, counter=True)
        if h.devices_last_day:
            put("received_bytes_per_device_day", "Telemetry cost: envelope bytes received in "
                "the trailing day (since start when shorter) per device that reported in it.",
                labels, c.bytes_last_day / h.devices_last_day)
    yield from families.values()
