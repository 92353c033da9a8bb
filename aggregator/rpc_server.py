"""The aggregator's gRPC server: `grpc.aio` on an event loop of its own thread.

Report is a coroutine (`IngestService.Report`): the loop parses and verifies each envelope,
and the report waits for the ingest writer's batch (`aggregator.batch_writer`) without holding
a thread. Every other method is a plain function that gRPC runs in the server's thread pool
(``workers`` threads), as a threaded server would.

Why not the threaded `grpc.server`: there every call goes from gRPC's polling thread to a
pool thread and back, and the pool's threads take the GIL from each other; for ingest that
was ~25 context switches per report against ~10 for a bare echo, and the handoffs cost more
CPU than the report's own work (docs/performance.md, "ingest").

The caller's threads stay synchronous: `RpcServer` starts, reports its port and stops from
any thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc

__all__ = ["RpcServer"]

logger = logging.getLogger(__name__)


class RpcServer:
    """A started `grpc.aio` server bound to ``listen``; ``port`` is the bound port, 0 when the
    address could not be bound (the server is then already stopped)."""

    def __init__(self, listen: str, credentials: grpc.ServerCredentials | None, *,
                 handlers: Sequence[grpc.GenericRpcHandler], workers: int,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 options: Sequence[tuple[str, Any]] = (),
                 maximum_concurrent_rpcs: int | None = None) -> None:
        self._pool = futures.ThreadPoolExecutor(max_workers=workers,
                                                thread_name_prefix="fleetwatch-rpc")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleetwatch-grpc",
                                        daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server | None = None
        try:
            self.port = self._call(self._start(listen, credentials, handlers, interceptors,
                                               options, maximum_concurrent_rpcs))
        except BaseException:
            self._close_loop()
            raise
        if self.port == 0:
            self._close_loop()

    def _call(self, coro: Any, timeout_s: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _start(self, listen: str, credentials: grpc.ServerCredentials | None,
                     handlers: Sequence[grpc.GenericRpcHandler],
                     interceptors: Sequence[grpc.aio.ServerInterceptor],
                     options: Sequence[tuple[str, Any]],
                     maximum_concurrent_rpcs: int | None) -> int:
        server = grpc.aio.server(migration_thread_pool=self._pool, handlers=list(handlers),
                                 interceptors=list(interceptors), options=list(options),
                                 maximum_concurrent_rpcs=maximum_concurrent_rpcs)
        try:
            port = (server.add_insecure_port(listen) if credentials is None
                    else server.add_secure_port(listen, credentials))
        except RuntimeError:  # grpcio raises on some bind failures, returns 0 on others
            port = 0
        if port == 0:
            await server.stop(None)
            return 0
        await server.start()
        self._server = server
        return port

    def stop(self, grace_s: float | None = 2.0) -> None:
        """Stop taking calls, let those in flight finish for up to ``grace_s``, stop the loop."""
        if self._server is not None and not self._loop.is_closed():
            try:
                self._call(self._server.stop(grace_s), timeout_s=(grace_s or 0) + 10)
            except Exception:
                logger.exception("gRPC server did not stop cleanly")
            self._server = None
        self._close_loop()

    def _close_loop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
