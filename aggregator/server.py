"""Aggregator bootstrap: build the store, the services and the gRPC server.

    with serve(AggregatorConfig(db="fleet.db", listen="127.0.0.1:0")) as running:
        print(running.port)

With ``tls_dir`` (`fleetwatch certs init --dir DIR`) it serves mutual TLS on any address and
authorizes each call by the client certificate's role (`aggregator.auth`, docs/security.md);
without it, plaintext on loopback only.

With ``http_listen`` it also serves HTTP (`aggregator.http`): Prometheus ``/metrics``
(`aggregator.metrics`), the JSON API and the dashboard, on loopback without TLS and as HTTPS
requiring an operator certificate with ``tls_dir``.

With ``rules_path`` the server also evaluates alert rules on closed windows (event time) in a
background thread and notifies the log and ``webhooks`` (docs/alerts.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import pathlib
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from agent.errors import ConfigError
from aggregator.alerts.evaluator import AlertEvaluator, EvaluatorConfig, load_server_rules
from aggregator.auth import AuthInterceptor, RevocationList
from aggregator.cert_reload import ServerCertificates
from aggregator.forward import ForwardConfig, Forwarder
from aggregator.http import HttpContext, start_http
from aggregator.ingest import Ingestor
from aggregator.ingest_process import IngestProcess
from aggregator.keys import DeviceKeys
from aggregator.loopback import is_loopback
from aggregator.metrics import AlertCounter, Metrics, MetricsConfig
from aggregator.notify import LogNotifier, MultiNotifier, Notifier, WebhookNotifier
from aggregator.retention import RawRetention
from aggregator.rpc_server import RpcServer
from aggregator.service import AdminService, IngestService, QueryService, ingest_handler
from aggregator.store import Store, describe_db, open_store
from aggregator.validate import Limits
from protos import fleetwatch_pb2_grpc as pb_grpc

__all__ = ["AggregatorConfig", "RunningAggregator", "serve"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregatorConfig:
    db: str | pathlib.Path
    listen: str = "127.0.0.1:7070"
    workers: int = 8
    # Check and store reports in a child process with its own GIL (`aggregator.ingest_process`):
    # on two or more cores, the event loop and the ingest work then run side by side.
    ingest_process: bool = False
    # Largest Report envelope taken, far below gRPC's 4 MiB default. A large realistic report
    # (50 features x 20 bins of noisy counts, a prediction histogram, 10-class labels, a KLL
    # sketch of 10k latencies, 32 labels of 64 characters, a signature) serializes to ~9.7 kB
    # (tests/integration/test_limits_e2e.py measures it): 256 KiB leaves a 25x margin. Larger
    # envelopes are refused with INVALID_ARGUMENT (final: the device dead-letters them rather
    # than block its spool) and counted as "oversize"; gRPC itself
    # cuts messages above 2x this (grpc_receive_limit) before our code sees them, and those
    # are not counted (gRPC gives the server no hook for them).
    max_message_bytes: int = 256 << 10
    # Calls in flight or queued at once; beyond it gRPC refuses new calls at once with
    # RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded", not counted by us) instead of
    # queueing them without bound. Queued calls whose deadline passes are refused unhandled.
    max_concurrent_rpcs: int = 256
    limits: Limits = field(default_factory=Limits)
    # Alerting (docs/alerts.md): off without a rule file.
    rules_path: str | pathlib.Path | None = None
    webhooks: tuple[str, ...] = ()
    external_url: str = ""
    alert_lateness_s: float | None = None     # None: one window length
    alert_idle_flush_s: float = 30.0
    alert_tick_s: float = 0.5
    alert_max_windows_per_tick: int = 60
    webhook_timeout_s: float = 5.0
    # Mutual TLS (docs/security.md): ca.pem, server.pem, server.key and revoked.txt live here.
    tls_dir: str | pathlib.Path | None = None
    revocation_check_s: float = 1.0
    # Signed reports (docs/security.md): devices/<ID>.sign.pub live here (`fleetwatch serve
    # --tls-dir DIR` uses the same DIR). require_signatures None: required when
    # signing_keys_dir is given; False still verifies the signed reports but takes unsigned
    # ones (while a fleet migrates).
    signing_keys_dir: str | pathlib.Path | None = None
    require_signatures: bool | None = None
    # HTTP (aggregator.http, docs/metrics.md): off without http_listen ("HOST:PORT", port 0
    # picks one). The metrics_* fields bound what /metrics computes at each scrape.
    http_listen: str | None = None
    http_default_model: str | None = None
    metrics_groupings: tuple[tuple[str, ...], ...] = ()
    metrics_range_s: float = 300.0
    metrics_max_cohorts: int = 100
    # A regional aggregator (aggregator.forward, docs/scaling.md): also forward closed
    # windows, merged, to the central tier. Its outbox lives in its database (SQLite file,
    # or the PostgreSQL database its replicas share: one of them forwards at a time).
    forward: ForwardConfig | None = None
    # Raw report envelopes are dropped this long after their window (aggregator.retention);
    # None keeps them. Rows, rollups and counts stay.
    retain_raw_s: float | None = None

    def __post_init__(self) -> None:
        if self.retain_raw_s is not None and not self.retain_raw_s > 0:
            raise ConfigError(f"retain_raw_s: must be positive (or None: keep forever), got "
                              f"{self.retain_raw_s!r}")
        if self.require_signatures and self.signing_keys_dir is None:
            raise ConfigError("require_signatures: needs signing_keys_dir (--tls-dir), where "
                              "the devices' .sign.pub keys are")
        if self.signing_keys_dir is not None and not pathlib.Path(
                self.signing_keys_dir).is_dir():
            raise ConfigError(f"signing_keys_dir: {self.signing_keys_dir} is not a directory "
                              "(make it with `fleetwatch certs init --dir DIR`)")
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"listen: {self.listen!r} is not HOST:PORT")
        if self.tls_dir is None and not is_loopback(host):
            raise ConfigError(
                f"listen: {self.listen!r} is not a loopback address. Without TLS the "
                "aggregator serves loopback only (127.0.0.1, ::1, localhost); serve other "
                "addresses with mutual TLS (tls_dir / --tls-dir, docs/security.md)")
        if self.tls_dir is not None:
            missing = [n for n in TLS_FILES if not (pathlib.Path(self.tls_dir) / n).is_file()]
            if missing:
                raise ConfigError(f"tls_dir: {self.tls_dir} has no {', '.join(missing)} (make "
                                  "them with `fleetwatch certs init --dir DIR`)")
        if not (math.isfinite(self.revocation_check_s) and self.revocation_check_s >= 0):
            raise ConfigError(f"revocation_check_s: must be >= 0, got "
                              f"{self.revocation_check_s!r}")
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
        if self.http_listen is not None:
            h_host, h_sep, h_port = self.http_listen.rpartition(":")
            if not h_sep or not h_port.isdigit() or not 0 <= int(h_port) <= 65535:
                raise ConfigError(f"http_listen: {self.http_listen!r} is not HOST:PORT")
            if self.tls_dir is None and not is_loopback(h_host):
                raise ConfigError(
                    f"http_listen: {self.http_listen!r} is not a loopback address. Without TLS "
                    "the HTTP endpoint serves loopback only; with tls_dir (--tls-dir) it serves "
                    "HTTPS to operator certificates on any address")
        self.metrics_config()  # validates the metrics_* fields, naming them
        if not isinstance(self.max_message_bytes, int) or not (
                1 << 10) <= self.max_message_bytes <= (64 << 20):
            raise ConfigError(f"max_message_bytes: must be an integer in [1 KiB, 64 MiB], got "
                              f"{self.max_message_bytes!r}")
        if not isinstance(self.max_concurrent_rpcs, int) or self.max_concurrent_rpcs < 1:
            raise ConfigError(f"max_concurrent_rpcs: must be an integer >= 1, got "
                              f"{self.max_concurrent_rpcs!r}")
        if isinstance(self.webhooks, str):
            raise ConfigError("webhooks: give a sequence of URLs, not one string")
        object.__setattr__(self, "webhooks", tuple(self.webhooks))
        if self.webhooks and self.rules_path is None:
            raise ConfigError("webhooks: given without rules_path (--rules): nothing would be "
                              "sent")
        if not (math.isfinite(self.webhook_timeout_s) and self.webhook_timeout_s > 0):
            raise ConfigError(f"webhook_timeout_s: must be > 0, got {self.webhook_timeout_s!r}")
        self.evaluator_config()  # validates the alert_* fields, naming them

    def evaluator_config(self) -> EvaluatorConfig:
        try:
            return EvaluatorConfig(lateness_s=self.alert_lateness_s,
                                   idle_flush_s=self.alert_idle_flush_s,
                                   tick_s=self.alert_tick_s,
                                   max_windows_per_tick=self.alert_max_windows_per_tick,
                                   external_url=self.external_url)
        except ConfigError as e:  # name this config's field: lateness_s -> alert_lateness_s
            raise ConfigError(f"alert_{e}") from None

    def metrics_config(self) -> MetricsConfig:
        try:
            return MetricsConfig(groupings=self.metrics_groupings, range_s=self.metrics_range_s,
                                 max_cohorts=self.metrics_max_cohorts)
        except ConfigError as e:  # name this config's field: range_s -> metrics_range_s
            raise ConfigError(f"metrics_{e}") from None

    @property
    def grpc_receive_limit(self) -> int:
        """gRPC's own cut (grpc.max_receive_message_length): above ours, so that moderately
        oversize reports reach our check and are counted; only absurd ones are cut unseen."""
        return 2 * self.max_message_bytes


TLS_FILES = ("ca.pem", "server.pem", "server.key")


@dataclass
class RunningAggregator:
    server: RpcServer
    port: int
    store: Store
    ingestor: Ingestor
    alerts: AlertEvaluator | None = None
    http_port: int | None = None   # None: no HTTP endpoint (AggregatorConfig.http_listen)
    metrics: Metrics | None = None
    forwarder: Forwarder | None = None   # a regional aggregator's (AggregatorConfig.forward)
    retention: RawRetention | None = None  # AggregatorConfig.retain_raw_s

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def serve(config: AggregatorConfig) -> Iterator[RunningAggregator]:
    """Start the aggregator; yields it with its bound port and always stops it.

    A bad rule file or webhook URL raises ``ConfigError`` before anything listens."""
    # Read now: a bad file fails before the store opens. Reread while serving (rotation).
    certificates = None if config.tls_dir is None else ServerCertificates(config.tls_dir)
    credentials = None if certificates is None else certificates.grpc_credentials()
    # Readers: one per gRPC worker and a few for HTTP, alerting and forwarding (HTTP threads
    # beyond that wait their turn rather than open a connection each).
    store = open_store(config.db, forwarding=config.forward is not None,
                       readers=config.workers + 4)
    try:
        forwarder = (None if config.forward is None
                     else Forwarder(config.db, config.forward,
                                    lambda h: store.get_spec("", spec_hash=h), store=store))
    except BaseException:
        store.close()
        raise
    alert_counter = AlertCounter() if config.http_listen is not None else None
    try:
        evaluator = _alert_evaluator(config, store, alert_counter)
    except BaseException:
        if forwarder is not None:
            forwarder.close()
        store.close()
        raise
    try:
        process = (IngestProcess(config.db, forwarding=config.forward is not None,
                                 limits=config.limits) if config.ingest_process else None)
    except BaseException:
        if evaluator is not None:
            evaluator.close(timeout_s=0.0)
        if forwarder is not None:
            forwarder.close()
        store.close()
        raise
    ingestor = Ingestor(store, config.limits,
                        on_accepted=_on_accepted(evaluator, forwarder),
                        keys=(None if config.signing_keys_dir is None
                              else DeviceKeys(config.signing_keys_dir)),
                        require_signatures=config.require_signatures, process=process)
    if process is not None:
        logger.info("reports checked and stored by ingest process %s", process.pid)
    if ingestor.keys is not None:
        logger.info("report signatures: verified with keys from %s/devices, %s",
                    config.signing_keys_dir, "required" if ingestor.require_signatures
                    else "unsigned reports still taken")
    revoked = None if credentials is None else RevocationList(
        pathlib.Path(config.tls_dir) / "revoked.txt",  # type: ignore[arg-type]
        check_interval_s=config.revocation_check_s)
    interceptors: list[grpc.aio.ServerInterceptor] = [] if revoked is None else [
        AuthInterceptor(revoked, count=ingestor.count_rejected)]
    metrics = None
    if config.http_listen is not None:
        metrics = Metrics(store, ingestor, evaluator, config.metrics_config(),
                          alert_counter=alert_counter,
                          forwarding=None if forwarder is None else forwarder.stats)
        interceptors.append(metrics.grpc_interceptor())  # after auth: refused calls not timed
    admin_handler = _servicer_handler(pb_grpc.add_AdminServicer_to_server, AdminService(
        store, ingestor, forwarding=None if forwarder is None else forwarder.stats))
    query_handler = _servicer_handler(pb_grpc.add_QueryServicer_to_server,
                                      QueryService(store, alerts=evaluator))
    try:
        server = RpcServer(
            config.listen, credentials,
            handlers=[ingest_handler(IngestService(ingestor, store,
                                                   max_message_bytes=config.max_message_bytes)),
                      admin_handler, query_handler],
            workers=config.workers,
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", config.grpc_receive_limit),
                     ("grpc.max_send_message_length", 64 << 20),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        port, failure = server.port, None
    except BaseException as e:  # stop what was started, then raise it
        port, failure = 0, e
    if port == 0:
        ingestor.close()
        if evaluator is not None:
            evaluator.close(timeout_s=0.0)
        if forwarder is not None:
            forwarder.close()
        store.close()
        if failure is not None:
            raise failure
        raise ConfigError(f"listen: could not bind {config.listen} (in use?)")
    http_server = None
    if config.http_listen is not None:
        try:
            http_server = start_http(
                config.http_listen,
                HttpContext(store, evaluator, ingestor, config.http_default_model), metrics,
                None if certificates is None else certificates.ssl_context(), revoked)
        except (OSError, ssl.SSLError) as e:
            server.stop(grace_s=None)
            ingestor.close()
            if evaluator is not None:
                evaluator.close(timeout_s=0.0)
            if forwarder is not None:
                forwarder.close()
            store.close()
            raise ConfigError(f"http_listen: could not serve {config.http_listen} ({e})"
                              ) from None
        logger.info("HTTP on %s:%d (%s): /metrics, /api/..., dashboard at /",
                    config.http_listen.rsplit(":", 1)[0], http_server.port,
                    "HTTPS, operator certificates only" if config.tls_dir else
                    "WITHOUT TLS, loopback only")
    if evaluator is not None:
        evaluator.start()
    if forwarder is not None:
        forwarder.start()
    retention = None
    if config.retain_raw_s is not None:
        retention = RawRetention(store, config.retain_raw_s)
        retention.start()
    address = config.listen.rsplit(":", 1)[0] + f":{port}"
    if credentials is None:
        logger.warning("serving on %s WITHOUT TLS (loopback only) with database %s", address,
                       describe_db(config.db))
    else:
        logger.info("serving on %s with mutual TLS (certificates and revoked.txt in %s) with "
                    "database %s", address, config.tls_dir, describe_db(config.db))
    try:
        yield RunningAggregator(server, port, store, ingestor, evaluator,
                                None if http_server is None else http_server.port, metrics,
                                forwarder, retention)
    finally:
        if http_server is not None:
            http_server.close()
        if certificates is not None:
            certificates.close()
        server.stop(grace_s=2.0)
        ingestor.close()  # what the writer still holds is stored before the store closes
        if evaluator is not None:
            # Bounded: a hung webhook receiver delays shutdown by at most this much.
            evaluator.close(timeout_s=2.0)
        if forwarder is not None:
            forwarder.close()
        if retention is not None:
            retention.close()
        store.close()


class _HandlerCollector:
    """What the generated ``add_*Servicer_to_server`` functions need of a server: they
    register their generic handler on it, which we keep for `RpcServer`."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        pass  # an optimisation for registered methods; the generic handler serves them too


