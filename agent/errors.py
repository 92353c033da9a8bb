"""The fleetwatch error tree, shared by the agent and the aggregator.

    FleetwatchError
    ├── ConfigError          bad constructor or CLI configuration
    ├── SpecError            a spec that does not validate (names the field)
    └── ValidationError      a report or summary that does not validate (names the field)
        └── SketchError      serialized sketch bytes that fail the layout check
"""

from __future__ import annotations

__all__ = ["ConfigError", "FleetwatchError", "SketchError", "SpecError", "ValidationError"]


class FleetwatchError(Exception):
    """Base of every error fleetwatch raises on purpose."""


class ConfigError(FleetwatchError, ValueError):
    """Invalid configuration given to a constructor or the CLI."""


class SpecError(FleetwatchError, ValueError):
    """A spec that does not validate; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"spec field {field!r}: {message}")
        self.field = field


class ValidationError(FleetwatchError, ValueError):
    """A report or summary that does not validate; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class SketchError(ValidationError):
    """Serialized sketch bytes that fail the layout check (never handed to datasketches)."""
