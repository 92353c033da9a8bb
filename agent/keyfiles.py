"""Reading credential files (certificates, private keys) on the device: bounded, and never
echoing their contents in an error (a key file is a secret)."""

from __future__ import annotations

import os
import pathlib

from agent.errors import ConfigError

__all__ = ["read_credential_file"]


def read_credential_file(what: str, path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of a small credential file; ConfigError naming `what` and the path when it is
    missing, unreadable or larger than `max_bytes`."""
    p = pathlib.Path(path)
    try:
        if p.stat().st_size > max_bytes:
            raise ConfigError(f"{what}: {p} is too large to be a key or certificate file")
        return p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {p}: {e.strerror}") from None
