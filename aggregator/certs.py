"""Certificates for mutual TLS: a small CA, the aggregator's server certificate, client
certificates for devices and operators, and each device's report-signing key.

    init_ca("pki")                          # pki/ca.pem ca.key server.pem server.key
    issue_device("pki", "cam-0042")         # pki/devices/cam-0042.{pem,key,sign.key,sign.pub}
    issue_operator("pki", "alice")          # pki/operators/alice.{pem,key}

A client's identity is the SPIFFE-style URI SAN of its certificate
(``spiffe://fleetwatch/device/<ID>``, ``spiffe://fleetwatch/operator/<NAME>``); the common name
carries the same name for humans but is not what the server trusts (`aggregator.auth`).
Keys are ECDSA P-256 (TLS) and Ed25519 (report signatures), written with mode 0600. Nothing is
overwritten unless ``force=True``. See docs/security.md.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import pathlib
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import ConfigError

__all__ = [
    "AGGREGATOR",
    "CA_DAYS",
    "DEVICE",
    "Identity",
    "Issued",
    "LEAF_DAYS",
    "OPERATOR",
    "check_id",
    "device_paths",
    "init_ca",
    "issue_aggregator",
    "issue_device",
    "issue_operator",
    "issue_server",
    "parse_spiffe_id",
    "spiffe_id",
]

logger = logging.getLogger(__name__)

TRUST_DOMAIN = "fleetwatch"
DEVICE = "device"
OPERATOR = "operator"
# A regional aggregator (`fleetwatch serve --upstream`): may send forwarded reports only.
AGGREGATOR = "aggregator"
ROLE_DIRS = {DEVICE: "devices", OPERATOR: "operators", AGGREGATOR: "aggregators"}

CA_DAYS = 3650
# Leaf certificates are short-lived: with no CRL in gRPC, expiry bounds how long a stolen key
# that nobody put on the deny-list stays useful.
LEAF_DAYS = 90

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SPIFFE = re.compile(rf"spiffe://{TRUST_DOMAIN}/({DEVICE}|{OPERATOR}|{AGGREGATOR})/"
                     r"([A-Za-z0-9._:-]{1,128})")


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is: a role (``device``/``operator``) and a name."""

    role: str
    name: str

    @property
    def uri(self) -> str:
        return spiffe_id(self.role, self.name)


@dataclass(frozen=True)
class Issued:
    """What one issue call wrote: the files, and the certificate's serial and expiry."""

    paths: tuple[pathlib.Path, ...]
    serial: int
    not_after: datetime.datetime

    @property
    def serial_hex(self) -> str:
        """The serial as revoked.txt takes it."""
        return format(self.serial, "x")


def check_id(what: str, value: str) -> str:
    """A device id or operator name usable in a path and a SPIFFE id, or ConfigError."""
    if not isinstance(value, str) or not _ID.fullmatch(value) or value in (".", ".."):
        raise ConfigError(f"{what}: {value!r} must be 1-128 characters of A-Z a-z 0-9 . _ - : "
                          "(no '/', not '.' or '..')")
    if ".." in value:
        raise ConfigError(f"{what}: {value!r} must not contain '..'")
    return value


def spiffe_id(role: str, name: str) -> str:
    if role not in ROLE_DIRS:
        raise ConfigError(f"role: {role!r} is not one of {sorted(ROLE_DIRS)}")
    return f"spiffe://{TRUST_DOMAIN}/{role}/{check_id(role, name)}"


def parse_spiffe_id(uri: str) -> Identity | None:
    """``spiffe://fleetwatch/device/cam-1`` -> Identity("device", "cam-1"); None otherwise."""
    m = _SPIFFE.fullmatch(uri)
    if m is None or ".." in m.group(2):
        return None
    return Identity(m.group(1), m.group(2))


