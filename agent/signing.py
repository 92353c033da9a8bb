"""Report signatures: a device signs the exact bytes of each serialized WindowReport.

    signer = ReportSigner.from_pem_file("pki/devices/cam-0042.sign.key")
    envelope = signer.envelope(report.SerializeToString())   # ReportEnvelope bytes

Protobuf serialization is not canonical (field order, unknown fields, map order may differ
between encoders), so the signature covers the bytes as sent, carried next to them in a
`ReportEnvelope{report, signature, key_id}`; the aggregator verifies those bytes before it
parses them, and never re-serializes. A signature travels with the report, so it keeps its
proof of origin through a gateway or a regional aggregator (unlike the TLS identity, which ends
at the first hop). ``key_id`` is the device id: the aggregator looks up
``<dir>/devices/<key_id>.sign.pub`` (`aggregator.keys.DeviceKeys`).
"""

from __future__ import annotations

import os
import pathlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import ConfigError
from agent.keyfiles import read_credential_file
from agent.pbwire import encode_envelope

__all__ = ["SIGN_KEY_SUFFIX", "ReportSigner"]

# What `fleetwatch certs issue-device` writes: devices/<ID>.sign.key (the private half).
SIGN_KEY_SUFFIX = ".sign.key"
MAX_KEY_FILE_BYTES = 16 << 10


class ReportSigner:
    """Signs serialized WindowReports with a device's Ed25519 key; ``key_id`` names the key.

    Stateless after construction and safe to share between threads (signing is pure).
    """

    def __init__(self, key: Ed25519PrivateKey, key_id: str) -> None:
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"signing_key: an Ed25519 private key is needed, got "
                              f"{type(key).__name__}")
        if not key_id or not isinstance(key_id, str):
            raise ConfigError("key_id: must be a non-empty string (the device id)")
        self._key = key
        self.key_id = key_id

    @classmethod
    def from_key(cls, key: Ed25519PrivateKey, key_id: str) -> ReportSigner:
        return cls(key, key_id)

    @classmethod
    def from_pem_file(cls, path: str | os.PathLike[str], key_id: str | None = None
                      ) -> ReportSigner:
        """Load an unencrypted PKCS8 PEM key. ``key_id`` defaults to the file's name without
        ``.sign.key`` (``devices/cam-0042.sign.key`` -> ``cam-0042``)."""
        p = pathlib.Path(path)
        data = read_credential_file("signing_key", p, MAX_KEY_FILE_BYTES)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # Never echo the file's contents: it is a secret.
            raise ConfigError(f"signing_key: {p} is not an unencrypted PEM private key"
                              ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"signing_key: {p} holds a {type(key).__name__}, not an Ed25519 "
                              "key (fleetwatch certs issue-device writes <ID>.sign.key)")
        if key_id is None:
            name = p.name
            key_id = name[:-len(SIGN_KEY_SUFFIX)] if name.endswith(SIGN_KEY_SUFFIX) else ""
            if not key_id:
                raise ConfigError(f"signing_key: cannot tell the device id from {p.name!r}; "
                                  "pass key_id")
        return cls(key, key_id)

    def sign(self, report_bytes: bytes) -> bytes:
        """The 64-byte Ed25519 signature of exactly these bytes."""
        return self._key.sign(report_bytes)

    def envelope(self, report_bytes: bytes) -> bytes:
        """A serialized ReportEnvelope carrying the bytes, their signature and the key id."""
        # Hand-encoded (agent.pbwire): the agent's send path does without protobuf.
        return encode_envelope(report_bytes, self.sign(report_bytes), self.key_id)

    def __repr__(self) -> str:  # never show key material
        return f"ReportSigner(key_id={self.key_id!r})"
