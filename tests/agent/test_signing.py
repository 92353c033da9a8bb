"""Tests for agent.signing, and for Monitor(signing_key=...) without a server.

The aggregator address points at a closed port: reports stay in the spool, where the tests
read the envelopes back and check their signatures with the public key.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import ConfigError
from agent.monitor import Monitor
from agent.signing import ReportSigner
from agent.spec import NO_NOISE, NUMERIC, FeatureSpec, PrivacySpec, Spec
from protos import fleetwatch_pb2 as pb

NOWHERE = "127.0.0.1:1"


def write_sign_key(directory: Path, device_id: str, key: Ed25519PrivateKey | None = None
                   ) -> Ed25519PrivateKey:
    """What `fleetwatch certs issue-device` writes: devices/<ID>.sign.key, PKCS8 PEM."""
    key = key or Ed25519PrivateKey.generate()
    path = directory / "devices" / f"{device_id}.sign.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    return key


def test_sign_covers_exactly_the_bytes() -> None:
    key = Ed25519PrivateKey.generate()
    signer = ReportSigner.from_key(key, "cam-1")
    data = pb.WindowReport(device_id="cam-1", seq=7).SerializeToString()
    env = pb.ReportEnvelope.FromString(signer.envelope(data))
    assert env.report == data and env.key_id == "cam-1" and len(env.signature) == 64
    key.public_key().verify(env.signature, data)  # raises when wrong
    flipped = bytes([data[0] ^ 1]) + data[1:]
    with pytest.raises(InvalidSignature):
        key.public_key().verify(env.signature, flipped)
    assert signer.sign(data) == env.signature  # Ed25519 is deterministic


def test_from_pem_file_takes_the_device_id_from_the_file_name(tmp_path: Path) -> None:
    key = write_sign_key(tmp_path, "cam-0042")
    signer = ReportSigner.from_pem_file(tmp_path / "devices" / "cam-0042.sign.key")
    assert signer.key_id == "cam-0042"
    key.public_key().verify(signer.sign(b"abc"), b"abc")
    assert ReportSigner.from_pem_file(tmp_path / "devices" / "cam-0042.sign.key",
                                      key_id="other").key_id == "other"
    assert "PRIVATE" not in repr(signer) and "cam-0042" in repr(signer)


def test_bad_key_files_are_config_errors_that_do_not_echo_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        ReportSigner.from_pem_file(tmp_path / "missing.sign.key")
    garbage = tmp_path / "g.sign.key"
    garbage.write_text("SECRET-LOOKING-CONTENT")
    with pytest.raises(ConfigError, match="not an unencrypted PEM") as e:
        ReportSigner.from_pem_file(garbage)
    assert "SECRET" not in str(e.value)
    ec_key = tmp_path / "ec.sign.key"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="not an Ed25519"):
        ReportSigner.from_pem_file(ec_key)
    write_sign_key(tmp_path, "x")
    renamed = tmp_path / "key.pem"
    (tmp_path / "devices" / "x.sign.key").rename(renamed)
    with pytest.raises(ConfigError, match="pass key_id"):
        ReportSigner.from_pem_file(renamed)
    with pytest.raises(ConfigError, match="Ed25519"):
        ReportSigner(ec.generate_private_key(ec.SECP256R1()), "x")  # type: ignore[arg-type]


def _spec() -> Spec:
    return Spec(model="detector", model_version="3",
                features=(FeatureSpec("x", NUMERIC, edges=(0.0, 1.0, 2.0)),),
                window_length_s=60, privacy=PrivacySpec(mechanism=NO_NOISE))


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("as_path", [True, False], ids=["pem-file", "key-object"])
def test_monitor_signs_every_envelope_with_its_device_id(tmp_path: Path, as_path: bool) -> None:
    key = write_sign_key(tmp_path, "cam-0042")
    clock = Clock(1000.0)
    signing_key = tmp_path / "devices" / "cam-0042.sign.key" if as_path else key
    mon = Monitor("detector", "3", "cam-0042", aggregator=NOWHERE, background=False,
                  spool_dir=tmp_path / "spool", clock=clock, spec=_spec(),
                  signing_key=signing_key, backoff_base_s=0.01, backoff_cap_s=0.02,
                  rpc_timeout_s=1.0, grace_s=0.0)
    try:
        mon.observe({"x": 0.5}, latency_ms=3.0)
        clock.t = 1130.0  # closes 960 and the idle 1020 (a heartbeat); 1080 opens
        mon.observe({"x": 1.5}, latency_ms=3.0)
        assert mon.flush(timeout_s=1.0) is False
        items = mon.spool.pending(limit=100)
    finally:
        mon.close(timeout_s=1.0)
    reports = []
    for item in items:
        env = pb.ReportEnvelope.FromString(item.payload)
        assert env.key_id == "cam-0042"
        key.public_key().verify(env.signature, env.report)
        reports.append(pb.WindowReport.FromString(env.report))
    assert [r.heartbeat for r in reports] == [False, True, False]  # flush() closes 1080 too
    assert all(r.device_id == "cam-0042" for r in reports)


def test_monitor_with_a_bad_key_fails_before_opening_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sign.key"
    bad.write_text("nope")
    with pytest.raises(ConfigError, match="signing_key"):
        Monitor("detector", "3", "cam-0042", aggregator=NOWHERE, background=False,
                spool_dir=tmp_path / "spool", spec=_spec(), signing_key=bad)
    assert not (tmp_path / "spool").exists()
