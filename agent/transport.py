"""The gRPC channel a device talks to its aggregator over: mutual TLS, or plaintext on loopback.

    tls = TlsCredentials.for_device("pki", "cam-0042")   # pki/ca.pem, pki/devices/cam-0042.*
    channel = make_channel("fleet.example:7070", tls)

With TLS the device presents its client certificate (whose URI SAN
``spiffe://fleetwatch/device/<ID>`` is its identity) and verifies the aggregator's certificate
against the fleet CA only, never the system roots. See docs/security.md.
"""

from __future__ import annotations

import os
import pathlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from agent.errors import ConfigError
from agent.keyfiles import read_credential_file

__all__ = ["TlsCredentials", "direct_target", "make_channel"]

MAX_PEM_BYTES = 1 << 20


@dataclass(frozen=True)
class TlsCredentials:
    """Paths of the fleet CA certificate, this client's certificate and its private key.

    ``server_name`` overrides the name the server certificate is checked against (when the
    aggregator is reached by an address its certificate does not list)."""

    cacert: str | os.PathLike[str]
    cert: str | os.PathLike[str]
    key: str | os.PathLike[str]
    server_name: str = ""

    def __post_init__(self) -> None:
        for name in ("cacert", "cert", "key"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise ConfigError(f"tls.{name}: give a file path, got {value!r}")

    @classmethod
    def for_device(cls, directory: str | os.PathLike[str], device_id: str) -> TlsCredentials:
        """The files `fleetwatch certs issue-device --dir DIR` wrote for this device."""
        d = pathlib.Path(directory)
        return cls(d / "ca.pem", d / "devices" / f"{device_id}.pem",
                   d / "devices" / f"{device_id}.key")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Read the three files (now, not at import) into gRPC channel credentials."""
        return grpc.ssl_channel_credentials(root_certificates=_read("cacert", self.cacert),
                                            private_key=_read("key", self.key),
                                            certificate_chain=_read("cert", self.cert))


def make_channel(target: str, tls: TlsCredentials | None = None, *,
                 backoff_base_s: float = 0.5, backoff_cap_s: float = 60.0,
                 options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to ``target`` (mutual TLS with ``tls``, plaintext without).

    gRPC's default reconnect backoff grows to 120 s: after an aggregator outage a device would
    sit idle long after it came back, so it follows the uploader's own backoff instead.

    An IP-literal target (``10.0.0.5:7070``, ``[fd00::5]:7070``) is dialled directly
    (`direct_target`), not through gRPC's DNS resolver."""
    opts: list[tuple[str, object]] = [
        ("grpc.initial_reconnect_backoff_ms", int(backoff_base_s * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(backoff_base_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(backoff_cap_s * 1000)),
    ]
    direct = direct_target(target)
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))  # also the authority
    elif direct != target:
        # The authority (the :authority header, and the name the server certificate is
        # checked against) stays what the caller wrote, whatever the URI scheme implies.
        opts.append(("grpc.default_authority", target))
    opts.extend(options)
    if tls is None:
        return grpc.insecure_channel(direct, options=opts)
    return grpc.secure_channel(direct, tls.channel_credentials(), options=opts)


def direct_target(target: str) -> str:
    """``host:port`` with an IPv4 or bracketed IPv6 literal host as gRPC's ``ipv4:`` /
    ``ipv6:`` URI; any other target (a name, or one with a scheme) unchanged.

    Why: there is nothing to resolve, and gRPC's default DNS resolver (c-ares) costs a device
    ~2 MB of resident memory the first time a channel uses it (docs/performance.md,
    "Footprint"). Names still go through it; ``GRPC_DNS_RESOLVER=native`` in the device's
    environment, set before grpc is imported, makes names cost about what literals do."""
    if "/" in target or target.startswith(("ipv4:", "ipv6:", "unix:", "unix-abstract:",
                                            "vsock:", "dns:")):
        return target
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return target
    if host.startswith("[") and host.endswith("]"):
        family, scheme, literal = socket.AF_INET6, "ipv6:", host[1:-1]
    else:
        family, scheme, literal = socket.AF_INET, "ipv4:", host
    try:
        socket.inet_pton(family, literal)
    except OSError:  # a name (or not an address at all): gRPC resolves or refuses it
        return target
    return scheme + target


def _read(name: str, path: str | os.PathLike[str]) -> bytes:
    p = pathlib.Path(path)
    data = read_credential_file(f"tls.{name}", p, MAX_PEM_BYTES)
    if b"-----BEGIN " not in data:
        # Never echo the contents: the key file is a secret.
        raise ConfigError(f"tls.{name}: {p} is not a PEM file")
    return data
