"""Tests for aggregator.keys: lookup, caching, rereading, path safety."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.keys import DeviceKeys


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def write_pub(directory: Path, device_id: str, key: Ed25519PrivateKey | None = None,
              mtime_ns: int | None = None) -> Ed25519PrivateKey:
    """What `fleetwatch certs issue-device` writes: devices/<ID>.sign.pub (SPKI PEM)."""
    key = key or Ed25519PrivateKey.generate()
    path = directory / "devices" / f"{device_id}.sign.pub"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return key


def test_verifies_exactly_the_signed_bytes(tmp_path: Path) -> None:
    key = write_pub(tmp_path, "cam-1")
    keys = DeviceKeys(tmp_path, recheck_s=0.0)  # misses are not remembered here
    sig = key.sign(b"report bytes")
    assert keys.verify("cam-1", b"report bytes", sig)
    assert not keys.verify("cam-1", b"report bytez", sig)
    assert not keys.verify("cam-1", b"report bytes", bytes([sig[0] ^ 1]) + sig[1:])
    assert not keys.verify("cam-1", b"report bytes", sig[:63])
    assert not keys.verify("cam-1", b"report bytes", b"")
    assert not keys.verify("cam-2", b"report bytes", sig)  # unknown: False, no exception
    other = write_pub(tmp_path, "cam-2")
    assert not keys.verify("cam-2", b"report bytes", sig)  # cam-1's signature, cam-2's key
    assert keys.verify("cam-2", b"x", other.sign(b"x"))


@pytest.mark.parametrize("key_id", ["../x", "..", ".", "a/b", "/etc/passwd", "", "x" * 129,
                                    "devices/../../cam-1", "a\x00b", "cam 1", "..cam-1"])
def test_invalid_key_ids_never_reach_the_filesystem(tmp_path: Path, key_id: str) -> None:
    # A valid key sits where a traversal would land: it must not be found.
    write_pub(tmp_path / "devices", "x")
    write_pub(tmp_path, "cam-1")
    (tmp_path / "x.sign.pub").write_bytes((tmp_path / "devices" / "cam-1.sign.pub").read_bytes())
    keys = DeviceKeys(tmp_path)
    assert keys.path(key_id) is None
    assert keys.public_key(key_id) is None


def test_a_new_device_is_found_after_the_recheck_interval(tmp_path: Path) -> None:
    clock = Clock()
    keys = DeviceKeys(tmp_path, recheck_s=1.0, clock=clock)
    assert not keys.known("cam-9")          # no devices/ directory at all yet
    key = write_pub(tmp_path, "cam-9")
    assert not keys.known("cam-9")          # the miss is remembered for recheck_s
    clock.t += 1.5
    assert keys.known("cam-9")
    assert keys.verify("cam-9", b"m", key.sign(b"m"))


def test_a_rewritten_key_file_is_reread_and_a_removed_one_forgotten(tmp_path: Path) -> None:
    clock = Clock()
    keys = DeviceKeys(tmp_path, recheck_s=1.0, clock=clock)
    old = write_pub(tmp_path, "cam-1", mtime_ns=1_000_000_000)
    assert keys.verify("cam-1", b"m", old.sign(b"m"))
    new = write_pub(tmp_path, "cam-1", mtime_ns=2_000_000_000)  # key rotation
    assert keys.verify("cam-1", b"m", new.sign(b"m"))
    assert not keys.verify("cam-1", b"m", old.sign(b"m"))
    (tmp_path / "devices" / "cam-1.sign.pub").unlink()          # device retired
    assert not keys.verify("cam-1", b"m", new.sign(b"m"))


def test_unusable_key_files_refuse_the_device(tmp_path: Path, caplog) -> None:
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "garbage.sign.pub").write_text("not a key")
    (devices / "ec.sign.pub").write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key()
                                          .public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.
                                                        SubjectPublicKeyInfo))
    (devices / "huge.sign.pub").write_bytes(b"-" * (1 << 20))
    keys = DeviceKeys(tmp_path)
    for name in ("garbage", "ec", "huge"):
        assert not keys.known(name)
        assert not keys.verify(name, b"m", b"\0" * 64)
    assert "not a PEM public key" in caplog.text and "not an Ed25519" in caplog.text


def test_misses_are_bounded(tmp_path: Path, monkeypatch) -> None:
    import aggregator.keys as mod
    monkeypatch.setattr(mod, "MAX_MISSES", 10)
    keys = DeviceKeys(tmp_path)
    for i in range(50):
        keys.known(f"nobody-{i}")
    assert len(keys._misses) == 10