def _servicer_handler(add: Callable[[Any, Any], None], servicer: Any) -> grpc.GenericRpcHandler:
    collector = _HandlerCollector()
    add(servicer, collector)
    (handler,) = collector.handlers
    return handler


def _on_accepted(evaluator: AlertEvaluator | None, forwarder: Forwarder | None
                 ) -> Callable[[str, int, str], None] | None:
    """The Ingestor's hook: both the alert watermark and the forwarding watermark."""
    hooks = [h.on_accepted for h in (evaluator, forwarder) if h is not None]
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def both(spec_hash: str, window_start: int, sender: str) -> None:
        for hook in hooks:
            hook(spec_hash, window_start, sender)

    return both


def _alert_evaluator(config: AggregatorConfig, store: Store,
                     counter: AlertCounter | None = None) -> AlertEvaluator | None:
    if config.rules_path is None:
        return None
    rules = load_server_rules(config.rules_path, store)
    sinks: list[Notifier] = [LogNotifier()]
    if counter is not None:
        sinks.append(counter)  # the alert rate per rule, for /metrics
    if config.webhooks:
        sinks.append(WebhookNotifier(config.webhooks, timeout_s=config.webhook_timeout_s,
                                     external_url=config.external_url))
    return AlertEvaluator(store, rules, MultiNotifier(sinks), config.evaluator_config())
