"""Mutual TLS end to end: a real aggregator serving TLS on loopback, real certificates from
`aggregator.certs`, real gRPC clients. Who may call what, identity against the report's
device_id, expired, revoked and missing certificates, a Monitor over TLS, and the CLI."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import Monitor
from agent.errors import ConfigError
from agent.signing import ReportSigner
from agent.spec import Spec
from agent.transport import TlsCredentials, make_channel
from agent.window import WindowAccumulator
from agent.wire import ReportMeta, report_to_proto, spec_to_proto
from aggregator import certs
from aggregator.cli import main
from aggregator.server import AggregatorConfig, RunningAggregator, serve
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

REPORT_METHOD = "/fleetwatch.v1.Ingest/Report"
Status = grpc.StatusCode


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, server certificate, devices cam-1/cam-2, operator alice, an expired device, a
    CA-signed client certificate without a SPIFFE id (CN 'cam-1' only), and a foreign CA."""
    d = tmp_path_factory.mktemp("pki")
    certs.init_ca(d)
    for device in ("cam-1", "cam-2", "cam-3"):
        certs.issue_device(d, device)
    certs.issue_operator(d, "alice")
    certs.issue_device(d, "cam-old", days=1,
                       now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3))
    # A certificate of the right CA whose only claim is its common name: not an identity.
    key, cert = certs._leaf(d, certs.x509.Name([certs.x509.NameAttribute(NameOID.COMMON_NAME,
                                                                         "cam-1")]),
                            [certs.x509.DNSName("cam-1")], ExtendedKeyUsageOID.CLIENT_AUTH, 30,
                            None)
    (d / "devices" / "cn-only.key").write_bytes(certs._key_pem(key))
    (d / "devices" / "cn-only.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # A device certificate from some other CA.
    other = tmp_path_factory.mktemp("other-pki")
    certs.init_ca(other)
    certs.issue_device(other, "cam-1")
    for suffix in (".pem", ".key"):
        shutil.copy(other / "devices" / f"cam-1{suffix}", d / "devices" / f"foreign{suffix}")
    return d


def creds(pki: Path, who: str) -> TlsCredentials:
    """'device:cam-1' or 'operator:alice' -> its TlsCredentials."""
    role, name = who.split(":")
    folder = pki / ("devices" if role == "device" else "operators")
    return TlsCredentials(pki / "ca.pem", folder / f"{name}.pem", folder / f"{name}.key")


@pytest.fixture
def channels(pki: Path) -> Iterator[Callable[..., grpc.Channel]]:
    """`channels(target, "device:cam-1")`: a mutual-TLS channel, closed at teardown."""
    opened: list[grpc.Channel] = []

    def open_channel(target: str, who: str) -> grpc.Channel:
        channel = grpc.secure_channel(target, creds(pki, who).channel_credentials())
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        channel.close()


@pytest.fixture
def start_tls(spec: Spec, tmp_path: Path,
              channels) -> Callable[..., contextlib.AbstractContextManager]:
    """`with start_tls(tls_dir) as agg:` a real TLS aggregator with the spec pushed by alice."""

    @contextlib.contextmanager
    def start(tls_dir: Path, **config: object) -> Iterator[RunningAggregator]:
        with serve(AggregatorConfig(db=tmp_path / "aggregator.sqlite", listen="127.0.0.1:0",
                                    workers=4, tls_dir=tls_dir,
                                    **config)) as running:  # type: ignore[arg-type]
            admin = pb_grpc.AdminStub(channels(running.target, "operator:alice"))
            admin.PushSpec(spec_to_proto(spec), timeout=10, wait_for_ready=True)
            yield running

    return start


@pytest.fixture
def tls_aggregator(start_tls, pki: Path) -> Iterator[RunningAggregator]:
    with start_tls(pki) as running:
        yield running


def signed_report(pki: Path, spec: Spec, ws: int, device: str, seq: int = 1, n: int = 50,
                  signer_device: str | None = None) -> bytes:
    """A valid, signed envelope for `device`, built with the agent's own accumulator."""
    rng = np.random.default_rng(seq)
    acc = WindowAccumulator(spec, ws)
    acc.observe_batch({"temp": rng.normal(0.0, 1.0, n), "speed": rng.exponential(20.0, n),
                       "scene": rng.choice(np.array(["indoor", "night"], dtype=object), n)},
                      rng.uniform(0.0, 1.0, n), rng.lognormal(3.0, 0.5, n),
                      rng.random(n) < 0.1, n)
    meta = ReportMeta(device, spec.model, spec.model_version, {"region": "eu"}, ws,
                      spec.window_length_s, seq, spec.hash, int(time.time() * 1000), "test")
    signer_id = signer_device or device
    signer = ReportSigner.from_pem_file(pki / "devices" / f"{signer_id}.sign.key")
    return signer.envelope(report_to_proto(meta, acc.to_summary()).SerializeToString())


def report_call(channel: grpc.Channel) -> Callable[..., pb.ReportResponse]:
    return channel.unary_unary(REPORT_METHOD, request_serializer=lambda b: b,
                               response_deserializer=pb.ReportResponse.FromString)


def health(channel: grpc.Channel, spec: Spec, start: int, end: int) -> list[pb.CohortHealth]:
    resp = pb_grpc.QueryStub(channel).CohortHealth(pb.CohortHealthRequest(
        model=spec.model, model_version=spec.model_version, start_unix_s=start,
        end_unix_s=end), timeout=10)
    return list(resp.cohorts)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


# -- roles ---------------------------------------------------------------------------------------

def test_operator_queries_and_devices_only_report(tls_aggregator: RunningAggregator, pki: Path,
                                                  spec: Spec, channels,
                                                  window_base: int) -> None:
    target = tls_aggregator.target
    device, operator = channels(target, "device:cam-1"), channels(target, "operator:alice")
    resp = report_call(device)(signed_report(pki, spec, window_base, "cam-1"), timeout=10)
    assert resp.status == pb.ReportResponse.ACCEPTED
    (cohort,) = health(operator, spec, window_base, window_base + 60)
    assert (cohort.devices, cohort.events) == (1, 50)

    # A device certificate may not query, push specs or read the server's stats...
    assert code_of(lambda: health(device, spec, window_base, window_base + 60)) \
        == Status.PERMISSION_DENIED
    assert code_of(lambda: pb_grpc.AdminStub(device).PushSpec(spec_to_proto(spec), timeout=10)) \
        == Status.PERMISSION_DENIED
    # ...and an operator certificate may not report or fetch specs as a device would.
    assert code_of(lambda: report_call(operator)(
        signed_report(pki, spec, window_base, "cam-1", seq=2), timeout=10)) \
        == Status.PERMISSION_DENIED
    assert code_of(lambda: operator.unary_unary(
        "/fleetwatch.v1.Ingest/GetSpec", request_serializer=pb.GetSpecRequest.SerializeToString,
        response_deserializer=pb.Spec.FromString)(pb.GetSpecRequest(model=spec.model),
                                                  timeout=10)) == Status.PERMISSION_DENIED
    assert tls_aggregator.ingestor.rejected["permission_denied"] == 4
    assert tls_aggregator.ingestor.accepted == 1


def test_report_must_name_the_certificates_device(tls_aggregator: RunningAggregator, pki: Path,
                                                  spec: Spec, channels,
                                                  window_base: int) -> None:
    send = report_call(channels(tls_aggregator.target, "device:cam-1"))
    # cam-1's certificate carrying a report for cam-2 (even one signed with cam-2's key).
    for signer in ("cam-1", "cam-2"):
        with pytest.raises(grpc.RpcError) as e:
            send(signed_report(pki, spec, window_base, "cam-2", signer_device=signer),
                 timeout=10)
        assert e.value.code() == Status.PERMISSION_DENIED
        assert "cam-2" in e.value.details() and "cam-1" in e.value.details()
    assert tls_aggregator.ingestor.rejected["identity_mismatch"] == 2
    assert tls_aggregator.ingestor.accepted == 0
    # Its own report goes through on the same channel.
    assert send(signed_report(pki, spec, window_base, "cam-1"), timeout=10).status \
        == pb.ReportResponse.ACCEPTED


# -- certificates the server refuses -------------------------------------------------------------

def test_expired_no_foreign_or_missing_certificate_fails_the_handshake(
        tls_aggregator: RunningAggregator, pki: Path, spec: Spec, channels,
        window_base: int) -> None:
    target = tls_aggregator.target
    envelope = signed_report(pki, spec, window_base, "cam-old")
    for who in ("device:cam-old", "device:foreign"):
        assert code_of(lambda who=who: report_call(channels(target, who))(envelope, timeout=5)) \
            == Status.UNAVAILABLE, who
    # No client certificate at all, only the CA to check the server with.
    no_cert = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(target, no_cert) as channel:
        assert code_of(lambda: report_call(channel)(envelope, timeout=5)) == Status.UNAVAILABLE
    # Plaintext against the TLS port.
    with grpc.insecure_channel(target) as channel:
        assert code_of(lambda: report_call(channel)(envelope, timeout=5)) == Status.UNAVAILABLE
    assert tls_aggregator.ingestor.accepted == 0


def test_a_literal_address_is_dialled_directly_and_still_checked_by_name(
        pki: Path, tmp_path: Path) -> None:
    """`make_channel` dials an IP literal without the DNS resolver (`direct_target`); the
    server's certificate must still name the address as written, or the override."""
    d = tmp_path / "pki"
    shutil.copytree(pki, d)
    # A CA-signed server certificate for another name only (no 127.0.0.1, no localhost).
    key, cert = certs._leaf(d, certs.x509.Name([certs.x509.NameAttribute(
        NameOID.COMMON_NAME, "elsewhere")]), [certs.x509.DNSName("elsewhere.example")],
        ExtendedKeyUsageOID.SERVER_AUTH, 30, None)
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req[::-1])}),))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(certs._key_pem(key), cert.public_bytes(serialization.Encoding.PEM))],
        root_certificates=(d / "ca.pem").read_bytes(), require_client_auth=True))
    server.start()
    try:
        device = creds(pki, "device:cam-1")
        with make_channel(f"127.0.0.1:{port}", device) as channel:
            assert code_of(lambda: channel.unary_unary("/t.Echo/Call")(b"ab", timeout=5)) \
                == Status.UNAVAILABLE  # the certificate does not name 127.0.0.1
        named = TlsCredentials(device.cacert, device.cert, device.key,
                               server_name="elsewhere.example")
        with make_channel(f"127.0.0.1:{port}", named) as channel:
            assert channel.unary_unary("/t.Echo/Call")(b"ab", timeout=10) == b"ba"
    finally:
        server.stop(0)


