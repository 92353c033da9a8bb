"""The server's certificate, key and CA reread from ``--tls-dir`` while it runs.

`fleetwatch certs issue-server --force` (or any tool that rewrites ``server.pem`` /
``server.key`` / ``ca.pem``) rotates the certificate of a running aggregator: new connections,
gRPC and HTTPS alike, get the new one; open connections keep theirs until they close. A
half-written rotation (a new key beside the old certificate) is not taken: the files are
taken only once the key matches the certificate, and until then the last good pair serves.
"""

from __future__ import annotations

import logging
import os
import pathlib
import ssl
import threading
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import ConfigError

__all__ = ["ServerCertificates"]

logger = logging.getLogger(__name__)

FILES = ("ca.pem", "server.pem", "server.key")
CHECK_INTERVAL_S = 1.0  # at most one stat() of the files per second, however many handshakes


class ServerCertificates:
    """The TLS files of a directory, and credentials that follow them when they change."""

    def __init__(self, directory: str | os.PathLike[str],
                 check_interval_s: float = CHECK_INTERVAL_S) -> None:
        self.dir = pathlib.Path(directory)
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._stamp = self._read_stamp()
        ca, chain, key = self._read()
        _check_pair(chain, key)  # at start, a bad pair is an error, not a warning
        self._current = (ca, chain, key)
        self._contexts: list[ssl.SSLContext] = []
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.reloads = 0
        self._grpc_generation = 0   # the `reloads` whose files gRPC was last given

    def _read_stamp(self) -> tuple[tuple[int, int], ...]:
        try:
            return tuple((st.st_mtime_ns, st.st_size)
                         for st in (os.stat(self.dir / n) for n in FILES))
        except OSError as e:
            raise ConfigError(f"tls_dir: cannot read {e.filename}: {e.strerror}") from None

    def _read(self) -> tuple[bytes, bytes, bytes]:
        try:
            ca, chain, key = ((self.dir / n).read_bytes() for n in FILES)
        except OSError as e:
            raise ConfigError(f"tls_dir: cannot read {e.filename}: {e.strerror}") from None
        return ca, chain, key

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS whose certificate is looked up again (at most once per check interval)
        when a client connects."""
        ca, chain, key = self._current
        initial = grpc.ssl_server_certificate_configuration([(key, chain)],
                                                             root_certificates=ca)
        return grpc.dynamic_ssl_server_credentials(initial, self._fetch,
                                                   require_client_authentication=True)

    def ssl_context(self) -> ssl.SSLContext:
        """An HTTPS context that requires a client certificate of the fleet CA; its
        certificate follows the files too."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        self._load(context)
        with self._lock:
            self._contexts.append(context)
            if self._watcher is None:
                # gRPC asks on each handshake (`_fetch`); an ssl.SSLContext never asks, so a
                # thread looks at the files for it.
                self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                 name="fleetwatch-cert-reload")
                self._watcher.start()
        return context

    def _watch(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            try:
                self.check()
            except Exception:
                logger.exception("tls_dir: certificate reload failed")

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5.0)

    def _load(self, context: ssl.SSLContext) -> None:
        context.load_cert_chain(self.dir / "server.pem", self.dir / "server.key")
        # Adds to the trusted CAs (never removes one): during a CA rotation both are trusted.
        context.load_verify_locations(cadata=self._current[0].decode("ascii", "replace"))

    def check(self) -> bool:
        """Reread the files if they changed; True when new ones were taken."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self.check_interval_s:
                return False
            self._checked = now
            try:
                stamp = self._read_stamp()
            except ConfigError as e:
                logger.warning("%s; keeping the current certificate", e)
                return False
            if stamp == self._stamp:
                return False
            try:
                ca, chain, key = self._read()
                _check_pair(chain, key)
            except (ConfigError, ValueError) as e:
                # Mid-rotation (key written, certificate not yet) or a bad file: the next
                # check sees the finished rotation (the stamp is not taken).
                logger.warning("tls_dir: not taking the new files yet (%s); the current "
                               "certificate keeps serving", e)
                return False
            self._stamp = stamp
            self._current = (ca, chain, key)
            self.reloads += 1
            for context in self._contexts:
                try:
                    self._load(context)
                except (OSError, ssl.SSLError) as e:
                    logger.warning("https: could not load the new certificate (%s)", e)
        logger.info("tls_dir: took the new server certificate (serial %x)",
                    x509.load_pem_x509_certificate(chain).serial_number)
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC on a handshake: None keeps the current configuration.
        try:
            self.check()
        except Exception:  # never fail a handshake over a reload
            logger.exception("tls_dir: certificate reload failed")
        with self._lock:
            # The HTTPS watcher may have taken the new files first: gRPC still needs them.
            if self._grpc_generation == self.reloads:
                return None
            self._grpc_generation = self.reloads
            ca, chain, key = self._current
        return grpc.ssl_server_certificate_configuration([(key, chain)],
                                                         root_certificates=ca)


def _check_pair(chain: bytes, key: bytes) -> None:
    """Raise ValueError unless ``key`` is the private key of the first certificate."""
    cert = x509.load_pem_x509_certificate(chain)
    private = serialization.load_pem_private_key(key, password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if cert.public_key().public_bytes(enc, pub) != private.public_key().public_bytes(enc, pub):
        raise ValueError("server.key is not the key of server.pem")
