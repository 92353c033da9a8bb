"""Certificates (`aggregator.certs`), the deny-list (`aggregator.auth.RevocationList`) and the
`fleetwatch certs` commands through `main(argv)`."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import ConfigError
from agent.transport import TlsCredentials
from aggregator.auth import RevocationList, allowed
from aggregator.certs import (
    Identity,
    check_id,
    init_ca,
    issue_device,
    issue_operator,
    issue_server,
    parse_spiffe_id,
)
from aggregator.cli import main

UTC = datetime.UTC


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_ca(d, hostnames=("agg.example.net", "10.1.2.3"))
    issue_device(d, "cam-0042")
    issue_operator(d, "alice")
    return d


def test_ca_and_server_certificate(pki: Path) -> None:
    ca, server = _cert(pki / "ca.pem"), _cert(pki / "server.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "agg.example.net"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3")}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for key in ("ca.key", "server.key"):
        assert _mode(pki / key) == 0o600
        loaded = serialization.load_pem_private_key((pki / key).read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        assert loaded.curve.name == "secp256r1"
    # The CA lives ten years, leaf certificates about 90 days.
    ca_days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    leaf_days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert 3649 <= ca_days <= 3651 and 89 <= leaf_days <= 91


def test_device_certificate_and_signing_key(pki: Path) -> None:
    ca = _cert(pki / "ca.pem")
    cert = _cert(pki / "devices" / "cam-0042.pem")
    cert.verify_directly_issued_by(ca)
    assert _uris(cert) == ["spiffe://fleetwatch/device/cam-0042"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-0042"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # The TLS key matches the certificate.
    tls_key = serialization.load_pem_private_key(
        (pki / "devices" / "cam-0042.key").read_bytes(), None)
    assert tls_key.public_key() == cert.public_key()
    # The report-signing pair: PKCS8 Ed25519 (0600) and its SubjectPublicKeyInfo.
    sign_key = serialization.load_pem_private_key(
        (pki / "devices" / "cam-0042.sign.key").read_bytes(), None)
    assert isinstance(sign_key, ed25519.Ed25519PrivateKey)
    pub_pem = (pki / "devices" / "cam-0042.sign.pub").read_bytes()
    assert pub_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    pub = serialization.load_pem_public_key(pub_pem)
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    pub.verify(sign_key.sign(b"report bytes"), b"report bytes")  # raises if they differ
    for name in ("cam-0042.key", "cam-0042.sign.key"):
        assert _mode(pki / "devices" / name) == 0o600
    assert _mode(pki / "devices" / "cam-0042.sign.pub") & 0o077 == 0o044  # public: readable


def test_operator_certificate(pki: Path) -> None:
    cert = _cert(pki / "operators" / "alice.pem")
    cert.verify_directly_issued_by(_cert(pki / "ca.pem"))
    assert _uris(cert) == ["spiffe://fleetwatch/operator/alice"]
    assert _mode(pki / "operators" / "alice.key") == 0o600


def test_refuses_to_overwrite_unless_forced(pki: Path) -> None:
    before = (pki / "devices" / "cam-0042.pem").read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite.*--force"):
        issue_device(pki, "cam-0042")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        init_ca(pki)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        issue_operator(pki, "alice")
    assert (pki / "devices" / "cam-0042.pem").read_bytes() == before
    issued = issue_device(pki, "rotating", days=7)
    again = issue_device(pki, "rotating", days=7, force=True)
    assert again.serial != issued.serial
    assert _cert(pki / "devices" / "rotating.pem").serial_number == again.serial
    assert again.serial_hex == format(again.serial, "x")


def test_issue_server_reissues_from_the_same_ca(tmp_path: Path) -> None:
    init_ca(tmp_path)
    old = _cert(tmp_path / "server.pem")
    issue_server(tmp_path, ("new.example",), force=True)
    new = _cert(tmp_path / "server.pem")
    assert new.serial_number != old.serial_number
    new.verify_directly_issued_by(_cert(tmp_path / "ca.pem"))


def test_issuing_without_a_ca_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="certs init"):
        issue_device(tmp_path, "cam-1")
    assert not (tmp_path / "devices" / "cam-1.key").exists()


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".", "a..b", "x" * 129, "caméra", "a b",
                                 "a\nb", "../../etc/passwd"])
def test_bad_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError):
        check_id("device_id", bad)
    with pytest.raises(ConfigError):
        issue_device(tmp_path, bad)


@pytest.mark.parametrize("good", ["cam-0042", "eu.west:cam_7", "x" * 128, "A"])
def test_good_ids(good: str) -> None:
    assert check_id("device_id", good) == good
    assert parse_spiffe_id(f"spiffe://fleetwatch/device/{good}") == Identity("device", good)


@pytest.mark.parametrize("uri", ["spiffe://fleetwatch/device/", "spiffe://other/device/cam-1",
                                 "spiffe://fleetwatch/admin/cam-1", "spiffe://fleetwatch/device/a/b",
                                 "spiffe://fleetwatch/device/a..b", "https://fleetwatch/device/a",
                                 "cam-1"])
def test_parse_spiffe_id_rejects(uri: str) -> None:
    assert parse_spiffe_id(uri) is None


def test_roles() -> None:
    device, operator = Identity("device", "cam-1"), Identity("operator", "alice")
    assert allowed(device, "/fleetwatch.v1.Ingest/Report")
    assert allowed(device, "/fleetwatch.v1.Ingest/GetSpec")
    for method in ("/fleetwatch.v1.Query/CohortHealth", "/fleetwatch.v1.Admin/PushSpec",
                   "/fleetwatch.v1.Admin/ServerStats", "/fleetwatch.v1.Ingest/Other"):
        assert not allowed(device, method)
    for method in ("/fleetwatch.v1.Query/CohortHealth", "/fleetwatch.v1.Query/ListAlerts",
                   "/fleetwatch.v1.Admin/PushSpec", "/fleetwatch.v1.Admin/ServerStats"):
        assert allowed(operator, method)
    assert not allowed(operator, "/fleetwatch.v1.Ingest/Report")
    assert not allowed(operator, "/fleetwatch.v1.Ingest/GetSpec")


# -- the deny-list -------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_revocation_list_reads_names_uris_and_serials(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    _replace(path, "# stolen 2026-11-30\ncam-1\n  spiffe://fleetwatch/operator/bob  # left\n"
             "0x00AB:CD\n\n")
    clock = FakeClock()
    revoked = RevocationList(path, check_interval_s=1.0, clock=clock)
    no_serial = lambda: None  # noqa: E731
    assert revoked.is_revoked(Identity("device", "cam-1"), no_serial)
    assert revoked.is_revoked(Identity("operator", "bob"), no_serial)
    assert not revoked.is_revoked(Identity("device", "bob"), no_serial)  # the URI names a role
    assert not revoked.is_revoked(Identity("device", "cam-2"), no_serial)
    assert revoked.is_revoked(Identity("device", "cam-2"), lambda: "abcd")  # serial, normalized
    assert not revoked.is_revoked(Identity("device", "cam-2"), lambda: "abce")


def test_revocation_list_rereads_on_change_at_most_every_interval(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    clock = FakeClock()
    revoked = RevocationList(path, check_interval_s=1.0, clock=clock)  # missing: nothing
    cam = Identity("device", "cam-1")
    assert not revoked.is_revoked(cam, lambda: None)
    _replace(path, "cam-1\n")
    clock.t = 0.5
    assert not revoked.is_revoked(cam, lambda: None)  # not looked at again yet
    clock.t = 1.1
    assert revoked.is_revoked(cam, lambda: None)
    # Unreadable (here: not UTF-8) keeps the previous list rather than un-revoking.
    path.write_bytes(b"\xff\xfe cam-2\n")
    clock.t = 2.2
    assert revoked.is_revoked(cam, lambda: None)
    path.unlink()
    clock.t = 3.3
    assert not revoked.is_revoked(cam, lambda: None)


def test_serials_are_only_computed_when_listed(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    _replace(path, "cam-9\n")
    revoked = RevocationList(path)
    calls: list[int] = []
    # "cam-9" is not hexadecimal, so no serial is listed and the certificate is not parsed.
    assert not revoked.is_revoked(Identity("device", "cam-1"), lambda: calls.append(1) or "1")
    assert calls == []


# -- the CLI -------------------------------------------------------------------------------------

def test_cli_certs_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert main(["certs", "init", "--dir", d, "--hostname", "agg.example"]) == 0
    out = capsys.readouterr().out
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        assert f"wrote {Path(d) / name}" in out
    assert main(["certs", "issue-device", "--dir", d, "--device-id", "cam-1"]) == 0
    out = capsys.readouterr().out
    assert "cam-1.sign.pub" in out and "spiffe://fleetwatch/device/cam-1" in out
    serial = _cert(Path(d) / "devices" / "cam-1.pem").serial_number
    assert f"serial {serial:x}" in out
    assert main(["certs", "issue-operator", "--dir", d, "--name", "alice"]) == 0
    assert "spiffe://fleetwatch/operator/alice" in capsys.readouterr().out
    # Refusals are usage errors (exit 2) that say why.
    assert main(["certs", "issue-device", "--dir", d, "--device-id", "cam-1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["certs", "issue-device", "--dir", d, "--device-id", "../cam"]) == 2
    assert "no '/'" in capsys.readouterr().err
    assert main(["certs", "issue-operator", "--dir", str(tmp_path / "empty"), "--name", "x"]) == 2
    assert "certs init" in capsys.readouterr().err
    assert main(["certs", "issue-device", "--dir", d, "--device-id", "cam-2", "--days", "0"]) == 2
    assert main(["certs", "issue-device", "--dir", d, "--device-id", "cam-1", "--force"]) == 0
    # What the agent side reads: the same paths.
    creds = TlsCredentials.for_device(d, "cam-1")
    assert creds.channel_credentials() is not None


def test_tls_credentials_name_the_missing_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not pem")
    creds = TlsCredentials(tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "c.key")
    with pytest.raises(ConfigError, match="tls.cacert: .* is not a PEM file"):
        creds.channel_credentials()
    init_ca(tmp_path / "pki")
    creds = TlsCredentials(tmp_path / "pki" / "ca.pem", tmp_path / "nope.pem",
                           tmp_path / "pki" / "server.key")
    with pytest.raises(ConfigError, match="tls.cert: cannot read"):
        creds.channel_credentials()
    with pytest.raises(ConfigError, match="tls.key"):
        TlsCredentials("ca.pem", "c.pem", "")


def test_expired_certificates_can_be_made_for_tests(tmp_path: Path) -> None:
    init_ca(tmp_path)
    past = datetime.datetime.now(UTC) - datetime.timedelta(days=10)
    issued = issue_device(tmp_path, "old", days=1, now=past)
    assert issued.not_after < datetime.datetime.now(UTC)


class _Aborted(Exception):
    pass


class _Context:
    """The part of a grpc.ServicerContext the interceptor reads (the TLS peer's certificate)."""

    def __init__(self, cert_pem: bytes, uri: str) -> None:
        self._auth = {"x509_pem_cert": [cert_pem], "peer_spiffe_id": [uri.encode()],
                      "x509_subject_alternative_name": [uri.encode()]}
        self.aborted: tuple[object, str] | None = None

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def peer_identities(self) -> list[bytes]:
        return self._auth["x509_subject_alternative_name"]

    def abort(self, code: object, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted(details)


def test_a_certificate_that_expired_after_its_handshake_is_refused(tmp_path: Path) -> None:
    """The TLS handshake checks expiry once; a connection open for days must not outlive its
    certificate: every call checks the peer certificate's not-after."""
    import grpc

    from aggregator.auth import AuthInterceptor, peer_expired

    init_ca(tmp_path)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    issue_device(tmp_path, "cam-old", days=1, now=past)       # expired a day ago
    issue_device(tmp_path, "cam-new", days=1)
    counted: list[str] = []
    guard = AuthInterceptor(None, counted.append)
    old = _Context((tmp_path / "devices" / "cam-old.pem").read_bytes(),
                   "spiffe://fleetwatch/device/cam-old")
    new = _Context((tmp_path / "devices" / "cam-new.pem").read_bytes(),
                   "spiffe://fleetwatch/device/cam-new")
    assert peer_expired(old) and not peer_expired(new)
    with pytest.raises(_Aborted):
        guard._check("/fleetwatch.v1.Ingest/Report", old)
    assert old.aborted is not None and old.aborted[0] == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in old.aborted[1] and counted == ["expired"]
    guard._check("/fleetwatch.v1.Ingest/Report", new)           # returns: allowed
    assert new.aborted is None and counted == ["expired"]
