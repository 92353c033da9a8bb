"""The aggregator's HTTP endpoint: Prometheus /metrics, a JSON API, and the web dashboard.

    with serve(AggregatorConfig(db="fleet.db", http_listen="127.0.0.1:0")) as running:
        urllib.request.urlopen(f"http://127.0.0.1:{running.http_port}/api/models")

Started by `aggregator.server.serve` when ``http_listen`` is set (``fleetwatch serve --http``),
stopped with it. Like gRPC: plaintext on loopback only without TLS; with ``tls_dir`` HTTPS with
the server certificate, and every request needs an *operator* client certificate of the fleet
CA (SPIFFE id ``spiffe://fleetwatch/operator/<NAME>``, not revoked: the same rules as
`aggregator.auth`, refusals counted under the same reasons).

Routes (GET or HEAD; every JSON answer is an object or list, errors ``{"error": "..."}`` with
400 / 404 / 405 / 501, never a traceback):

    /metrics        Prometheus text format (`aggregator.metrics`)
    /healthz        {"status": "ok"} once the database answers
    /api/models     registered model versions, their features and label values
    /api/health     model, version, cohort=k=v,.., by=k,k, since=1h, until=  -> health --json
    /api/privacy    the same parameters                                      -> privacy --json
    /api/alerts     model, state, resolved=N                                 -> alerts --json
    /api/series     model, version, cohort, since=1h, until, step=1m         -> points over time
    /api/explain    model, version, metric, cohort, keys=k,k, limit, since, until -> explain --json
    /, /cohort, /alerts, /static/NAME   the dashboard pages (`aggregator.dashboard`)

``until`` is Unix seconds or ISO 8601 (default: now). The dashboard module is imported lazily
(501 until it exists); its page functions get an `HttpContext` and the query parameters.
"""

from __future__ import annotations

import html
import http.server
import json
import logging
import math
import re
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from agent.errors import SpecError, ValidationError
from aggregator.alerts.evaluator import AlertEvaluator
from aggregator.alerts.rules import parse_duration
from aggregator.auth import RevocationList
from aggregator.certs import OPERATOR, Identity, parse_spiffe_id
from aggregator.ingest import Ingestor
from aggregator.loopback import is_loopback
from aggregator.metrics import Metrics
from aggregator.query import QueryError, cohort_health, cohort_privacy, resolve_range, resolve_spec
from aggregator.render import alerts_json, health_json, privacy_json
from aggregator.service import (
    DEFAULT_RESOLVED_LIMIT,
    alert_to_proto,
    budget_to_proto,
    health_to_proto,
    privacy_to_proto,
)
from aggregator.store.base import Store, parse_labels
from protos import fleetwatch_pb2 as pb

__all__ = ["HttpContext", "HttpError", "HttpServer", "MAX_SERIES_POINTS", "start_http"]

logger = logging.getLogger(__name__)

MAX_SERIES_POINTS = 120   # /api/series widens its step to stay within this many points
DEFAULT_SINCE = "1h"
DEFAULT_STEP = "1m"
HANDSHAKE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 60.0
# Connections served at once (a thread each); more are closed at once, counted
# `http_connections` in the refusals.
MAX_CONNECTIONS = 64


@dataclass(frozen=True)
class HttpContext:
    """What the HTTP routes and the dashboard pages work with.

    ``store``: the aggregator's `Store` (query it with `aggregator.query` functions);
    ``alerts``: the `AlertEvaluator` (``alerts.view(model, state, resolved_limit)``), None when
    the server runs without rules; ``ingestor``: the `Ingestor` (``stats()``,
    ``received_bytes()``); ``default_model``: the model a request without ``model=`` means,
    None for "the only registered model, or ask" (see `resolve_model`)."""

    store: Store
    alerts: AlertEvaluator | None
    ingestor: Ingestor
    default_model: str | None = None


class HttpError(Exception):
    """An answer other than 200: ``status`` and a message for the operator."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- parameters ---------------------------------------------------------------------------------


def resolve_model(ctx: HttpContext, params: Mapping[str, str]) -> str:
    """``model=`` or the context's default, or the only model registered; else HttpError 400."""
    model = params.get("model") or ctx.default_model
    if model:
        return model
    models = sorted({s.model for s in ctx.store.list_specs()})
    if len(models) == 1:
        return models[0]
    raise HttpError(400, "model: required (known models: "
                    f"{', '.join(models) or 'none; push a spec with `fleetwatch spec push`'})")


