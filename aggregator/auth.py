"""Who may call what, when the aggregator serves mutual TLS.

The TLS handshake has already checked that the peer holds a certificate signed by the fleet CA
and not expired. This module reads the peer's identity from the certificate's SPIFFE URI SAN
(``spiffe://fleetwatch/device/<ID>`` or ``.../operator/<NAME>``, via ``context.auth_context()``;
the common name is never trusted), refuses revoked peers, and enforces the roles:

    device      /fleetwatch.v1.Ingest/Report, /fleetwatch.v1.Ingest/GetSpec
    aggregator  /fleetwatch.v1.Ingest/Report, /fleetwatch.v1.Ingest/GetSpec (a regional tier
                forwarding merged reports; `IngestService.Report` takes only those from it)
    operator    /fleetwatch.v1.Query/*, /fleetwatch.v1.Admin/*

Refusals, each counted by reason: no recognizable identity -> UNAUTHENTICATED
(``unauthenticated``); on the deny-list -> UNAUTHENTICATED (``revoked``); a role calling outside
its methods -> PERMISSION_DENIED (``permission_denied``). The check runs before the request is
deserialized. `IngestService.Report` additionally matches the device identity against the
report's ``device_id`` (`peer_identity`). See docs/security.md.
"""

from __future__ import annotations

import inspect
import logging
import os
import pathlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from cryptography import x509

from aggregator.certs import AGGREGATOR, DEVICE, OPERATOR, Identity, parse_spiffe_id

__all__ = ["AuthInterceptor", "RevocationList", "allowed", "peer_identity"]

logger = logging.getLogger(__name__)

DEVICE_METHODS = frozenset({"/fleetwatch.v1.Ingest/Report", "/fleetwatch.v1.Ingest/GetSpec"})
OPERATOR_PREFIXES = ("/fleetwatch.v1.Query/", "/fleetwatch.v1.Admin/")

# auth_context keys that carry URI SANs in grpcio 1.85 (checked: peer_spiffe_id is set when the
# certificate has exactly one URI SAN that is a SPIFFE id; x509_subject_alternative_name lists
# every SAN).
_SAN_KEYS = ("peer_spiffe_id", "x509_subject_alternative_name")


def allowed(identity: Identity, method: str) -> bool:
    """Whether this role may call this full method name."""
    if identity.role in (DEVICE, AGGREGATOR):
        return method in DEVICE_METHODS
    if identity.role == OPERATOR:
        return method.startswith(OPERATOR_PREFIXES)
    return False


_NOT_YET = object()


def _auth_context(context: grpc.ServicerContext) -> Mapping[str, Any]:
    """``context.auth_context()``, asked once per call: it builds a new dict (the PEM
    included) each time, and the interceptor and the handler both need it."""
    cached = getattr(context, "_fleetwatch_auth", _NOT_YET)
    if cached is _NOT_YET:
        cached = context.auth_context() or {}
        try:
            context._fleetwatch_auth = cached  # type: ignore[attr-defined]
        except AttributeError:  # a context type that takes no attributes: ask every time
            pass
    return cached  # type: ignore[return-value]


def peer_identity(context: grpc.ServicerContext) -> Identity | None:
    """The one fleetwatch SPIFFE identity in the peer's certificate, or None (no TLS, no
    client certificate, no such SAN, or two different ones: ambiguous, so none).

    Asked by the interceptor and twice by the Report handler: worked out once per call (on
    the context, like `_auth_context`), and once per distinct set of SANs."""
    cached = getattr(context, "_fleetwatch_identity", _NOT_YET)
    if cached is not _NOT_YET:
        return cached  # type: ignore[no-any-return]
    auth = _auth_context(context)
    sans = tuple(tuple(auth.get(key, ())) for key in _SAN_KEYS)
    identity = _identities.get(sans, _NOT_YET)
    if identity is _NOT_YET:
        identity = _identity_of(sans)
        if len(_identities) >= 10_000:  # bounded: a fleet's distinct certificates
            _identities.clear()
        _identities[sans] = identity
    try:
        context._fleetwatch_identity = identity  # type: ignore[attr-defined]
    except AttributeError:  # a context type that takes no attributes
        pass
    return identity  # type: ignore[return-value]


_identities: dict[tuple[tuple[Any, ...], ...], Identity | None] = {}


