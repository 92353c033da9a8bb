"""The monitoring spec: what a device summarizes and the reference it is compared against.

A spec is a frozen value. Its identity is `Spec.hash`, the SHA-256 of its canonical JSON form
(every field except `created_unix_s`), so two specs with the same content have the same hash
wherever they were built.

Histogram layouts (shared by reference counts and device reports):

- numeric, edges e_0 < ... < e_m:  [underflow, [e_0,e_1), ..., [e_{m-1},e_m], overflow, missing]
- categorical, vocabulary v_1..v_k: [v_1, ..., v_k, other, missing]
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.errors import SpecError

__all__ = ["CATEGORICAL", "NUMERIC", "FeatureSpec", "PrivacySpec", "Spec"]

NUMERIC = "numeric"
CATEGORICAL = "categorical"
FeatureKind = Literal["numeric", "categorical"]

EVENT = "event"
DEVICE_DAY = "device-day"
DISCRETE_LAPLACE = "discrete_laplace"
DISCRETE_GAUSSIAN = "discrete_gaussian"
NO_NOISE = "none"
UNITS = (EVENT, DEVICE_DAY)
MECHANISMS = (DISCRETE_LAPLACE, DISCRETE_GAUSSIAN, NO_NOISE)

MAX_FEATURES = 1000
MAX_BINS = 1000
MAX_NAME_LEN = 200


@dataclass(frozen=True)
class FeatureSpec:
    """One summarized signal: its name, type, bins and reference counts."""

    name: str
    type: FeatureKind
    edges: tuple[float, ...] = ()
    vocabulary: tuple[str, ...] = ()
    reference_counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        object.__setattr__(self, "vocabulary", tuple(str(v) for v in self.vocabulary))
        object.__setattr__(self, "reference_counts", tuple(int(c) for c in self.reference_counts))
        where = f"features[{self.name!r}]"
        if not isinstance(self.name, str) or not self.name or len(self.name) > MAX_NAME_LEN:
            raise SpecError(f"{where}.name", f"must be a non-empty string of at most "
                            f"{MAX_NAME_LEN} characters")
        if self.type == NUMERIC:
            if self.vocabulary:
                raise SpecError(f"{where}.vocabulary", "a numeric feature has no vocabulary")
            if len(self.edges) < 2:
                raise SpecError(f"{where}.edges", "a numeric feature needs at least 2 edges")
            if len(self.edges) > MAX_BINS:
                raise SpecError(f"{where}.edges", f"at most {MAX_BINS} edges")
            if not all(math.isfinite(e) for e in self.edges):
                raise SpecError(f"{where}.edges", "edges must be finite")
            if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
                raise SpecError(f"{where}.edges", "edges must be strictly increasing")
        elif self.type == CATEGORICAL:
            if self.edges:
                raise SpecError(f"{where}.edges", "a categorical feature has no edges")
            if not self.vocabulary:
                raise SpecError(f"{where}.vocabulary", "a categorical feature needs a vocabulary")
            if len(self.vocabulary) > MAX_BINS:
                raise SpecError(f"{where}.vocabulary", f"at most {MAX_BINS} values")
            if len(set(self.vocabulary)) != len(self.vocabulary):
                raise SpecError(f"{where}.vocabulary", "values must be distinct")
        else:
            raise SpecError(f"{where}.type", f"must be {NUMERIC!r} or {CATEGORICAL!r}, "
                            f"got {self.type!r}")
        if self.reference_counts:
            if len(self.reference_counts) != self.histogram_length:
                raise SpecError(f"{where}.reference_counts",
                                f"expected {self.histogram_length} counts, got "
                                f"{len(self.reference_counts)}")
            if any(c < 0 for c in self.reference_counts):
                raise SpecError(f"{where}.reference_counts", "counts must not be negative")

    @property
    def histogram_length(self) -> int:
        """Bins plus underflow and overflow (or other), plus missing."""
        if self.type == NUMERIC:
            return len(self.edges) + 2
        return len(self.vocabulary) + 2

    @property
    def missing_index(self) -> int:
        return self.histogram_length - 1

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.type == NUMERIC:
            d["edges"] = list(self.edges)
        else:
            d["vocabulary"] = list(self.vocabulary)
        d["reference_counts"] = list(self.reference_counts)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        if not isinstance(d, Mapping):
            raise SpecError("features", f"each feature must be an object, got {type(d).__name__}")
        try:
            return cls(
                name=d["name"],
                type=d["type"],
                edges=tuple(d.get("edges", ())),
                vocabulary=tuple(d.get("vocabulary", ())),
                reference_counts=tuple(d.get("reference_counts", ())),
            )
        except KeyError as e:
            raise SpecError(f"features.{e.args[0]}", "missing") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, SpecError):
                raise
            raise SpecError(f"features[{d.get('name')!r}]", str(e)) from None


@dataclass(frozen=True)
class PrivacySpec:
    """How private histograms are released (see docs/privacy.md).

    unit: "event" (one prediction is protected; the default) or "device-day" (everything one
    device contributes in a UTC day). mechanism: "discrete_laplace" (pure epsilon-DP, the
    default), "discrete_gaussian" (zCDP, needs delta) or "none" (no noise: not private).
    """

    unit: str = EVENT
    mechanism: str = DISCRETE_LAPLACE
    epsilon_per_window: float = 1.0
    delta: float = 0.0
    daily_epsilon_budget: float = 0.0
    max_events_per_window: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon_per_window", float(self.epsilon_per_window))
        object.__setattr__(self, "delta", float(self.delta))
        object.__setattr__(self, "daily_epsilon_budget", float(self.daily_epsilon_budget))
        if self.unit not in UNITS:
            raise SpecError("privacy.unit", f"must be one of {', '.join(UNITS)}, got "
                            f"{self.unit!r}")
        if self.mechanism not in MECHANISMS:
            raise SpecError("privacy.mechanism", f"must be one of {', '.join(MECHANISMS)}, "
                            f"got {self.mechanism!r}")
        if self.mechanism == NO_NOISE:
            return
        if not (math.isfinite(self.epsilon_per_window) and 0 < self.epsilon_per_window <= 100):
            raise SpecError("privacy.epsilon_per_window",
                            f"must be in (0, 100], got {self.epsilon_per_window}")
        if self.mechanism == DISCRETE_GAUSSIAN:
            if not 0 < self.delta < 1e-3:
                raise SpecError("privacy.delta", "the discrete Gaussian needs 0 < delta < 1e-3 "
                                f"(typically 1e-6 or smaller), got {self.delta}")
        elif self.delta:
            raise SpecError("privacy.delta", "only the discrete Gaussian takes a delta")
        if self.unit == DEVICE_DAY:
            if not (isinstance(self.max_events_per_window, int)
                    and 1 <= self.max_events_per_window <= 1_000_000):
                raise SpecError("privacy.max_events_per_window", "device-day needs a clamp of "
                                f"1..1000000 events per window, got {self.max_events_per_window}")
            if not (math.isfinite(self.daily_epsilon_budget)
                    and self.daily_epsilon_budget >= self.epsilon_per_window):
                raise SpecError("privacy.daily_epsilon_budget", "device-day needs a daily "
                                "budget of at least epsilon_per_window, got "
                                f"{self.daily_epsilon_budget}")
        elif self.max_events_per_window or self.daily_epsilon_budget:
            raise SpecError("privacy.unit", "max_events_per_window and daily_epsilon_budget "
                            "apply to the device-day unit only")

    @property
    def noisy(self) -> bool:
        return self.mechanism != NO_NOISE

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "mechanism": self.mechanism,
                "epsilon_per_window": self.epsilon_per_window, "delta": self.delta,
                "daily_epsilon_budget": self.daily_epsilon_budget,
                "max_events_per_window": self.max_events_per_window}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacySpec:
        if not isinstance(d, Mapping):
            raise SpecError("privacy", "must be an object")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise SpecError("privacy", f"unknown keys {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise SpecError("privacy", str(e)) from None


@dataclass(frozen=True)
class Spec:
    """A versioned monitoring spec for one model version."""

    model: str
    model_version: str
    features: tuple[FeatureSpec, ...]
    prediction: FeatureSpec | None = None
    latency_reference_kll: bytes = b""
    window_length_s: int = 60
    reference_rows: int = 0
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    created_unix_s: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        if not isinstance(self.model, str) or not self.model or len(self.model) > MAX_NAME_LEN:
            raise SpecError("model", "must be a non-empty string")
        if not isinstance(self.model_version, str) or not self.model_version:
            raise SpecError("model_version", "must be a non-empty string")
        if (not isinstance(self.window_length_s, int) or isinstance(self.window_length_s, bool)
                or not 1 <= self.window_length_s <= 86400):
            raise SpecError("window_length_s", "must be an integer between 1 and 86400")
        if len(self.features) > MAX_FEATURES:
            raise SpecError("features", f"at most {MAX_FEATURES} features")
        if not isinstance(self.privacy, PrivacySpec):
            raise SpecError("privacy", "must be a PrivacySpec")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise SpecError("features", "feature names must be distinct")

    @property
    def private_histograms(self) -> int:
        """How many histograms one event touches: every feature, and the prediction."""
        return len(self.features) + (1 if self.prediction is not None else 0)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    # -- canonical form and identity ---------------------------------------------------------

    def _content(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_version": self.model_version,
            "features": [f.to_dict() for f in self.features],
            "prediction": self.prediction.to_dict() if self.prediction else None,
            "latency_reference_kll": base64.b64encode(self.latency_reference_kll).decode(),
            "window_length_s": self.window_length_s,
            "reference_rows": self.reference_rows,
            "privacy": self.privacy.to_dict(),
        }

    def canonical_bytes(self) -> bytes:
        """The form the hash is taken over: sorted keys, no whitespace, shortest float repr."""
        return json.dumps(self._content(), sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode()

    @functools.cached_property
    def hash(self) -> str:  # cached: the spec is frozen, and reports ask for it per window
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    # -- JSON files --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = self._content()
        d["created_unix_s"] = self.created_unix_s
        d["hash"] = self.hash
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Spec:
        if not isinstance(d, Mapping):
            raise SpecError("spec", "must be a JSON object")
        for key in ("model", "model_version", "features"):
            if key not in d:
                raise SpecError(key, "missing")
        feats = d["features"]
        if not isinstance(feats, Sequence) or isinstance(feats, str):
            raise SpecError("features", "must be a list")
        try:
            kll = base64.b64decode(d.get("latency_reference_kll", "") or "", validate=True)
        except (ValueError, TypeError):
            raise SpecError("latency_reference_kll", "must be base64") from None
        pred = d.get("prediction")
        spec = cls(
            model=d["model"],
            model_version=str(d["model_version"]),
            features=tuple(FeatureSpec.from_dict(f) for f in feats),
            prediction=FeatureSpec.from_dict(pred) if pred else None,
            latency_reference_kll=kll,
            window_length_s=d.get("window_length_s", 60),
            reference_rows=int(d.get("reference_rows", 0)),
            privacy=PrivacySpec.from_dict(d["privacy"]) if "privacy" in d else PrivacySpec(),
            created_unix_s=int(d.get("created_unix_s", 0)),
        )
        claimed = d.get("hash")
        if claimed and claimed != spec.hash:
            raise SpecError("hash", f"content hash is {spec.hash}, the file claims {claimed}: "
                            "the spec was edited after it was built (delete the "
                            "\"hash\" field to accept the edit)")
        return spec

    @classmethod
    def from_json(cls, text: str | bytes) -> Spec:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError("spec", f"not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Spec:
        return cls.from_json(pathlib.Path(path).read_text())

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(self.to_json())