def test_common_name_alone_is_not_an_identity(tls_aggregator: RunningAggregator, pki: Path,
                                              spec: Spec, channels, window_base: int) -> None:
    channel = channels(tls_aggregator.target, "device:cn-only")  # CN=cam-1, no URI SAN
    envelope = signed_report(pki, spec, window_base, "cam-1")
    assert code_of(lambda: report_call(channel)(envelope, timeout=10)) == Status.UNAUTHENTICATED
    assert tls_aggregator.ingestor.rejected["unauthenticated"] == 1
    assert tls_aggregator.ingestor.accepted == 0


def test_revoked_device_is_refused_within_about_a_second(start_tls, pki: Path, spec: Spec,
                                                         channels, tmp_path: Path,
                                                         window_base: int) -> None:
    tls_dir = tmp_path / "pki"
    shutil.copytree(pki, tls_dir)
    revoked = tls_dir / "revoked.txt"

    def write_revoked(text: str) -> None:  # atomically, as docs/security.md says
        tmp = tls_dir / "revoked.txt.tmp"
        tmp.write_text(text)
        os.replace(tmp, revoked)

    with start_tls(tls_dir) as agg:
        cam1 = report_call(channels(agg.target, "device:cam-1"))
        cam2 = report_call(channels(agg.target, "device:cam-2"))
        seqs = iter(range(1, 1000))

        def send(call: Callable[..., pb.ReportResponse], device: str) -> pb.ReportResponse:
            return call(signed_report(tls_dir, spec, window_base, device, seq=next(seqs)),
                        timeout=10)

        assert send(cam1, "cam-1").status == pb.ReportResponse.ACCEPTED
        write_revoked("# lost on 2026-11-30\ncam-1\n")
        t0 = time.monotonic()
        while True:  # the open connection of cam-1 is refused too, within the check interval
            try:
                send(cam1, "cam-1")
            except grpc.RpcError as e:
                assert e.code() == Status.UNAUTHENTICATED and "revoked" in e.details()
                break
            assert time.monotonic() - t0 < 5.0, "revocation not applied after 5 s"
            time.sleep(0.05)
        assert send(cam2, "cam-2").status == pb.ReportResponse.ACCEPTED

        # By serial number (hex), as `fleetwatch certs issue-device` printed it.
        serial = certs.x509.load_pem_x509_certificate(
            (tls_dir / "devices" / "cam-2.pem").read_bytes()).serial_number
        write_revoked(f"cam-1\n{serial:X}  # cam-2's current certificate\n")
        t0 = time.monotonic()
        while True:
            try:
                send(cam2, "cam-2")
            except grpc.RpcError as e:
                assert e.code() == Status.UNAUTHENTICATED
                break
            assert time.monotonic() - t0 < 5.0, "revocation by serial not applied after 5 s"
            time.sleep(0.05)
        assert agg.ingestor.rejected["revoked"] >= 2
        # A new certificate for cam-2 (new serial) works again.
        certs.issue_device(tls_dir, "cam-2", force=True)
        envelope = signed_report(tls_dir, spec, window_base, "cam-2", seq=next(seqs))
        with grpc.secure_channel(agg.target, TlsCredentials.for_device(
                tls_dir, "cam-2").channel_credentials()) as channel:
            assert report_call(channel)(envelope, timeout=10).status \
                == pb.ReportResponse.ACCEPTED