def device_paths(directory: str | os.PathLike[str], device_id: str) -> dict[str, pathlib.Path]:
    """The files `issue_device` writes: cert, key, sign_key, sign_pub."""
    base = pathlib.Path(directory) / ROLE_DIRS[DEVICE] / check_id("device_id", device_id)
    return {"cert": base.with_name(base.name + ".pem"), "key": base.with_name(base.name + ".key"),
            "sign_key": base.with_name(base.name + ".sign.key"),
            "sign_pub": base.with_name(base.name + ".sign.pub")}


# -- issuing -------------------------------------------------------------------------------------

def init_ca(directory: str | os.PathLike[str], hostnames: Sequence[str] = ("localhost",),
            days: int = CA_DAYS, *, server_days: int = LEAF_DAYS, force: bool = False,
            now: datetime.datetime | None = None) -> Issued:
    """Create the CA (``ca.pem``, ``ca.key``) and the server certificate (`issue_server`).

    Returns what was written; ``serial``/``not_after`` are the CA's."""
    d = pathlib.Path(directory)
    ca_cert_path, ca_key_path = d / "ca.pem", d / "ca.key"
    _refuse_overwrite([ca_cert_path, ca_key_path, d / "server.pem", d / "server.key"], force)
    _check_days("days", days)
    start = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetwatch"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "fleetwatch CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - _SKEW).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    _write(ca_key_path, _key_pem(key), secret=True)
    _write(ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
    server = issue_server(d, hostnames, server_days, force=True, now=now)
    return Issued((ca_cert_path, ca_key_path) + server.paths, cert.serial_number,
                  cert.not_valid_after_utc)


def issue_server(directory: str | os.PathLike[str], hostnames: Sequence[str] = ("localhost",),
                 days: int = LEAF_DAYS, *, force: bool = False,
                 now: datetime.datetime | None = None) -> Issued:
    """(Re)issue ``server.pem``/``server.key`` from the CA in ``directory``.

    SANs: DNS localhost and each hostname (IP addresses as IP SANs), IP 127.0.0.1 and ::1."""
    d = pathlib.Path(directory)
    paths = [d / "server.pem", d / "server.key"]
    _refuse_overwrite(paths, force)
    sans: list[x509.GeneralName] = []
    for h in ("localhost", "127.0.0.1", "::1", *hostnames):
        if not isinstance(h, str) or not h or "/" in h or len(h) > 253:
            raise ConfigError(f"hostname: {h!r} is not a host name or IP address")
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(h.strip("[]")))
        except ValueError:
            general = x509.DNSName(h.lower())
        if general not in sans:
            sans.append(general)
    key, cert = _leaf(d, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetwatch "
                                                       "aggregator")]),
                      sans, ExtendedKeyUsageOID.SERVER_AUTH, days, now)
    _write(paths[1], _key_pem(key), secret=True)
    _write(paths[0], cert.public_bytes(serialization.Encoding.PEM))
    return Issued(tuple(paths), cert.serial_number, cert.not_valid_after_utc)


def issue_device(directory: str | os.PathLike[str], device_id: str, days: int = LEAF_DAYS, *,
                 force: bool = False, now: datetime.datetime | None = None) -> Issued:
    """A device's TLS client certificate and key, and its Ed25519 report-signing key pair.

    Writes ``devices/<ID>.pem``, ``.key``, ``.sign.key`` (PKCS8 PEM) and ``.sign.pub``
    (SubjectPublicKeyInfo PEM, what the aggregator verifies reports with)."""
    return _issue_signing_client(directory, DEVICE, device_id,
                                 device_paths(directory, device_id), days, force, now)


