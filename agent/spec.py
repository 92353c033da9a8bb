"""The monitoring spec: what a device summarizes and the reference it is compared against.

A spec is a frozen value. Its identity is `Spec.hash`, the SHA-256 of its canonical JSON form
(every field except `created_unix_s`), so two specs with the same content have the same hash
wherever they were built.

Histogram layouts (shared by reference counts and device reports):

- numeric, edges e_0 < ... < e_m:  [underflow, [e_0,e_1), ..., [e_{m-1},e_m], overflow, missing]
- categorical, vocabulary v_1..v_k: [v_1, ..., v_k, other, missing]

Label-derived histograms (`LabelSpec`, K classes, B calibration bins):

- confusion: (K+1) x (K+1) counts, row-major [true][predicted]; index K is "other"
- calibration: [bin_1: outcome 0, bin_1: outcome 1, ..., bin_B: outcome 0, bin_B: outcome 1]
- residuals (prediction - label) and label latency (seconds): the numeric layout of their edges
"""

from __future__ import annotations

import base64
import functools
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.errors import SpecError

try:  # CPython's own SHA-256: the same digest without loading OpenSSL via hashlib (~1 MB)
    from _sha2 import sha256 as _sha256  # Python >= 3.12
except ImportError:
    try:
        from _sha256 import sha256 as _sha256  # Python 3.11
    except ImportError:  # a build without them
        from hashlib import sha256 as _sha256

__all__ = ["BINARY", "CATEGORICAL", "MULTICLASS", "NUMERIC", "REGRESSION", "FeatureSpec",
           "LabelSpec", "PrivacySpec", "Spec"]

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

BINARY = "binary"
MULTICLASS = "multiclass"
REGRESSION = "regression"
TASKS = (BINARY, MULTICLASS, REGRESSION)

DEFAULT_CALIBRATION_EDGES = tuple(i / 10 for i in range(11))
# Seconds from prediction to label: 1 s to 1 day, roughly log-spaced.
DEFAULT_LABEL_LATENCY_EDGES = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                               1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
MAX_CLASSES = 100  # the confusion matrix grows with the square

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


def _check_edges(where: str, edges: tuple[float, ...]) -> None:
    if len(edges) < 2:
        raise SpecError(where, "needs at least 2 edges")
    if len(edges) > MAX_BINS:
        raise SpecError(where, f"at most {MAX_BINS} edges")
    if not all(math.isfinite(e) for e in edges):
        raise SpecError(where, "edges must be finite")
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise SpecError(where, "edges must be strictly increasing")