# -- the agent and the CLI over TLS --------------------------------------------------------------

class SimClock:
    def __init__(self, t: float) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t


def test_monitor_with_tls_credentials_delivers(tls_aggregator: RunningAggregator, pki: Path,
                                               spec: Spec, channels, tmp_path: Path,
                                               window_base: int) -> None:
    clock = SimClock(window_base + 5)
    rng = np.random.default_rng(3)
    with Monitor(spec.model, spec.model_version, "cam-3", labels={"region": "eu"},
                 aggregator=tls_aggregator.target, spool_dir=tmp_path / "spool", clock=clock,
                 tls=TlsCredentials.for_device(pki, "cam-3"),
                 signing_key=pki / "devices" / "cam-3.sign.key",
                 background=False, grace_s=1.0) as mon:
        assert mon.spec is not None and mon.spec.hash == spec.hash  # GetSpec over TLS
        sent = 0
        for w in range(3):
            clock.t = window_base + w * 60 + 10
            n = 40 + w
            mon.observe_batch({"temp": rng.normal(0, 1, n), "speed": rng.exponential(20, n),
                               "scene": np.array(["indoor"] * n, dtype=object)},
                              predictions=rng.uniform(0, 1, n))
            sent += n
        clock.t = window_base + 3 * 60 + 5
        assert mon.flush(timeout_s=20)
        assert mon.stats().spool.pending == 0
    (cohort,) = health(channels(tls_aggregator.target, "operator:alice"), spec, window_base,
                       window_base + 3 * 60)
    assert (cohort.devices, cohort.reports, cohort.events) == (1, 3, sent)