def _issue_signing_client(directory: str | os.PathLike[str], role: str, name: str,
                          paths: dict[str, pathlib.Path], days: int, force: bool,
                          now: datetime.datetime | None) -> Issued:
    """A client certificate of ``role`` and an Ed25519 report-signing key pair, written to
    ``paths`` (cert, key, sign_key, sign_pub): what devices and regional aggregators hold."""
    _refuse_overwrite(paths.values(), force)
    key, cert = _client_leaf(directory, role, name, days, now)
    signing = ed25519.Ed25519PrivateKey.generate()
    _write(paths["key"], _key_pem(key), secret=True)
    _write(paths["cert"], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["sign_key"], _key_pem(signing), secret=True)
    _write(paths["sign_pub"], signing.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return Issued(tuple(paths.values()), cert.serial_number, cert.not_valid_after_utc)


def aggregator_paths(directory: str | os.PathLike[str], name: str) -> dict[str, pathlib.Path]:
    """The files `issue_aggregator` writes: cert, key, sign_key, sign_pub."""
    base = pathlib.Path(directory) / ROLE_DIRS[AGGREGATOR] / check_id("name", name)
    return {"cert": base.with_name(name + ".pem"), "key": base.with_name(name + ".key"),
            "sign_key": base.with_name(name + ".sign.key"),
            "sign_pub": base.with_name(name + ".sign.pub")}


def issue_aggregator(directory: str | os.PathLike[str], name: str, days: int = LEAF_DAYS, *,
                     force: bool = False, now: datetime.datetime | None = None) -> Issued:
    """A regional aggregator's TLS client certificate (``spiffe://fleetwatch/aggregator/
    <NAME>``) and its Ed25519 signing key pair, for forwarding to the central tier:
    ``aggregators/<NAME>.pem``, ``.key``, ``.sign.key``, ``.sign.pub`` (the central verifies
    with the last, key id ``aggregator:<NAME>``)."""
    return _issue_signing_client(directory, AGGREGATOR, name,
                                 aggregator_paths(directory, name), days, force, now)


def issue_operator(directory: str | os.PathLike[str], name: str, days: int = LEAF_DAYS, *,
                   force: bool = False, now: datetime.datetime | None = None) -> Issued:
    """An operator's TLS client certificate and key: ``operators/<NAME>.pem``, ``.key``."""
    base = pathlib.Path(directory) / ROLE_DIRS[OPERATOR] / check_id("name", name)
    paths = [base.with_name(name + ".pem"), base.with_name(name + ".key")]
    _refuse_overwrite(paths, force)
    key, cert = _client_leaf(directory, OPERATOR, name, days, now)
    _write(paths[1], _key_pem(key), secret=True)
    _write(paths[0], cert.public_bytes(serialization.Encoding.PEM))
    return Issued(tuple(paths), cert.serial_number, cert.not_valid_after_utc)


# -- helpers -------------------------------------------------------------------------------------

# Backdate a little: a device whose clock is a few minutes behind must not see a
# not-yet-valid certificate.
_SKEW = datetime.timedelta(minutes=5)


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now(datetime.UTC)


def _check_days(what: str, days: int) -> None:
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 36500:
        raise ConfigError(f"{what}: must be a whole number of days in [1, 36500], got {days!r}")


def _client_leaf(directory: str | os.PathLike[str], role: str, name: str, days: int,
                 now: datetime.datetime | None) -> tuple[ec.EllipticCurvePrivateKey,
                                                         x509.Certificate]:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return _leaf(pathlib.Path(directory), subject,
                 [x509.UniformResourceIdentifier(spiffe_id(role, name))],
                 ExtendedKeyUsageOID.CLIENT_AUTH, days, now)


def _leaf(d: pathlib.Path, subject: x509.Name, sans: list[x509.GeneralName],
          usage: x509.ObjectIdentifier, days: int, now: datetime.datetime | None
          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    _check_days("days", days)
    ca_cert, ca_key = _load_ca(d)
    start = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - _SKEW).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _load_ca(d: pathlib.Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as e:
        raise ConfigError(f"--dir: no CA in {d} ({e.filename} is missing): run "
                          "`fleetwatch certs init --dir DIR` first") from None
    except ValueError as e:
        raise ConfigError(f"--dir: the CA in {d} cannot be read: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"--dir: {d / 'ca.key'} is not an ECDSA key")
    return cert, key


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _refuse_overwrite(paths: Iterable[pathlib.Path], force: bool) -> None:
    if force:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)} (use --force to "
                          "replace them)")


def _write(path: pathlib.Path, data: bytes, secret: bool = False) -> None:
    """Write atomically (temp file + rename); keys are created 0600, never world-readable
    even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not secret:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    logger.debug("wrote %s", path)