@dataclass(frozen=True)
class LabelSpec:
    """Ground truth: how joined labels are summarized (see `Monitor.label`).

    task: "binary" (a numeric score in [0, 1] is the probability of classes[1]; a score at or
    above `threshold` predicts it), "multiclass" (the prediction names a class; an optional
    confidence feeds calibration) or "regression" (numeric prediction and label; the
    residual prediction - label is binned into `residual_edges`). Label latency (seconds
    from prediction to label) is binned into `latency_edges` for every task.
    """

    task: str
    classes: tuple[str, ...] = ()
    threshold: float = 0.5
    calibration_edges: tuple[float, ...] = DEFAULT_CALIBRATION_EDGES
    residual_edges: tuple[float, ...] = ()
    latency_edges: tuple[float, ...] = DEFAULT_LABEL_LATENCY_EDGES

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
            object.__setattr__(self, "threshold", float(self.threshold))
            for name in ("calibration_edges", "residual_edges", "latency_edges"):
                object.__setattr__(self, name, tuple(float(e) for e in getattr(self, name)))
        except (TypeError, ValueError) as e:
            raise SpecError("labels", str(e)) from None
        if self.task not in TASKS:
            raise SpecError("labels.task", f"must be one of {', '.join(TASKS)}, got "
                            f"{self.task!r}")
        _check_edges("labels.latency_edges", self.latency_edges)
        if self.latency_edges[0] < 0:
            raise SpecError("labels.latency_edges", "label latencies are not negative: the "
                            "first edge must be at least 0")
        if self.task == REGRESSION:
            if self.classes:
                raise SpecError("labels.classes", "a regression task has no classes")
            # Calibration is a classifier's: a regression spec carries none (so the default
            # edges do not end up in its canonical form).
            object.__setattr__(self, "calibration_edges", ())
            _check_edges("labels.residual_edges", self.residual_edges)
            return
        if self.residual_edges:
            raise SpecError("labels.residual_edges", "residuals are for the regression task")
        if any(not c or len(c) > MAX_NAME_LEN for c in self.classes):
            raise SpecError("labels.classes", f"class names must be 1-{MAX_NAME_LEN} "
                            "characters")
        if len(set(self.classes)) != len(self.classes):
            raise SpecError("labels.classes", "class names must be distinct")
        if self.task == BINARY and len(self.classes) != 2:
            raise SpecError("labels.classes", "a binary task needs exactly 2 classes (the "
                            f"second is the positive one), got {len(self.classes)}")
        if self.task == MULTICLASS and not 2 <= len(self.classes) <= MAX_CLASSES:
            raise SpecError("labels.classes", f"a multiclass task needs 2-{MAX_CLASSES} "
                            f"classes, got {len(self.classes)}")
        if not (math.isfinite(self.threshold) and 0 <= self.threshold <= 1):
            raise SpecError("labels.threshold", f"must be in [0, 1], got {self.threshold}")
        _check_edges("labels.calibration_edges", self.calibration_edges)
        if self.calibration_edges[0] != 0 or self.calibration_edges[-1] != 1:
            raise SpecError("labels.calibration_edges", "probability edges must run from 0 "
                            "to 1")

    @property
    def is_classifier(self) -> bool:
        return self.task != REGRESSION

    @property
    def confusion_length(self) -> int:
        """(K+1)^2: true x predicted, with "other" as the last class (0 for regression)."""
        return (len(self.classes) + 1) ** 2 if self.is_classifier else 0

    @property
    def calibration_length(self) -> int:
        """Two outcomes per probability bin (0 for regression)."""
        return 2 * (len(self.calibration_edges) - 1) if self.is_classifier else 0

    @property
    def residuals_length(self) -> int:
        """The numeric layout: [under, bins.., over, missing] (0 for classifiers)."""
        return 0 if self.is_classifier else len(self.residual_edges) + 2

    @property
    def label_latency_length(self) -> int:
        return len(self.latency_edges) + 2

    @property
    def histograms(self) -> tuple[str, ...]:
        """Names (as in Summary and WindowReport) of the histograms this task releases; one
        label adds at most one count to each."""
        if self.is_classifier:
            return ("confusion", "calibration", "label_latency")
        return ("residuals", "label_latency")

    def histogram_length(self, name: str) -> int:
        return int(getattr(self, f"{name}_length"))

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "classes": list(self.classes), "threshold": self.threshold,
                "calibration_edges": list(self.calibration_edges),
                "residual_edges": list(self.residual_edges),
                "latency_edges": list(self.latency_edges)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelSpec:
        if not isinstance(d, Mapping):
            raise SpecError("labels", "must be an object")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise SpecError("labels", f"unknown keys {sorted(unknown)}")
        if "task" not in d:
            raise SpecError("labels.task", "missing")
        try:
            return cls(**d)
        except TypeError as e:
            raise SpecError("labels", str(e)) from None


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
    labels: LabelSpec | None = None

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
        if self.labels is not None and not isinstance(self.labels, LabelSpec):
            raise SpecError("labels", "must be a LabelSpec or None")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise SpecError("features", "feature names must be distinct")

    @property
    def private_histograms(self) -> int:
        """How many histograms one event touches: every feature, the prediction, and the
        label histograms of its task (its label may arrive in a later window).

        With the event unit the window's epsilon is split equally over all of them. One
        prediction puts its features and prediction into the window W1 it was observed in,
        and its label (one count per label histogram) into the window W2 the label arrived
        in: each histogram it touches costs epsilon / H, and it touches each one once, so
        its total loss is at most epsilon whether W1 and W2 are the same window or not."""
        labels = len(self.labels.histograms) if self.labels is not None else 0
        return len(self.features) + (1 if self.prediction is not None else 0) + labels

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
        content: dict[str, Any] = {
            "model": self.model,
            "model_version": self.model_version,
            "features": [f.to_dict() for f in self.features],
            "prediction": self.prediction.to_dict() if self.prediction else None,
            "latency_reference_kll": base64.b64encode(self.latency_reference_kll).decode(),
            "window_length_s": self.window_length_s,
            "reference_rows": self.reference_rows,
            "privacy": self.privacy.to_dict(),
        }
        if self.labels is not None:  # absent otherwise, so label-free specs keep their hash
            content["labels"] = self.labels.to_dict()
        return content

    def canonical_bytes(self) -> bytes:
        """The form the hash is taken over: sorted keys, no whitespace, shortest float repr."""
        return json.dumps(self._content(), sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode()

    @functools.cached_property
    def hash(self) -> str:  # cached: the spec is frozen, and reports ask for it per window
        return _sha256(self.canonical_bytes()).hexdigest()

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
            labels=LabelSpec.from_dict(d["labels"]) if d.get("labels") is not None else None,
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
