"""Build a monitoring spec from reference (training) data.

The reference data arrives as columns (a mapping of name to array) or as a CSV file. Every
column becomes a feature except the label column (ground truth, used later), the prediction
column (which becomes `Spec.prediction`) and the optional latency column (which becomes
`Spec.latency_reference_kll`).

Numeric features get equal-mass bins: the edges are the quantiles of the finite values at ranks
0, 1/bins, ..., 1 (minimum and maximum included), made strictly increasing by dropping repeats,
so a column with few distinct values gets fewer bins. A constant column ``v`` gets the two edges
``[v, v + max(1, |v|) * 1e-9]`` (``[v - d, v]`` in the unlikely case ``v + d`` overflows), so
the reference lands in one narrow bin and any other value a device sees is under/overflow.

The quantile at rank r is the item a KLL sketch (`kll_doubles_sketch`) answers with
``get_quantile(r)``: the sorted item at index ``min(floor(r * n), n - 1)``. It is computed
exactly here rather than read from a sketch: all the data is in memory anyway (the reference
counts are exact), and datasketches' KLL compaction draws random bits from a generator that
cannot be seeded, so sketched edges would change from run to run and with them `Spec.hash`.
For n <= kll_k (no compaction) the edges are identical to the sketch's.

Reference counts are exact, in the layouts of `agent.spec`. Categorical vocabularies come from a
`frequent_strings_sketch` (candidates with no false negatives), ranked by exact count (then by
value) and cut to ``top_k``. The latency reference is a serialized `kll_floats_sketch`; when it
would compact, its retained items are chosen deterministically (see `_derandomize_kll`).

Ground truth: with a label column and a prediction column the spec gets a `LabelSpec`. The task
is given or inferred: a numeric prediction in [0, 1] with a two-valued label is binary (classes
the two label values sorted, the positive one second: "1", "true", "yes", "pos" or "positive"
when present, else the larger); a categorical prediction is multiclass (classes the label's
top-K vocabulary); a numeric prediction of a numeric label with more than two values is
regression, with `RESIDUAL_BINS` equal-width residual bins over +-the 99.9th percentile of
|prediction - label| on the reference, rounded up to two significant digits.

The same data, in any row order, gives the same `Spec.hash`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import numbers
import os
import pathlib
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasketches import (
    frequent_items_error_type,
    frequent_strings_sketch,
    kll_floats_sketch,
)

from agent.errors import ConfigError, SpecError
from agent.spec import (
    BINARY,
    CATEGORICAL,
    MAX_BINS,
    MAX_CLASSES,
    MULTICLASS,
    NUMERIC,
    REGRESSION,
    TASKS,
    FeatureSpec,
    LabelSpec,
    PrivacySpec,
    Spec,
)

__all__ = [
    "BaselineOptions",
    "bin_numeric",
    "build_spec_from_columns",
    "build_spec_from_csv",
    "equal_mass_edges",
    "read_csv_columns",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
PathLike = str | os.PathLike[str]

# Relative width of the single bin given to a constant column.
CONSTANT_BIN_WIDTH = 1e-9
# Cell texts read as NaN in a numeric CSV column (compared after strip() and lower()).
_NAN_TOKENS = frozenset({"", "nan", "na"})
# Regression: equal-width residual bins over +-the 99.9th percentile of |residual|.
RESIDUAL_BINS = 40
RESIDUAL_QUANTILE = 0.999
# Binary: label values taken as the positive class (compared after lower()).
_POSITIVE_NAMES = ("1", "true", "yes", "pos", "positive")


@dataclass(frozen=True)
class BaselineOptions:
    """How the reference is summarized.

    `bins` is capped at MAX_BINS - 1 (not 1000) because a spec allows at most MAX_BINS edges.
    """

    bins: int = 10  # equal-mass bins per numeric feature
    top_k: int = 20  # vocabulary size for categorical features
    window_length_s: int = 60
    kll_k: int = 200
    max_categories_lg: int = 10  # lg_max_k of the frequent_strings_sketch
    privacy: PrivacySpec = field(default_factory=PrivacySpec)  # noise on by default

    def __post_init__(self) -> None:
        limits = (
            ("bins", 1, MAX_BINS - 1),
            ("top_k", 1, MAX_BINS),
            ("window_length_s", 1, 86400),
            ("kll_k", 8, 65535),
            ("max_categories_lg", 3, 20),
        )
        for name, lo, hi in limits:
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                    or not lo <= value <= hi):
                raise ConfigError(f"BaselineOptions.{name} must be an integer between {lo} and "
                                  f"{hi}, got {value!r}")
            object.__setattr__(self, name, int(value))


# -- binning ----------------------------------------------------------------------------------


def bin_numeric(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Count `values` into the numeric histogram layout of `agent.spec`.

    `edges` must be strictly increasing (at least 2). Returns int64 counts of length
    ``len(edges) + 2``: [x < e_0, [e_0,e_1), ..., [e_{m-1},e_m] (closed), x > e_m, NaN].
    -inf counts as underflow, +inf as overflow.
    """
    edges = np.asarray(edges, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64).ravel()
    if edges.ndim != 1 or edges.size < 2:
        raise ValueError("bin_numeric needs at least 2 edges")
    m = edges.size - 1  # number of bins
    idx = np.searchsorted(edges, x, side="right")  # 0: underflow, j in 1..m: bin j, m+1: >= e_m
    idx[x == edges[-1]] = m  # the last bin is closed
    idx[np.isnan(x)] = m + 2  # searchsorted puts NaN past the end
    return np.bincount(idx, minlength=m + 3).astype(np.int64)


def equal_mass_edges(finite_values: np.ndarray, bins: int) -> np.ndarray:
    """Strictly increasing edges at the quantiles 0, 1/bins, ..., 1 of `finite_values`.

    The quantile at rank i/bins is the sorted item at index ``min(i * n // bins, n - 1)`` (what
    a KLL sketch answers, without its error). Repeated quantiles are dropped; a constant column
    gets ``[v, v + max(1, |v|) * CONSTANT_BIN_WIDTH]``.
    """
    x = np.sort(np.asarray(finite_values, dtype=np.float64).ravel())
    n = x.size
    if n == 0 or not np.isfinite(x[0]) or not np.isfinite(x[-1]):
        raise ValueError("equal_mass_edges needs at least one value, all finite")
    idx = np.minimum(np.arange(bins + 1, dtype=np.int64) * n // bins, n - 1)
    edges = np.unique(x[idx])
    if edges.size >= 2:
        return edges
    v = float(edges[0])
    width = max(1.0, abs(v)) * CONSTANT_BIN_WIDTH
    upper = v + width
    if math.isfinite(upper):
        return np.array([v, upper])
    return np.array([v - width, v])


# -- CSV --------------------------------------------------------------------------------------


def _read_csv_cells(path: PathLike) -> tuple[list[str], list[list[str]]]:
    """Header and cells (column-major) of a CSV file; blank lines are skipped."""
    p = pathlib.Path(path)
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header: list[str] | None = None
            for row in reader:
                if row:
                    header = row
                    break
            if header is None:
                raise ConfigError(f"{p}: empty file (no header row)")
            names = [h.strip() for h in header]
            seen: set[str] = set()
            for i, name in enumerate(names, start=1):
                if not name:
                    raise ConfigError(f"{p}: line {reader.line_num}: column {i} has an empty name")
                if name in seen:
                    raise ConfigError(f"{p}: line {reader.line_num}: duplicate column {name!r}")
                seen.add(name)
            cells: list[list[str]] = [[] for _ in names]
            for row in reader:
                if not row:
                    continue
                if len(row) != len(names):
                    raise ConfigError(f"{p}: line {reader.line_num}: expected {len(names)} "
                                      f"fields, got {len(row)}")
                for column, cell in zip(cells, row, strict=True):
                    column.append(cell)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text: {e}") from None
    except csv.Error as e:
        raise ConfigError(f"{p}: malformed CSV: {e}") from None
    if not cells[0]:
        raise ConfigError(f"{p}: no data rows after the header")
    return names, cells


def _text_column(cells: Sequence[str]) -> np.ndarray:
    """Object array of the cell texts, None for empty (or blank) cells."""
    out = np.empty(len(cells), dtype=object)
    out[:] = [c if c.strip() else None for c in cells]
    return out


def _parse_column(cells: Sequence[str]) -> np.ndarray:
    """float64 if every non-empty cell parses as a float (empty/nan/NA -> NaN), else text."""
    out = np.empty(len(cells), dtype=np.float64)
    for i, cell in enumerate(cells):
        s = cell.strip()
        if s.lower() in _NAN_TOKENS:
            out[i] = math.nan
            continue
        try:
            out[i] = float(s)
        except ValueError:
            return _text_column(cells)
    return out


def read_csv_columns(path: PathLike) -> dict[str, np.ndarray]:
    """Read a CSV file with a header row into columns.

    A column whose non-empty cells all parse as floats becomes float64 (empty, "nan" and "NA"
    cells become NaN); any other column is an object array of str, None for empty cells.
    Raises ConfigError for an empty file, a header without rows, empty or duplicate column
    names, and rows with the wrong number of fields (naming the line).
    """
    names, cells = _read_csv_cells(path)
    return {name: _parse_column(column) for name, column in zip(names, cells, strict=True)}


# -- columns ----------------------------------------------------------------------------------


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, str):
        return not v.strip()
    if isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_):
        return math.isnan(v)
    return False


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)


def _as_column(name: str, col: np.ndarray | Sequence[Any]) -> np.ndarray:
    """A float64 array (numeric) or an object array (categorical candidates)."""
    if isinstance(col, str | bytes):
        raise ConfigError(f"column {name!r}: expected a sequence of values, got a string")
    if isinstance(col, np.ndarray):
        if col.ndim != 1:
            raise ConfigError(f"column {name!r}: expected a 1-D array, got shape {col.shape}")
        arr = col
    else:
        try:
            items = list(col)
        except TypeError:
            raise ConfigError(f"column {name!r}: expected a sequence of values, got "
                              f"{type(col).__name__}") from None
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
    kind = arr.dtype.kind
    if kind in "iuf":
        return arr.astype(np.float64)
    if kind in "bUS":
        return arr.astype(object)
    if kind != "O":
        raise ConfigError(f"column {name!r}: unsupported dtype {arr.dtype}")
    if all(_is_missing(v) or _is_number(v) for v in arr):
        try:
            return np.array([math.nan if _is_missing(v) else float(v) for v in arr],
                            dtype=np.float64)
        except OverflowError:
            pass
    return arr


def _category(v: Any) -> str | None:
    """The vocabulary key of one categorical value, None when missing.

    Text is kept as is; bytes are decoded as UTF-8; integral numbers are written as integers
    (3.0 -> "3") and other numbers with repr; NaN, None and blank text are missing.
    """
    if _is_missing(v):
        return None
    if isinstance(v, str):
        return str(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace") if v.strip() else None
    if _is_number(v):
        f = float(v)
        if math.isfinite(f) and f.is_integer():
            return str(int(f))
        return repr(f)
    return str(v)


def _numeric_feature(name: str, values: np.ndarray, options: BaselineOptions) -> FeatureSpec:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        nan = int(np.isnan(values).sum())
        raise ConfigError(f"column {name!r}: no usable values ({nan} of {values.size} are "
                          f"missing/NaN, the rest infinite)")
    edges = equal_mass_edges(finite, options.bins)
    counts = bin_numeric(edges, values)
    return _feature_spec(name, NUMERIC, edges=tuple(edges.tolist()),
                         reference_counts=tuple(counts.tolist()))


def _categorical_feature(name: str, values: np.ndarray, options: BaselineOptions) -> FeatureSpec:
    keys = [_category(v) for v in values]
    counter = Counter(k for k in keys if k is not None)
    present = sum(counter.values())
    if not present:
        raise ConfigError(f"column {name!r}: no usable values (all {len(keys)} are missing)")
    # Most frequent first, so that heavy hitters survive the sketch's purges; sorting the
    # aggregated counts also makes the sketch independent of row order.
    by_count = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    sketch = frequent_strings_sketch(options.max_categories_lg)
    for value, count in by_count:
        sketch.update(value, count)
    candidates = [row[0] for row in
                  sketch.get_frequent_items(frequent_items_error_type.NO_FALSE_NEGATIVES)]
    vocabulary = sorted(candidates, key=lambda v: (-counter[v], v))[:options.top_k]
    if len(vocabulary) < min(options.top_k, len(counter)):
        logger.warning("column %r: %d distinct values, the sketch (lg_max_k=%d) kept %d",
                       name, len(counter), options.max_categories_lg, len(candidates))
    in_vocab = [counter[v] for v in vocabulary]
    counts = (*in_vocab, present - sum(in_vocab), len(keys) - present)
    return _feature_spec(name, CATEGORICAL, vocabulary=tuple(vocabulary), reference_counts=counts)


def _feature_spec(name: str, kind: str, **fields: Any) -> FeatureSpec:
    try:
        return FeatureSpec(name=name, type=kind, **fields)  # type: ignore[arg-type]
    except SpecError as e:
        raise ConfigError(f"column {name!r}: {e}") from e


# -- latency ----------------------------------------------------------------------------------

# Serialized KLL (datasketches-cpp, serial version 1, full preamble): preamble ints, serial
# version, family, flags, k, m, unused, n, min_k, num_levels, unused; then num_levels uint32
# level offsets, min item, max item, and the retained items from the lowest level up.
_KLL_HEADER = struct.Struct("<BBBBHBBQHBB")
_KLL_FULL = (5, 1, 15)


def _derandomize_kll(raw: bytes, sorted_items: np.ndarray) -> bytes:
    """Replace the retained items of a compacted KLL floats sketch by deterministic ones.

    A KLL sketch's level sizes depend only on n and k, but which items it keeps depends on
    random bits datasketches cannot be told to seed. Level h holds items of weight 2**h. This
    spreads each level's slots evenly over the rank range, walks the slots in rank order and
    gives each slot the data item at the middle of the ranks its weight covers. Every level
    stays sorted, the header is unchanged, and the rank error is at most about half the
    heaviest weight, below the sketch's own error bound.
    """
    pre, serial, family, _, _, _, _, n, _, num_levels, _ = _KLL_HEADER.unpack_from(raw)
    if (pre, serial, family) != _KLL_FULL or n != sorted_items.size:
        raise RuntimeError(f"unexpected KLL layout {(pre, serial, family)} (n={n})")
    levels = np.frombuffer(raw, dtype="<u4", count=num_levels, offset=_KLL_HEADER.size)
    items_at = _KLL_HEADER.size + 4 * num_levels + 8
    num_items = (len(raw) - items_at) // 4
    bounds = np.append(levels.astype(np.int64) - int(levels[0]), num_items)
    sizes = np.diff(bounds)
    level = np.repeat(np.arange(num_levels), sizes)
    weight = np.left_shift(np.int64(1), level.astype(np.int64))
    if int(weight.sum()) != n:
        raise RuntimeError("KLL level weights do not add up to n")
    position = np.concatenate([(np.arange(s) + 0.5) / s for s in sizes if s])
    order = np.lexsort((-level, position))  # by position, heavier levels first on ties
    end = np.cumsum(weight[order])
    middle = (end - weight[order] + end - 1) // 2
    items = np.empty(num_items, dtype="<f4")
    items[order] = sorted_items[middle]
    out = raw[:items_at] + items.tobytes()
    check = kll_floats_sketch.deserialize(out)
    if check.n != n or check.serialize() != out:
        raise RuntimeError("derandomized KLL sketch does not round-trip")
    return out


def _latency_reference(name: str, values: np.ndarray, k: int) -> bytes:
    if values.dtype.kind != "f":
        raise ConfigError(f"latency column {name!r} must be numeric")
    with np.errstate(over="ignore"):
        items = values.astype(np.float32)
    items = np.sort(items[np.isfinite(items)])
    if items.size == 0:
        raise ConfigError(f"latency column {name!r}: no usable values (no finite numbers)")
    sketch = kll_floats_sketch(k)
    sketch.update(items)  # sorted, so exact-mode bytes do not depend on row order
    raw = sketch.serialize()
    if not sketch.is_estimation_mode():
        return raw
    return _derandomize_kll(raw, items)


# -- ground truth -----------------------------------------------------------------------------


def _round_up_2sig(x: float) -> float:
    """x rounded up to two significant digits (so the residual edges are short and stable)."""
    if not (math.isfinite(x) and x > 0):
        return 1.0
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return float(f"{math.ceil(x / step - 1e-9) * step:.2g}")


def _binary_classes(label: str, values: np.ndarray) -> tuple[str, str]:
    keys = sorted({k for k in map(_category, values) if k is not None})
    if len(keys) != 2:
        raise ConfigError(f"label column {label!r}: a binary task needs exactly 2 distinct "
                          f"label values, got {len(keys)} ({', '.join(keys[:5])})")
    positive = [k for k in keys if k.strip().lower() in _POSITIVE_NAMES]
    if len(positive) == 1:
        neg = keys[0] if keys[1] == positive[0] else keys[1]
        return neg, positive[0]
    try:  # numbers: the larger is positive
        a, b = sorted(keys, key=float)
        return a, b
    except ValueError:
        return keys[0], keys[1]


def _residual_edges(label: str, prediction: np.ndarray, values: np.ndarray) -> tuple[float, ...]:
    residual = prediction - values
    residual = np.abs(residual[np.isfinite(residual)])
    if residual.size == 0:
        raise ConfigError(f"label column {label!r}: no row has both a numeric prediction and "
                          "a numeric label")
    # The quantile as the baseline computes them (an item, not an interpolation): exact and
    # independent of row order.
    top = float(np.sort(residual)[min(int(RESIDUAL_QUANTILE * residual.size),
                                      residual.size - 1)])
    half = _round_up_2sig(top)
    edges = np.linspace(-half, half, RESIDUAL_BINS + 1)
    return tuple(float(f"{e:.12g}") for e in edges)


def _label_spec(label: str, values: np.ndarray, prediction: FeatureSpec,
                pred_values: np.ndarray, label_categorical: bool, task: str | None,
                options: BaselineOptions) -> LabelSpec:
    """The ground truth part of the spec, its task given or inferred (see the module doc)."""
    label_numeric = values.dtype.kind == "f" and not label_categorical
    distinct = {k for k in map(_category, values) if k is not None}
    if task is None:
        finite = pred_values[np.isfinite(pred_values)] if prediction.type == NUMERIC else None
        if prediction.type == CATEGORICAL:
            task = MULTICLASS
        elif (finite is not None and finite.size and finite.min() >= 0 and finite.max() <= 1
              and len(distinct) == 2):
            task = BINARY
        elif label_numeric and len(distinct) > 2:
            task = REGRESSION
        else:
            raise ConfigError(f"label column {label!r}: cannot tell the task from the data "
                              f"(prediction {prediction.type}, {len(distinct)} distinct labels); "
                              f"give it (--task {{{','.join(TASKS)}}})")
    try:
        if task == BINARY:
            if prediction.type != NUMERIC:
                raise ConfigError(f"a binary task needs a numeric score as the prediction; "
                                  f"{prediction.name!r} is categorical")
            return LabelSpec(BINARY, classes=_binary_classes(label, values))
        if task == MULTICLASS:
            if prediction.type != CATEGORICAL:
                raise ConfigError(f"a multiclass task needs a categorical prediction (the "
                                  f"class); {prediction.name!r} is numeric (name it as "
                                  "categorical)")
            vocab = _categorical_feature(label, values, dataclasses.replace(
                options, top_k=min(options.top_k, MAX_CLASSES))).vocabulary
            return LabelSpec(MULTICLASS, classes=vocab)
        if task == REGRESSION:
            if prediction.type != NUMERIC or not label_numeric:
                raise ConfigError("a regression task needs a numeric prediction and a numeric "
                                  "label")
            return LabelSpec(REGRESSION,
                             residual_edges=_residual_edges(label, pred_values, values))
    except SpecError as e:
        raise ConfigError(f"label column {label!r}: {e}") from e
    raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


# -- spec -------------------------------------------------------------------------------------


def build_spec_from_columns(
    columns: Mapping[str, np.ndarray | Sequence[Any]],
    *,
    model: str,
    model_version: str,
    prediction_col: str | None = None,
    label_col: str | None = None,
    latency_col: str | None = None,
    categorical: Iterable[str] = (),
    options: BaselineOptions = BaselineOptions(),
    progress: Progress | None = None,
    task: str | None = None,
) -> Spec:
    """Build a spec from reference columns (equal lengths, one entry per row).

    With `label_col` and `prediction_col`, the spec summarizes ground truth for `task`
    ("binary", "multiclass", "regression"; None: inferred, see the module doc).

    float/int columns (and object columns holding only numbers and missing values) are
    numeric; str/object/bool columns, and those named in `categorical`, are categorical.
    Raises ConfigError naming the column for unknown role columns, columns without usable
    values, ragged columns, or when no feature is left.
    """
    if not isinstance(options, BaselineOptions):
        raise ConfigError(f"options must be BaselineOptions, got {type(options).__name__}")
    if not columns:
        raise ConfigError("no columns")
    arrays: dict[str, np.ndarray] = {}
    for name, col in columns.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"column names must be non-empty strings, got {name!r}")
        arrays[name] = _as_column(name, col)
    first = next(iter(arrays))
    n_rows = arrays[first].size
    for name, arr in arrays.items():
        if arr.size != n_rows:
            raise ConfigError(f"column {name!r} has {arr.size} rows, column {first!r} has "
                              f"{n_rows}")
    if n_rows == 0:
        raise ConfigError("no rows")

    forced = {categorical} if isinstance(categorical, str) else set(categorical)
    unknown = sorted(forced - arrays.keys())
    if unknown:
        raise ConfigError(f"categorical column(s) {', '.join(map(repr, unknown))} not found; "
                          f"columns are {', '.join(map(repr, arrays))}")
    roles: dict[str, str] = {}
    for role, col in (("prediction_col", prediction_col), ("label_col", label_col),
                      ("latency_col", latency_col)):
        if col is None:
            continue
        if col not in arrays:
            raise ConfigError(f"{role} {col!r} is not a column; columns are "
                              f"{', '.join(map(repr, arrays))}")
        if col in roles:
            raise ConfigError(f"column {col!r} is both {roles[col]} and {role}")
        roles[col] = role

    def report(message: str) -> None:
        logger.info("%s", message)
        if progress is not None:
            progress(message)

    def summarize(name: str) -> FeatureSpec:
        values = arrays[name]
        if values.dtype.kind == "f" and name not in forced:
            f = _numeric_feature(name, values, options)
            report(f"{name}: numeric, {len(f.edges) - 1} bins")
        else:
            f = _categorical_feature(name, values, options)
            report(f"{name}: categorical, {len(f.vocabulary)} values")
        return f

    features = []
    for name in arrays:
        if name in roles:
            continue
        features.append(summarize(name))
    if not features:
        raise ConfigError(f"no feature columns left: every column is a prediction, label or "
                          f"latency column ({', '.join(map(repr, arrays))})")
    prediction = summarize(prediction_col) if prediction_col is not None else None
    labels = None
    if task is not None and task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if label_col is not None and prediction is not None and prediction_col is not None:
        labels = _label_spec(label_col, arrays[label_col], prediction, arrays[prediction_col],
                             label_col in forced, task, options)
        what = (f"{len(labels.classes)} classes" if labels.is_classifier
                else f"{len(labels.residual_edges) - 1} residual bins")
        report(f"{label_col}: label, {labels.task} ({what})")
    elif task is not None:
        raise ConfigError("a task needs both a label column and a prediction column")
    elif label_col is not None:
        report(f"{label_col}: label, not summarized (no prediction column to join it with)")
    latency = b""
    if latency_col is not None:
        latency = _latency_reference(latency_col, arrays[latency_col], options.kll_k)
        report(f"{latency_col}: latency, KLL sketch of {len(latency)} bytes")
    try:
        spec = Spec(
            model=model,
            model_version=model_version,
            features=tuple(features),
            prediction=prediction,
            latency_reference_kll=latency,
            window_length_s=options.window_length_s,
            reference_rows=n_rows,
            privacy=options.privacy,
            created_unix_s=int(time.time()),
            labels=labels,
        )
    except SpecError as e:
        raise ConfigError(str(e)) from e
    logger.info("spec %s/%s: %d features, %d rows, hash %s", model, model_version,
                len(features), n_rows, spec.hash)
    return spec


def build_spec_from_csv(
    path: PathLike,
    *,
    model: str,
    model_version: str,
    prediction_col: str | None = None,
    label_col: str | None = None,
    latency_col: str | None = None,
    categorical: Iterable[str] = (),
    options: BaselineOptions = BaselineOptions(),
    progress: Progress | None = None,
    task: str | None = None,
) -> Spec:
    """Build a spec from a CSV file with a header row (see `read_csv_columns`).

    Columns named in `categorical` keep their cell text as is (so "007" stays "007").
    """
    forced = {categorical} if isinstance(categorical, str) else set(categorical)
    names, cells = _read_csv_cells(path)
    columns = {name: _text_column(column) if name in forced else _parse_column(column)
               for name, column in zip(names, cells, strict=True)}
    try:
        return build_spec_from_columns(
            columns, model=model, model_version=model_version, prediction_col=prediction_col,
            label_col=label_col, latency_col=latency_col, categorical=forced, options=options,
            progress=progress, task=task,
        )
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
