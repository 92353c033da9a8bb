"""Aggregator bootstrap: build the store, the services and the gRPC server.

    with serve(AggregatorConfig(db="fleet.db", listen="127.0.0.1:0")) as running:
        print(running.port)

With ``rules_path`` the server also evaluates alert rules on closed windows (event time) in a
background thread and notifies the log and ``webhooks`` (docs/alerts.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import pathlib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from agent.errors import ConfigError
from aggregator.alerts.evaluator import AlertEvaluator, EvaluatorConfig, load_server_rules
from aggregator.ingest import Ingestor
from aggregator.notify import LogNotifier, MultiNotifier, Notifier, WebhookNotifier
from aggregator.service import AdminService, IngestService, QueryService, ingest_handler
from aggregator.store.sqlite import SqliteStore
from aggregator.validate import Limits
from protos import fleetwatch_pb2_grpc as pb_grpc

__all__ = ["AggregatorConfig", "RunningAggregator", "serve"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregatorConfig:
    db: str | pathlib.Path
    listen: str = "127.0.0.1:7070"
    workers: int = 8
    max_message_bytes: int = 4 << 20
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

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"listen: {self.listen!r} is not HOST:PORT")
        if not _is_loopback(host):
            raise ConfigError(
                f"listen: {self.listen!r} is not a loopback address. Without TLS the "
                "aggregator serves loopback only (127.0.0.1, ::1, localhost); mutual TLS for "
                "remote devices is not implemented yet")
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
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


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class RunningAggregator:
    server: grpc.Server
    port: int
    store: SqliteStore
    ingestor: Ingestor
    alerts: AlertEvaluator | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def serve(config: AggregatorConfig) -> Iterator[RunningAggregator]:
    """Start the aggregator; yields it with its bound port and always stops it.

    A bad rule file or webhook URL raises ``ConfigError`` before anything listens."""
    store = SqliteStore(config.db)
    try:
        evaluator = _alert_evaluator(config, store)
    except BaseException:
        store.close()
        raise
    ingestor = Ingestor(store, config.limits,
                        on_accepted=evaluator.on_accepted if evaluator else None)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers,
                                   thread_name_prefix="fleetwatch-rpc"),
        options=[("grpc.max_receive_message_length", config.max_message_bytes),
                 ("grpc.max_send_message_length", 64 << 20),
                 ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    server.add_generic_rpc_handlers((ingest_handler(IngestService(ingestor, store)),))
    pb_grpc.add_AdminServicer_to_server(AdminService(store), server)
    pb_grpc.add_QueryServicer_to_server(QueryService(store, alerts=evaluator), server)
    port = server.add_insecure_port(config.listen)
    if port == 0:
        if evaluator is not None:
            evaluator.close(timeout_s=0.0)
        store.close()
        raise ConfigError(f"listen: could not bind {config.listen} (in use?)")
    server.start()
    if evaluator is not None:
        evaluator.start()
    logger.warning("serving on %s WITHOUT TLS (loopback only) with database %s",
                   config.listen.rsplit(":", 1)[0] + f":{port}", config.db)
    try:
        yield RunningAggregator(server, port, store, ingestor, evaluator)
    finally:
        server.stop(grace=2).wait()
        if evaluator is not None:
            # Bounded: a hung webhook receiver delays shutdown by at most this much.
            evaluator.close(timeout_s=2.0)
        store.close()


def _alert_evaluator(config: AggregatorConfig, store: SqliteStore) -> AlertEvaluator | None:
    if config.rules_path is None:
        return None
    rules = load_server_rules(config.rules_path, store)
    sinks: list[Notifier] = [LogNotifier()]
    if config.webhooks:
        sinks.append(WebhookNotifier(config.webhooks, timeout_s=config.webhook_timeout_s,
                                     external_url=config.external_url))
    return AlertEvaluator(store, rules, MultiNotifier(sinks), config.evaluator_config())