def _identity_of(sans: tuple[tuple[Any, ...], ...]) -> Identity | None:
    found: set[Identity] = set()
    for values in sans:
        for raw in values:
            try:
                text = raw.decode("ascii") if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError:
                continue
            identity = parse_spiffe_id(text)
            if identity is not None:
                found.add(identity)
    return found.pop() if len(found) == 1 else None


def _peer_pem(context: grpc.ServicerContext) -> bytes | None:
    pems = _auth_context(context).get("x509_pem_cert", ())
    return bytes(pems[0]) if pems else None


def _peer_serial_hex(context: grpc.ServicerContext) -> str | None:
    pem = _peer_pem(context)
    facts = None if pem is None else _cert_facts(pem)
    return None if facts is None else facts[0]


def peer_expired(context: grpc.ServicerContext, now: float | None = None) -> bool:
    """Whether the peer's certificate has expired since its connection was made: the TLS
    handshake checks expiry only once, and a connection may stay open for days."""
    pem = _peer_pem(context)
    facts = None if pem is None else _cert_facts(pem)
    return facts is not None and (time.time() if now is None else now) > facts[1]


_facts: dict[bytes, tuple[str, float]] = {}
_facts_lock = threading.Lock()


def _cert_facts(pem: bytes) -> tuple[str, float] | None:
    """(serial in lower-case hex, not-after as Unix seconds) of a certificate, parsed once per
    distinct certificate."""
    with _facts_lock:
        facts = _facts.get(pem)
    if facts is None:
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            return None
        facts = (format(cert.serial_number, "x"), cert.not_valid_after_utc.timestamp())
        with _facts_lock:
            if len(_facts) >= 10_000:  # bounded: a fleet rotating certificates for years
                _facts.clear()
            _facts[pem] = facts
    return facts


def _normalize_serial(token: str) -> str | None:
    """'0x1A2B', '1a:2b', '001A2B' -> '1a2b'; None when not hexadecimal."""
    t = token.lower().removeprefix("0x").replace(":", "")
    if not t or any(c not in "0123456789abcdef" for c in t):
        return None
    return t.lstrip("0") or "0"


