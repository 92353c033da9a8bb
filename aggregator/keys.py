"""Devices' report-verification keys, read from the directory `fleetwatch certs` writes.

    keys = DeviceKeys("pki")                  # pki/devices/<ID>.sign.pub
    if not keys.verify(envelope.key_id, envelope.report, envelope.signature): ...

A key is looked up as ``<directory>/devices/<key_id>.sign.pub`` (SubjectPublicKeyInfo PEM,
Ed25519). Parsed keys are cached; a known key's file is stat'ed on each lookup and reread when
its mtime or size changes, and a removed file makes the device unknown again (so deleting a
device's ``.sign.pub`` stops its signatures at once). An id with no file is looked for again
at most once per ``recheck_s``, so a newly issued device works without a restart while a flood
of unknown ids costs at most one stat per id and second.

The key id is checked against the device-id rule of `aggregator.certs` before any path is
built: no ``/``, no ``..``, nothing but ``A-Za-z0-9._:-``.
"""

from __future__ import annotations

import collections
import logging
import os
import pathlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import ConfigError
from aggregator.certs import check_id

__all__ = ["AGGREGATOR_KEY_PREFIX", "SIGN_PUB_SUFFIX", "DeviceKeys"]

logger = logging.getLogger(__name__)

SIGN_PUB_SUFFIX = ".sign.pub"
# The key id of a regional aggregator's signing key (`fleetwatch certs issue-aggregator NAME`):
# "aggregator:NAME", looked up as <directory>/aggregators/NAME.sign.pub, so that it can never
# be taken for a device's key (and a device id with this prefix has no key: it cannot sign).
AGGREGATOR_KEY_PREFIX = "aggregator:"
ED25519_SIGNATURE_BYTES = 64
MAX_KEY_FILE_BYTES = 16 << 10
# Remembered misses at most: a flood of made-up ids must not grow memory without bound.
MAX_MISSES = 100_000


@dataclass(frozen=True)
class _Loaded:
    """A key file as last read: its path (kept: building and checking it again for every
    report cost more than the stat itself), its (mtime_ns, size), and the key (None: unusable
    file)."""

    path: pathlib.Path
    stamp: tuple[int, int]
    key: Ed25519PublicKey | None


class DeviceKeys:
    """Thread-safe lookup of devices' Ed25519 public keys by key id (the device id)."""

    def __init__(self, directory: str | os.PathLike[str], recheck_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not recheck_s >= 0:
            raise ConfigError(f"recheck_s: must be >= 0, got {recheck_s!r}")
        self.directory = pathlib.Path(directory)
        self._devices = self.directory / "devices"
        self._recheck_s = float(recheck_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._loaded: dict[str, _Loaded] = {}
        # key id -> when we last found no file for it (oldest first).
        self._misses: collections.OrderedDict[str, float] = collections.OrderedDict()

    def path(self, key_id: str) -> pathlib.Path | None:
        """Where the key of ``key_id`` lives; None when the id is not a valid device id."""
        try:
            if key_id.startswith(AGGREGATOR_KEY_PREFIX):
                name = check_id("key_id", key_id[len(AGGREGATOR_KEY_PREFIX):])
                return self.directory / "aggregators" / (name + SIGN_PUB_SUFFIX)
            check_id("key_id", key_id)
        except ConfigError:
            return None
        return self._devices / (key_id + SIGN_PUB_SUFFIX)

    def public_key(self, key_id: str) -> Ed25519PublicKey | None:
        """The device's key, or None when the id is invalid or has no usable key file."""
        loaded = self._loaded.get(key_id)
        if loaded is not None:  # a known id: its (already checked) path, stat'ed again
            path = loaded.path
        else:
            checked = self.path(key_id)
            if checked is None:
                return None
            path = checked
            with self._lock:
                missed_at = self._misses.get(key_id)
                if missed_at is not None and self._clock() - missed_at < self._recheck_s:
                    return None
        try:
            st = os.stat(path)
        except OSError:
            with self._lock:
                if self._loaded.pop(key_id, None) is not None:
                    logger.warning("signing key of device %s is gone (%s): its reports are "
                                   "refused from now on", key_id, path)
                self._miss(key_id)
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            self._misses.pop(key_id, None)
            loaded = self._loaded.get(key_id)
            if loaded is not None and loaded.stamp == stamp:
                return loaded.key
        loaded = _Loaded(path, stamp, self._read(key_id, path, st.st_size))
        with self._lock:
            self._loaded[key_id] = loaded
        return loaded.key

    def known(self, key_id: str) -> bool:
        return self.public_key(key_id) is not None

    def verify(self, key_id: str, data: bytes, signature: bytes) -> bool:
        """True when ``signature`` is ``key_id``'s Ed25519 signature of exactly ``data``.

        False for an unknown id, a malformed signature or a wrong one (never raises for them).
        """
        return self.check(key_id, data, signature) is True

    def check(self, key_id: str, data: bytes, signature: bytes) -> bool | None:
        """As `verify`, in one key lookup, telling the cases apart: None when ``key_id`` has
        no usable key, False when the signature is malformed or wrong, True when it verifies.
        """
        key = self.public_key(key_id)
        if key is None:
            return None
        if len(signature) != ED25519_SIGNATURE_BYTES:
            return False
        try:
            key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def _miss(self, key_id: str) -> None:
        """Remember that ``key_id`` has no file now (lock held)."""
        self._misses[key_id] = self._clock()
        self._misses.move_to_end(key_id)
        while len(self._misses) > MAX_MISSES:
            self._misses.popitem(last=False)

    def _read(self, key_id: str, path: pathlib.Path, size: int) -> Ed25519PublicKey | None:
        if size > MAX_KEY_FILE_BYTES:
            logger.error("signing key file %s is %d bytes: not a key; device %s is refused",
                         path, size, key_id)
            return None
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except OSError as e:
            logger.error("cannot read signing key file %s: %s", path, e.strerror)
            return None
        except (ValueError, TypeError, UnsupportedAlgorithm):
            logger.error("signing key file %s is not a PEM public key; device %s is refused",
                         path, key_id)
            return None
        if not isinstance(key, Ed25519PublicKey):
            logger.error("signing key file %s holds a %s, not an Ed25519 key; device %s is "
                         "refused", path, type(key).__name__, key_id)
            return None
        logger.info("loaded the signing key of device %s", key_id)
        return key