def _selector(params: Mapping[str, str], name: str = "cohort") -> dict[str, str]:
    try:
        return parse_labels(params.get(name, ""))
    except ValueError as e:
        raise HttpError(400, f"{name}: {e} (expected k=v,k2=v2)") from None


MAX_DURATION_S = 366 * 86400


def _keys(params: Mapping[str, str], name: str) -> list[str]:
    keys = [k.strip() for k in params.get(name, "").split(",") if k.strip()]
    bad = [k for k in keys if "=" in k]
    if bad:
        raise HttpError(400, f"{name}: {bad[0]!r} is not a label key (expected k,k2)")
    return keys


def _duration(params: Mapping[str, str], name: str, default: str) -> float:
    text = params.get(name) or default
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise HttpError(400, f"{name}: {text!r} is not a duration (use e.g. 90s, 30m, 1h, 2d)"
                        ) from None
    if seconds <= 0:
        raise HttpError(400, f"{name}: must be positive, got {text!r}")
    if seconds > MAX_DURATION_S:  # one request must stay one bounded piece of work
        raise HttpError(400, f"{name}: at most {MAX_DURATION_S // 86400} days, got {text!r}")
    return seconds


def _time(params: Mapping[str, str], name: str) -> int:
    """Unix seconds or ISO 8601 (UTC without an offset); 0 (now) when absent."""
    text = params.get(name, "").strip()
    if not text or text == "now":
        return 0
    if re.fullmatch(r"\d{1,12}", text):
        return int(text)
    try:
        dt = datetime.fromisoformat(text)
        return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp())
    except (ValueError, OverflowError):
        raise HttpError(400, f"{name}: {text!r} is neither Unix seconds (up to 12 digits) nor "
                        "an ISO-8601 time") from None


def _int(params: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    text = params.get(name, "")
    if not text:
        return default
    if not re.fullmatch(r"\d+", text) or not lo <= int(text) <= hi:
        raise HttpError(400, f"{name}: must be an integer in [{lo}, {hi}], got {text!r}")
    return int(text)


def _range(params: Mapping[str, str]) -> tuple[int, int]:
    """(start, end) for the query functions from since= and until=."""
    end = _time(params, "until")
    since = _duration(params, "since", DEFAULT_SINCE)
    end_s = end or int(time.time())
    if end_s - since <= 0:
        raise HttpError(400, f"since: reaches before the epoch from until={end_s}")
    return int(end_s - since), end_s


def _finite_json(x: Any) -> Any:
    """The object with every non-finite float as None (JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_json(v) for v in x]
    return x


# -- the JSON API ------------------------------------------------------------------------------

Params = Mapping[str, str]


def api_models(ctx: HttpContext, params: Params) -> Any:
    out = []
    for spec in sorted(ctx.store.list_specs(), key=lambda s: (s.model, s.model_version)):
        latest = ctx.store.get_spec(spec.model, spec.model_version)
        if latest is None or latest.hash != spec.hash:
            continue  # an older spec of this version: the queries use the latest
        labels: dict[str, set[str]] = {}
        for ls in ctx.store.label_sets(spec.hash):
            for k, v in ls.labels.items():
                labels.setdefault(k, set()).add(v)
        out.append({"model": spec.model, "model_version": spec.model_version,
                    "spec_hash": spec.hash, "window_length_s": spec.window_length_s,
                    "features": [f.name for f in spec.features],
                    "prediction": spec.prediction.name if spec.prediction else None,
                    "labels": {k: sorted(v) for k, v in sorted(labels.items())}})
    return {"models": out}


def api_health(ctx: HttpContext, params: Params) -> Any:
    start, end = _range(params)
    result = cohort_health(ctx.store, resolve_model(ctx, params), params.get("version", ""),
                           _selector(params), _keys(params, "by"), start, end)
    return health_json([health_to_proto(h) for h in result])


def api_privacy(ctx: HttpContext, params: Params) -> Any:
    start, end = _range(params)
    result = cohort_privacy(ctx.store, resolve_model(ctx, params), params.get("version", ""),
                            _selector(params), _keys(params, "by"), start, end)
    return privacy_json([privacy_to_proto(c) for c in result])


def api_alerts(ctx: HttpContext, params: Params) -> Any:
    state = params.get("state", "")
    if state not in ("", "pending", "firing", "resolved"):
        raise HttpError(400, f"state: must be pending, firing or resolved, got {state!r}")
    limit = _int(params, "resolved", DEFAULT_RESOLVED_LIMIT, 0, 10_000)
    if ctx.alerts is None:
        return alerts_json(pb.ListAlertsResponse(rules_loaded=False))
    view = ctx.alerts.view(params.get("model", ""), state, limit)
    return alerts_json(pb.ListAlertsResponse(
        alerts=[alert_to_proto(a) for a in view.alerts],
        budgets=[budget_to_proto(b) for b in view.budgets],
        evaluated_until={k: int(v) for k, v in view.evaluated_until.items()},
        rules_loaded=True))


def api_series(ctx: HttpContext, params: Params) -> Any:
    """One cohort over time: per step [t, t + step), its health (one cohort_health each)."""
    model, version = resolve_model(ctx, params), params.get("version", "")
    selector = _selector(params)
    step = _duration(params, "step", DEFAULT_STEP)
    spec = resolve_spec(ctx.store, model, version)
    window = spec.window_length_s
    end = _time(params, "until")
    if not end:
        # Up to the last whole window: the one in progress would plot as an outage.
        end = int(time.time()) // window * window
    lo, hi = resolve_range(int(end - _duration(params, "since", DEFAULT_SINCE)), end, window)
    # Whole windows per step, and no more than MAX_SERIES_POINTS points.
    step_s = max(window, -(-int(step) // window) * window)
    span = hi - lo
    if -(-span // step_s) > MAX_SERIES_POINTS:
        per = -(-span // MAX_SERIES_POINTS)
        step_s = -(-per // window) * window
    points = []
    reference: tuple[float, ...] = (math.nan,) * 3
    for t in range(lo, hi, step_s):
        cohorts = cohort_health(ctx.store, model, spec.model_version, selector, (), t,
                                min(t + step_s, hi))
        h = cohorts[0] if cohorts else None
        point: dict[str, Any] = {"t": t, "events": 0, "devices": 0,
                                 "latency_ms": {"p50": None, "p95": None, "p99": None},
                                 "error_rate": None, "availability": None, "accuracy": None,
                                 "psi": {}, "drifting": []}
        if h is not None:
            reference = h.reference_latency_ms
            drift = [*h.features, *([h.prediction] if h.prediction is not None else [])]
            point.update(
                events=h.events, devices=h.devices,
                latency_ms={"p50": h.latency_p50_ms, "p95": h.latency_p95_ms,
                            "p99": h.latency_p99_ms},
                error_rate=h.error_rate, availability=h.availability,
                accuracy=h.ground_truth.accuracy if h.ground_truth.task else None,
                psi={f.name: f.scores.psi for f in drift if h.events},
                drifting=[f.name for f in drift if f.drifting])
        points.append(point)
    return {"model": spec.model, "model_version": spec.model_version,
            "cohort": dict(sorted(selector.items())), "start_unix_s": lo, "end_unix_s": hi,
            "step_s": step_s,
            "features": [f.name for f in spec.features]
            + ([spec.prediction.name] if spec.prediction is not None else []),
            "reference_latency_ms": dict(zip(("p50", "p95", "p99"), reference, strict=True)),
            "points": points}


def api_explain(ctx: HttpContext, params: Params) -> Any:
    try:
        from aggregator.explain import explain
    except ModuleNotFoundError as e:
        if e.name != "aggregator.explain":
            raise
        raise HttpError(501, "explain: not available in this build") from None
    metric = params.get("metric", "")
    if not metric:
        raise HttpError(400, "metric: required, e.g. latency_p95_ms, error_rate or psi:FEATURE")
    start, end = _range(params)
    response = explain(ctx.store, resolve_model(ctx, params), params.get("version", ""),
                       _selector(params), metric, start, end, keys=_keys(params, "keys"),
                       limit=_int(params, "limit", 0, 0, 1000))
    from aggregator import render

    to_json = getattr(render, "explain_json", None)
    if to_json is not None:
        return to_json(response)
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(response, preserving_proto_field_name=True)


# Route -> (handler, the parameters it takes). Unknown parameters are refused (a typo such as
# `cohrt=` must not silently answer for the whole fleet).
_RANGE = frozenset({"model", "version", "cohort", "since", "until"})
API: dict[str, tuple[Callable[[HttpContext, Params], Any], frozenset[str]]] = {
    "/api/models": (api_models, frozenset()),
    "/api/health": (api_health, _RANGE | {"by"}),
    "/api/privacy": (api_privacy, _RANGE | {"by"}),
    "/api/alerts": (api_alerts, frozenset({"model", "state", "resolved"})),
    "/api/series": (api_series, _RANGE | {"step"}),
    "/api/explain": (api_explain, _RANGE | {"metric", "keys", "limit"}),
}
PAGES = {"/": "overview_page", "/cohort": "cohort_page", "/alerts": "alerts_page"}


def _status_of(exc: Exception) -> int | None:
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, QueryError):
        return 404
    if isinstance(exc, ValidationError | SpecError | ValueError):
        return 400
    return None


# -- the server ----------------------------------------------------------------------------------


def _peer_identity(cert: Mapping[str, Any] | None) -> Identity | None:
    """The one fleetwatch SPIFFE identity of a peer certificate (ssl's getpeercert() form)."""
    found = set()
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind == "URI":
            identity = parse_spiffe_id(value)
            if identity is not None:
                found.add(identity)
    return found.pop() if len(found) == 1 else None


class HttpServer:
    """A `ThreadingHTTPServer` in a daemon thread; ``port`` is the bound port."""

    def __init__(self, host: str, port: int, ctx: HttpContext, metrics: Metrics | None,
                 tls: ssl.SSLContext | None = None, revoked: RevocationList | None = None,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections: must be at least 1, got {max_connections}")
        self.ctx = ctx
        self.metrics = metrics
        self.tls = tls
        self.revoked = revoked
        handler = _make_handler(self)
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET

        slots = threading.BoundedSemaphore(max_connections)
        counter = ctx.ingestor.count_rejected

        class _Server(http.server.ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                # A thread per connection, but a bounded number of them: past the bound a
                # connection is closed at once (a client retries) instead of costing a
                # thread and its memory each.
                if not slots.acquire(blocking=False):
                    counter("http_connections")
                    logger.warning("http: %d connections open; refused one from %s",
                                   max_connections, client_address[0])
                    self.shutdown_request(request)
                    return
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    slots.release()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

            def handle_error(self, request: Any, client_address: Any) -> None:
                # Failed TLS handshakes and dropped connections: not worth a traceback.
                logger.debug("http: connection from %s failed: %r", client_address,
                             sys.exc_info()[1])

        self._server = _Server((host.strip("[]"), port), handler)
        if tls is not None:
            # The handshake runs in the request's thread (`setup`), not in the accept loop.
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fleetwatch-http")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)

    # -- what a request does --------------------------------------------------------------------

    def authorize(self, peer_cert: Mapping[str, Any] | None) -> None:
        """Raise HttpError unless the peer is an operator that is not revoked (TLS only)."""
        identity = _peer_identity(peer_cert)
        if identity is None:
            self.ctx.ingestor.count_rejected("unauthenticated")
            raise HttpError(401, "no fleetwatch identity: the client certificate must carry a "
                            "URI SAN spiffe://fleetwatch/operator/<NAME>")
        not_after = (peer_cert or {}).get("notAfter")
        if not_after and time.time() > ssl.cert_time_to_seconds(not_after):
            # The handshake checked expiry once; a keep-alive connection may outlive it.
            self.ctx.ingestor.count_rejected("expired")
            raise HttpError(401, f"the certificate of {identity.role} {identity.name!r} has "
                            "expired: issue a new one")
        serial = (peer_cert or {}).get("serialNumber")
        if self.revoked is not None and self.revoked.is_revoked(
                identity, lambda: format(int(serial, 16), "x") if serial else None):
            self.ctx.ingestor.count_rejected("revoked")
            logger.warning("http: refused revoked %s %s", identity.role, identity.name)
            raise HttpError(401, f"the certificate of {identity.role} {identity.name!r} is "
                            "revoked")
        if identity.role != OPERATOR:
            self.ctx.ingestor.count_rejected("permission_denied")
            raise HttpError(403, f"{identity.role} {identity.name!r} may not use the HTTP "
                            "endpoint: operators only")

    def answer(self, path: str, params: Mapping[str, str]) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET."""
        if path == "/metrics":
            if params:
                raise HttpError(400, f"/metrics takes no parameters, got {sorted(params)}")
            if self.metrics is None:
                raise HttpError(404, "metrics are not enabled on this aggregator")
            return 200, CONTENT_TYPE_LATEST, self.metrics.exposition()
        if path == "/healthz":
            self.ctx.store.list_specs()  # the database answers
            return 200, "application/json", b'{"status": "ok"}\n'
        if path in API:
            route, allowed = API[path]
            unknown = sorted(set(params) - allowed)
            if unknown:
                raise HttpError(400, f"unknown parameter {unknown[0]!r} for {path} (takes: "
                                f"{', '.join(sorted(allowed)) or 'none'})")
            t0 = time.perf_counter()
            try:
                body = route(self.ctx, params)
            finally:
                if self.metrics is not None:
                    self.metrics.observe_query("http", path, time.perf_counter() - t0)
            text = json.dumps(_finite_json(body), allow_nan=False, indent=1) + "\n"
            return 200, "application/json", text.encode()
        if path in PAGES or path.startswith("/static/"):
            return self._page(path, params)
        raise HttpError(404, f"no such path {path!r} (see /api/models, /api/health, "
                        "/api/series, /api/alerts, /api/explain, /metrics, /)")

    def _page(self, path: str, params: Mapping[str, str]) -> tuple[int, str, bytes]:
        try:
            from aggregator import dashboard
        except ModuleNotFoundError as e:
            if e.name != "aggregator.dashboard":
                raise
            raise HttpError(501, "the dashboard is not available in this build") from None
        try:
            if path.startswith("/static/"):
                static = getattr(dashboard, "static", None)
                if static is None:
                    raise HttpError(404, f"no such asset {path!r}")
                content_type, body = static(path[len("/static/"):])
                return 200, content_type, body
            page = getattr(dashboard, PAGES[path])(self.ctx, params)
        except (dashboard.BadRequest, dashboard.NotFound) as e:  # type: ignore[attr-defined]
            status = 400 if isinstance(e, dashboard.BadRequest) else 404  # type: ignore[attr-defined]
            raise HttpError(status, str(e)) from None
        return 200, "text/html; charset=utf-8", page.encode()


def _check_loopback_host(host: str) -> None:
    """Without TLS the endpoint is loopback-only; a browser tricked by DNS rebinding would
    still send another name in Host: refuse anything but a loopback name."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if not is_loopback(name):
        raise HttpError(403, f"Host {host[:80]!r}: the plaintext endpoint answers loopback "
                        "names only (127.0.0.1, localhost, [::1])")



def _make_handler(server: HttpServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "fleetwatch"
        sys_version = ""
        protocol_version = "HTTP/1.1"
        timeout = REQUEST_TIMEOUT_S

        def setup(self) -> None:
            if server.tls is not None:
                self.request.settimeout(HANDSHAKE_TIMEOUT_S)
                self.request.do_handshake()  # raises on a refused handshake: handle_error
            super().setup()

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("http %s %s", self.address_string(), format % args)

        def do_GET(self) -> None:
            self._respond(head=False)

        def do_HEAD(self) -> None:
            self._respond(head=True)

        def _refuse_method(self) -> None:
            self._send(405, "application/json",
                       b'{"error": "method not allowed: GET or HEAD only"}\n', False,
                       extra={"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

        def _respond(self, head: bool) -> None:
            url = urllib.parse.urlsplit(self.path)
            path = url.path.rstrip("/") or "/"
            page = path in PAGES or path.startswith("/static/")
            try:
                if server.tls is not None:
                    server.authorize(self.connection.getpeercert())
                else:
                    _check_loopback_host(self.headers.get("Host", ""))
                params = self._params(url.query)
                status, content_type, body = server.answer(path, params)
            except Exception as e:
                status = _status_of(e)
                if status is None:
                    logger.exception("http: %s failed", path)
                    status, message = 500, f"internal error: {type(e).__name__}"
                else:
                    message = e.message if isinstance(e, HttpError) else str(e)
                if page:
                    content_type = "text/html; charset=utf-8"
                    body = (f"<!doctype html><title>fleetwatch: {status}</title><h1>{status}"
                            f"</h1><p>{html.escape(message)}</p>\n").encode()
                else:
                    content_type = "application/json"
                    body = (json.dumps({"error": message}) + "\n").encode()
            self._send(status, content_type, body, head)

        def _params(self, query: str) -> dict[str, str]:
            try:
                pairs = urllib.parse.parse_qsl(query, keep_blank_values=True,
                                               strict_parsing=False, max_num_fields=64)
            except ValueError as e:
                raise HttpError(400, f"query string: {e}") from None
            params: dict[str, str] = {}
            for k, v in pairs:
                if k in params:
                    raise HttpError(400, f"{k}: given more than once")
                params[k] = v
            return params

        def _send(self, status: int, content_type: str, body: bytes, head: bool,
                  extra: Mapping[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler


def server_ssl_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """HTTPS that requires a client certificate of the fleet CA (TLS 1.2 or later)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def start_http(listen: str, ctx: HttpContext, metrics: Metrics | None,
               tls: ssl.SSLContext | None = None,
               revoked: RevocationList | None = None) -> HttpServer:
    """Bind ``HOST:PORT`` (port 0: a free one) and serve in a daemon thread."""
    host, _, port = listen.rpartition(":")
    server = HttpServer(host, int(port), ctx, metrics, tls, revoked)
    server.start()
    return server
