"""A running aggregator takes a rotated server certificate without a restart.

`fleetwatch certs issue-server --force` rewrites server.pem/server.key in --tls-dir: new gRPC
and HTTPS connections get the new certificate within about a second (the files are looked at
at most once per second), an open connection keeps working, and a half-done rotation (a new
key beside the old certificate) is not taken.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import time
from pathlib import Path

import grpc
from cryptography import x509

from aggregator import certs
from aggregator.cert_reload import ServerCertificates
from aggregator.server import AggregatorConfig, serve
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc


def _pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    certs.init_ca(d)
    certs.issue_operator(d, "alice")
    return d


def _client_context(pki: Path, alpn: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(pki / "operators" / "alice.pem", pki / "operators" / "alice.key")
    ctx.set_alpn_protocols([alpn])
    return ctx


def served_serial(pki: Path, port: int, alpn: str) -> int:
    """The serial of the certificate a new TLS connection to the port is shown."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            _client_context(pki, alpn).wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def _stats(channel: grpc.Channel) -> pb.ServerStatsResponse:
    return pb_grpc.AdminStub(channel).ServerStats(pb.ServerStatsRequest(), timeout=10)


def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "the new certificate was never served"
        time.sleep(0.2)


def test_grpc_and_https_serve_the_rotated_certificate(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    first = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes()).serial_number
    with serve(AggregatorConfig(db=tmp_path / "agg.sqlite", listen="127.0.0.1:0", tls_dir=pki,
                                http_listen="127.0.0.1:0")) as agg:
        assert served_serial(pki, agg.port, "h2") == first
        assert served_serial(pki, agg.http_port, "http/1.1") == first
        alice = certs_channel(pki, agg.target)
        _stats(alice)  # a connection open across the rotation
        second = certs.issue_server(pki, force=True).serial
        assert second != first
        _wait_for(lambda: served_serial(pki, agg.port, "h2") == second)
        _wait_for(lambda: served_serial(pki, agg.http_port, "http/1.1") == second)
        _stats(alice)  # the open connection still works
        fresh = certs_channel(pki, agg.target)
        _stats(fresh)  # and a new gRPC client verifies the new certificate
        alice.close()
        fresh.close()


def certs_channel(pki: Path, target: str) -> grpc.Channel:
    folder = pki / "operators"
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(),
                                         (folder / "alice.key").read_bytes(),
                                         (folder / "alice.pem").read_bytes())
    return grpc.secure_channel(target, creds)


def test_a_half_done_rotation_is_not_taken(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    watched = ServerCertificates(pki, check_interval_s=0.0)
    first = x509.load_pem_x509_certificate(watched._current[1]).serial_number
    elsewhere = tmp_path / "next"
    shutil.copytree(pki, elsewhere)
    issued = certs.issue_server(elsewhere, force=True)
    shutil.copy(elsewhere / "server.key", pki / "server.key")   # the key first ...
    assert watched.check() is False                              # ... not a pair: not taken
    assert x509.load_pem_x509_certificate(watched._current[1]).serial_number == first
    shutil.copy(elsewhere / "server.pem", pki / "server.pem")   # ... then the certificate
    assert watched.check() is True and watched.reloads == 1
    assert x509.load_pem_x509_certificate(watched._current[1]).serial_number == issued.serial
    watched.close()
