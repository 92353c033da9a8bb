"""Aggregator bootstrap: build the store, the services and the gRPC server.

    with serve(AggregatorConfig(db="fleet.db", listen="127.0.0.1:0")) as running:
        print(running.port)
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import pathlib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from agent.errors import ConfigError
from aggregator.ingest import Ingestor
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

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def serve(config: AggregatorConfig) -> Iterator[RunningAggregator]:
    """Start the aggregator; yields it with its bound port and always stops it."""
    store = SqliteStore(config.db)
    ingestor = Ingestor(store, config.limits)
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
    pb_grpc.add_QueryServicer_to_server(QueryService(store), server)
    port = server.add_insecure_port(config.listen)
    if port == 0:
        store.close()
        raise ConfigError(f"listen: could not bind {config.listen} (in use?)")
    server.start()
    logger.warning("serving on %s WITHOUT TLS (loopback only) with database %s",
                   config.listen.rsplit(":", 1)[0] + f":{port}", config.db)
    try:
        yield RunningAggregator(server, port, store, ingestor)
    finally:
        server.stop(grace=2).wait()
        store.close()