def test_monitor_tls_files_are_checked_up_front(pki: Path, tmp_path: Path) -> None:
    bad = TlsCredentials(pki / "ca.pem", tmp_path / "missing.pem", pki / "devices" / "cam-1.key")
    with pytest.raises(ConfigError, match="tls.cert"):
        Monitor("detector", "1", "cam-1", aggregator="127.0.0.1:1", spool_dir=tmp_path / "s",
                tls=bad, background=False)


def test_cli_over_mutual_tls(tls_aggregator: RunningAggregator, pki: Path, spec: Spec,
                             channels, window_base: int,
                             capsys: pytest.CaptureFixture[str]) -> None:
    device = channels(tls_aggregator.target, "device:cam-1")
    assert report_call(device)(signed_report(pki, spec, window_base, "cam-1"),
                               timeout=10).status == pb.ReportResponse.ACCEPTED
    base = ["health", "--aggregator", tls_aggregator.target, "--model", spec.model,
            "--since", "30m", "--until", str(window_base + 60), "--json", "--timeout", "10"]
    tls = ["--cacert", str(pki / "ca.pem"), "--cert", str(pki / "operators" / "alice.pem"),
           "--key", str(pki / "operators" / "alice.key")]
    assert main(base + tls) == 0
    (cohort,) = json.loads(capsys.readouterr().out)
    assert cohort["events"] == 50

    # A device certificate is refused (exit 1, the status named).
    device_tls = ["--cacert", str(pki / "ca.pem"), "--cert", str(pki / "devices" / "cam-1.pem"),
                  "--key", str(pki / "devices" / "cam-1.key")]
    assert main(base + device_tls) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    # Usage errors: only some of the three, or a missing file.
    assert main(base + tls[:4]) == 2
    assert "missing --key" in capsys.readouterr().err
    assert main(base + tls[:5] + [str(pki / "nope.key")]) == 2
    assert "--key: cannot read" in capsys.readouterr().err
    # Other client commands take the same options.
    assert main(["cohorts", "--aggregator", tls_aggregator.target, "--model", spec.model,
                 "--json", *tls]) == 0
    assert "region=eu" in capsys.readouterr().out


def test_tls_lifts_the_loopback_only_rule(pki: Path, tmp_path: Path) -> None:
    AggregatorConfig(db=tmp_path / "a.db", listen="0.0.0.0:7070", tls_dir=pki)
    with pytest.raises(ConfigError, match="loopback"):
        AggregatorConfig(db=tmp_path / "a.db", listen="0.0.0.0:7070")
    with pytest.raises(ConfigError, match="tls_dir: .* has no ca.pem"):
        AggregatorConfig(db=tmp_path / "a.db", tls_dir=tmp_path)