class RevocationList:
    """The deny-list file: device ids, operator names, SPIFFE ids or certificate serials (hex),
    one per line, ``#`` comments. Reread when the file changes, checked at most every
    ``check_interval_s`` (so an edit applies within about that long, on open connections too).

    A missing file revokes nothing. A file that cannot be read keeps the previous list (and
    logs): a transient error must not un-revoke anyone. Replace the file atomically (write a
    temporary file, then rename) so the server never reads half of it.
    """

    def __init__(self, path: str | os.PathLike[str], check_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = pathlib.Path(path)
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = -float("inf")
        self._names: frozenset[str] = frozenset()
        self._serials: frozenset[str] = frozenset()
        self._refresh(force=True)

    def is_revoked(self, identity: Identity, serial_hex: Callable[[], str | None]) -> bool:
        """Whether this identity, or the certificate whose serial ``serial_hex()`` gives
        (called only when serials are listed), is on the list."""
        self._refresh()
        names, serials = self._names, self._serials
        if identity.name in names or identity.uri in names:
            return True
        if serials:
            serial = serial_hex()
            return serial is not None and serial in serials
        return False

    @property
    def entries(self) -> int:
        return len(self._names)

    def _refresh(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._checked_at < self.check_interval_s:
            return
        with self._lock:
            if not force and now - self._checked_at < self.check_interval_s:
                return
            self._checked_at = now
            try:
                st = self.path.stat()
            except FileNotFoundError:
                if self._names:
                    logger.warning("revocation list %s is gone: nothing is revoked now",
                                   self.path)
                self._stamp, self._names, self._serials = None, frozenset(), frozenset()
                return
            except OSError as e:
                logger.error("cannot stat revocation list %s (%s); keeping the previous list",
                             self.path, e)
                return
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            try:
                text = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                logger.error("cannot read revocation list %s (%s); keeping the previous list",
                             self.path, e)
                return
            names: set[str] = set()
            serials: set[str] = set()
            for line in text.splitlines():
                token = line.split("#", 1)[0].strip()
                if not token:
                    continue
                names.add(token)
                serial = _normalize_serial(token)
                if serial is not None:
                    serials.add(serial)
            self._stamp, self._names, self._serials = stamp, frozenset(names), frozenset(serials)
            logger.info("revocation list %s: %d entries", self.path, len(names))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every call before its request is deserialized.

    An interceptor of the asyncio server (`aggregator.rpc_server`); it guards coroutine
    handlers (Report) and the plain ones the server runs in its thread pool alike.
    ``count(reason)`` is called once per refusal (the ingestor's rejection counter)."""

    def __init__(self, revoked: RevocationList | None, count: Callable[[str], None]) -> None:
        self.revoked = revoked
        self.count = count
        # method -> (its handler, the guarded handler): built once, not on every call.
        self._guarded: dict[str, tuple[Any, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation: Callable[[Any], Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        method = handler_call_details.method
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        if handler.unary_unary is not None:
            guarded = _guard_unary(handler, lambda ctx: self.refusal(method, ctx))
        else:  # no streaming RPC exists today; guard one anyway, after deserialization
            guarded = _guard_streaming(handler, lambda ctx: self.refusal(method, ctx))
        if len(self._guarded) < 1000:  # only registered methods get here: a safety bound
            self._guarded[method] = (handler, guarded)
        return guarded

    def _check(self, method: str, context: grpc.ServicerContext) -> None:
        """Return normally, or abort the call (which raises)."""
        refused = self.refusal(method, context)
        if refused is not None:
            context.abort(*refused)

    def refusal(self, method: str, context: grpc.ServicerContext
                ) -> tuple[grpc.StatusCode, str] | None:
        """None when the peer may call ``method``; else the status to abort with (counted)."""
        identity = peer_identity(context)
        if identity is None:
            self.count("unauthenticated")
            return (grpc.StatusCode.UNAUTHENTICATED,
                    "no fleetwatch identity: the client certificate must carry a URI SAN "
                    "spiffe://fleetwatch/device/<ID> or spiffe://fleetwatch/operator/<NAME>")
        if peer_expired(context):
            self.count("expired")
            return (grpc.StatusCode.UNAUTHENTICATED,
                    f"the certificate of {identity.role} {identity.name!r} has expired "
                    "(the connection outlived it): issue a new one")
        if self.revoked is not None and self.revoked.is_revoked(
                identity, lambda: _peer_serial_hex(context)):
            self.count("revoked")
            logger.warning("refused revoked %s %s calling %s", identity.role, identity.name,
                           method)
            return (grpc.StatusCode.UNAUTHENTICATED,
                    f"the certificate of {identity.role} {identity.name!r} is revoked")
        if not allowed(identity, method):
            self.count("permission_denied")
            what = (f"{identity.role}s may call only Ingest/Report and Ingest/GetSpec"
                    if identity.role in (DEVICE, AGGREGATOR)
                    else "operators may call only Query and Admin")
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"{identity.role} {identity.name!r} may not call {method}: {what}")
        return None


Refusal = Callable[[grpc.ServicerContext], "tuple[grpc.StatusCode, str] | None"]


def _guard_unary(handler: grpc.RpcMethodHandler, refusal: Refusal) -> grpc.RpcMethodHandler:
    """The same unary handler, checking first and deserializing only afterwards.

    A coroutine handler gets a coroutine guard (its context's abort is awaited); a plain one
    a plain guard, run where the server runs it (its context's abort raises)."""
    deserialize = handler.request_deserializer
    behaviour = handler.unary_unary

    if inspect.iscoroutinefunction(behaviour):
        async def guarded_async(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            refused = refusal(context)
            if refused is not None:
                await context.abort(*refused)
            if deserialize is None:
                return await behaviour(raw, context)
            try:
                request = deserialize(raw)
            except Exception:  # protobuf DecodeError and kin
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request message")
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded_async, request_deserializer=None,
            response_serializer=handler.response_serializer)

    def guarded(raw: bytes, context: grpc.ServicerContext) -> Any:
        refused = refusal(context)
        if refused is not None:
            context.abort(*refused)
        if deserialize is None:
            return behaviour(raw, context)
        try:
            request = deserialize(raw)
        except Exception:  # protobuf DecodeError and kin
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request message")
        return behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(
        guarded, request_deserializer=None, response_serializer=handler.response_serializer)


def _guard_streaming(handler: grpc.RpcMethodHandler, refusal: Refusal) -> grpc.RpcMethodHandler:
    kinds = [("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler)]
    for attr, make in kinds:
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            def guarded(request: Any, context: grpc.ServicerContext,
                        behaviour: Any = behaviour) -> Any:
                refused = refusal(context)
                if refused is not None:
                    context.abort(*refused)
                return behaviour(request, context)

            return make(guarded, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler
