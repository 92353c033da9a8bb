"""Tests for aggregator.baseline: building a spec from reference data."""

from __future__ import annotations

import csv
import math
import pathlib
from collections import Counter

import numpy as np
import pytest
from datasketches import kll_doubles_sketch, kll_floats_sketch
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.spec import BINARY, CATEGORICAL, MULTICLASS, NUMERIC, REGRESSION, Spec
from aggregator.baseline import (
    BaselineOptions,
    bin_numeric,
    build_spec_from_columns,
    build_spec_from_csv,
    equal_mass_edges,
    read_csv_columns,
)

N = 5000
BINS = 10
TOP_K = 5
KLL_K = 200
# Tolerance for the mass of one equal-mass bin: the KLL PMF rank error for k=200 (1.65%,
# "Epsilon PMF" of datasketches, for a difference of two ranks), plus 2/N for the
# discreteness of ranks. Ties are handled separately (see test_equal_mass_with_ties).
PMF_EPS = kll_doubles_sketch(KLL_K).normalized_rank_error(True)
MASS_TOL = PMF_EPS + 2 / N
CITIES = [f"city{i:02d}" for i in range(12)]


def _reference_data(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = rng.normal(10.0, 3.0, N)
    normal[rng.random(N) < 0.05] = np.nan
    lognormal = rng.lognormal(0.0, 1.0, N)
    lognormal[rng.random(N) < 0.03] = np.nan
    integer = rng.poisson(3.0, N).astype(np.float64)
    constant = np.full(N, 4.25)
    weights = np.arange(len(CITIES), 0, -1, dtype=np.float64) ** 2
    city = rng.choice(np.array(CITIES, dtype=object), N, p=weights / weights.sum())
    city[rng.random(N) < 0.04] = None
    score = rng.random(N)
    label = (rng.random(N) < score).astype(np.float64)
    latency = rng.lognormal(2.0, 0.5, N)
    latency[rng.random(N) < 0.02] = np.nan
    return {"normal": normal, "lognormal": lognormal, "integer": integer,
            "constant": constant, "city": city, "score": score, "label": label,
            "latency_ms": latency}


def _cell(v: object, nan_token: str) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return nan_token
        return repr(float(v))  # round-trips exactly through float()
    return str(v)


def _write_csv(path: pathlib.Path, data: dict[str, np.ndarray]) -> pathlib.Path:
    names = list(data)
    tokens = ["", "nan", "NA"]  # every spelling of a missing number the reader accepts
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for i in range(N):
            writer.writerow([_cell(data[n][i], tokens[i % 3]) for n in names])
    return path


def _build(path: pathlib.Path, **kw: object) -> Spec:
    args: dict[str, object] = dict(
        model="fraud", model_version="3", prediction_col="score", label_col="label",
        latency_col="latency_ms",
        options=BaselineOptions(bins=BINS, top_k=TOP_K, kll_k=KLL_K),
    )
    args.update(kw)
    return build_spec_from_csv(path, **args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return _reference_data()


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory: pytest.TempPathFactory, data: dict[str, np.ndarray]) -> pathlib.Path:
    return _write_csv(tmp_path_factory.mktemp("baseline") / "reference.csv", data)


@pytest.fixture(scope="module")
def spec(csv_path: pathlib.Path) -> Spec:
    return _build(csv_path)


def _numpy_counts(edges: tuple[float, ...], x: np.ndarray) -> list[int]:
    """Independent count: np.histogram (half-open bins, the last closed) plus the extras."""
    e = np.asarray(edges)
    inside, _ = np.histogram(x[(x >= e[0]) & (x <= e[-1])], bins=e)
    return [int(np.sum(x < e[0])), *inside.tolist(), int(np.sum(x > e[-1])),
            int(np.isnan(x).sum())]


# -- reading --------------------------------------------------------------------------------


def test_read_csv_columns_types(csv_path: pathlib.Path, data: dict[str, np.ndarray]) -> None:
    cols = read_csv_columns(csv_path)
    assert list(cols) == list(data)
    for name in ("normal", "lognormal", "integer", "constant", "score", "label", "latency_ms"):
        assert cols[name].dtype == np.float64
        np.testing.assert_array_equal(cols[name], data[name])  # NaN == NaN here
    assert cols["city"].dtype == object
    assert list(cols["city"]) == list(data["city"])


def test_read_csv_text_column_keeps_na_and_empty_is_none(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("a,b\n1,x\n,NA\nNA,\n\n2.5,y\n")
    cols = read_csv_columns(p)
    np.testing.assert_array_equal(cols["a"], [1.0, math.nan, math.nan, 2.5])
    assert list(cols["b"]) == ["x", "NA", None, "y"]


# -- the spec -------------------------------------------------------------------------------


def test_roles_and_features(spec: Spec, data: dict[str, np.ndarray]) -> None:
    assert spec.feature_names == ("normal", "lognormal", "integer", "constant", "city")
    assert spec.reference_rows == N
    assert spec.model == "fraud" and spec.model_version == "3"
    assert spec.window_length_s == 60
    assert spec.created_unix_s > 0
    assert spec.prediction is not None
    assert spec.prediction.name == "score" and spec.prediction.type == NUMERIC
    assert "label" not in spec.feature_names and "latency_ms" not in spec.feature_names
    assert spec.feature("city").type == CATEGORICAL
    for name in ("normal", "lognormal", "integer", "constant"):
        assert spec.feature(name).type == NUMERIC


def test_edges_strictly_increasing_and_span_the_data(spec: Spec,
                                                     data: dict[str, np.ndarray]) -> None:
    for f in (*spec.features, spec.prediction):
        assert f is not None
        if f.type != NUMERIC:
            continue
        e = np.asarray(f.edges)
        assert np.all(np.diff(e) > 0), f.name
        assert len(e) - 1 <= BINS
        if f.name != "constant":
            x = data[f.name]
            assert e[0] == np.nanmin(x) and e[-1] == np.nanmax(x), f.name


def test_equal_mass_continuous(spec: Spec, data: dict[str, np.ndarray]) -> None:
    """Continuous columns: BINS bins, each holding 1/BINS of the finite values +- MASS_TOL."""
    for name in ("normal", "lognormal", "score"):
        f = spec.prediction if name == "score" else spec.feature(name)
        assert f is not None
        assert len(f.edges) == BINS + 1
        x = data[name]
        finite = x[np.isfinite(x)]
        masses = np.asarray(f.reference_counts[1:-2]) / finite.size
        assert np.all(np.abs(masses - 1 / BINS) <= MASS_TOL), (name, masses)


def test_equal_mass_with_ties(spec: Spec, data: dict[str, np.ndarray]) -> None:
    """Integer column: fewer bins, and every target rank i/BINS falls (within MASS_TOL) in the
    tie span [F(e-), F(e)] of some edge e, i.e. each equal-mass cut is an edge."""
    f = spec.feature("integer")
    x = np.sort(data["integer"])
    e = np.asarray(f.edges)
    assert len(e) - 1 < BINS
    assert set(e) <= set(np.unique(x))
    below = np.searchsorted(x, e, side="left") / x.size
    upto = np.searchsorted(x, e, side="right") / x.size
    for i in range(1, BINS):
        r = i / BINS
        assert np.any((below - MASS_TOL <= r) & (r <= upto + MASS_TOL)), (r, e)


def test_constant_column(spec: Spec) -> None:
    f = spec.feature("constant")
    assert f.edges == (4.25, 4.25 + 4.25 * 1e-9)
    assert f.reference_counts == (0, N, 0, 0)


def test_numeric_counts_exact(spec: Spec, data: dict[str, np.ndarray]) -> None:
    for f in (*spec.features, spec.prediction):
        assert f is not None
        if f.type != NUMERIC:
            continue
        counts = list(f.reference_counts)
        assert counts == _numpy_counts(f.edges, data[f.name]), f.name
        assert sum(counts) == N
        assert counts[f.missing_index] == int(np.isnan(data[f.name]).sum())


def test_categorical_vocabulary_and_counts(spec: Spec, data: dict[str, np.ndarray]) -> None:
    f = spec.feature("city")
    values = list(data["city"])
    counter = Counter(v for v in values if v is not None)
    true_top = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_K]
    assert f.vocabulary == tuple(v for v, _ in true_top)
    # no value outside the vocabulary is more frequent than one inside it
    assert min(counter[v] for v in f.vocabulary) >= max(
        c for v, c in counter.items() if v not in f.vocabulary)
    expected = [counter[v] for v in f.vocabulary]
    expected += [sum(counter.values()) - sum(expected), values.count(None)]
    assert list(f.reference_counts) == expected
    assert sum(f.reference_counts) == N


def test_latency_reference(spec: Spec, data: dict[str, np.ndarray]) -> None:
    x = data["latency_ms"].astype(np.float32)
    x = np.sort(x[np.isfinite(x)])
    sketch = kll_floats_sketch.deserialize(spec.latency_reference_kll)
    assert sketch.k == KLL_K
    assert sketch.n == x.size
    assert sketch.is_estimation_mode()
    assert sketch.get_min_value() == x[0] and sketch.get_max_value() == x[-1]
    eps = sketch.normalized_rank_error(False)
    for r in np.linspace(0.01, 0.99, 25):
        q = sketch.get_quantile(float(r))
        lo, hi = np.searchsorted(x, q, "left") / x.size, np.searchsorted(x, q, "right") / x.size
        assert lo - eps <= r <= hi + eps, (r, q)
    # it merges like any KLL sketch
    other = kll_floats_sketch(KLL_K)
    other.update(np.arange(100, dtype=np.float32))
    other.merge(sketch)
    assert other.n == x.size + 100


def test_latency_exact_mode_is_plain_sketch() -> None:
    lat = np.array([5.0, 1.0, 3.0, math.nan, 2.0])
    spec = build_spec_from_columns({"f": [1.0, 2.0, 3.0, 4.0, 5.0], "lat": lat},
                                   model="m", model_version="1", latency_col="lat")
    sketch = kll_floats_sketch.deserialize(spec.latency_reference_kll)
    assert sketch.n == 4 and not sketch.is_estimation_mode()
    assert sketch.get_quantiles([0.0, 1.0]) == [1.0, 5.0]


def test_json_round_trip(spec: Spec, tmp_path: pathlib.Path) -> None:
    back = Spec.from_json(spec.to_json())
    assert back == spec
    assert back.hash == spec.hash
    assert back.created_unix_s == spec.created_unix_s
    spec.save(tmp_path / "spec.json")
    assert Spec.load(tmp_path / "spec.json").hash == spec.hash


def test_deterministic_hash(csv_path: pathlib.Path, spec: Spec,
                            data: dict[str, np.ndarray], tmp_path: pathlib.Path) -> None:
    assert _build(csv_path).hash == spec.hash
    # the same rows in another order: same spec
    perm = np.random.default_rng(3).permutation(N)
    shuffled = _write_csv(tmp_path / "shuffled.csv", {k: v[perm] for k, v in data.items()})
    assert _build(shuffled).hash == spec.hash
    # and from columns directly
    direct = build_spec_from_columns(
        data, model="fraud", model_version="3", prediction_col="score", label_col="label",
        latency_col="latency_ms", options=BaselineOptions(bins=BINS, top_k=TOP_K, kll_k=KLL_K))
    assert direct.hash == spec.hash
    # content changes change the hash
    assert _build(csv_path, options=BaselineOptions(bins=BINS + 1, top_k=TOP_K)).hash != spec.hash


def test_progress_called_per_column(csv_path: pathlib.Path) -> None:
    messages: list[str] = []
    _build(csv_path, progress=messages.append)
    for name in ("normal", "lognormal", "integer", "constant", "city", "score", "label",
                 "latency_ms"):
        assert sum(m.startswith(f"{name}:") for m in messages) == 1, (name, messages)


# -- columns input and categorical handling -------------------------------------------------


def test_categorical_prediction_and_forced_categorical(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "c.csv"
    rows = ["code,x,pred"] + [f"{c},{i},{'yes' if i % 3 else 'no'}"
                              for i, c in enumerate(["007", "12", "", "007"] * 25)]
    p.write_text("\n".join(rows) + "\n")
    spec = build_spec_from_csv(p, model="m", model_version="1", prediction_col="pred",
                               categorical=["code"])
    code = spec.feature("code")
    assert code.type == CATEGORICAL
    assert code.vocabulary == ("007", "12")  # the text as written, not 7.0
    assert code.reference_counts == (50, 25, 0, 25)
    assert spec.prediction is not None and spec.prediction.type == CATEGORICAL
    assert spec.prediction.vocabulary == ("yes", "no")
    assert spec.prediction.reference_counts == (66, 34, 0, 0)
    assert spec.feature("x").type == NUMERIC


def test_columns_from_lists() -> None:
    spec = build_spec_from_columns(
        {"num": [1, None, 3.5, 2], "cat": ["a", None, "b", "a"], "flag": [True, False, True, True],
         "codes": np.array([1, 2, 2, 3])},
        model="m", model_version="1", categorical=["codes"],
        options=BaselineOptions(bins=2))
    assert spec.feature("num").type == NUMERIC
    assert spec.feature("num").edges == (1.0, 2.0, 3.5)
    assert spec.feature("num").reference_counts == (0, 1, 2, 0, 1)
    assert spec.feature("cat").reference_counts == (2, 1, 0, 1)
    assert spec.feature("flag").vocabulary == ("True", "False")
    assert spec.feature("codes").vocabulary == ("2", "1", "3")


def test_top_k_cuts_vocabulary_into_other() -> None:
    values = ["a"] * 5 + ["b"] * 4 + ["c"] * 3 + ["d"] * 3 + [None] * 2
    spec = build_spec_from_columns({"v": values}, model="m", model_version="1",
                                   options=BaselineOptions(top_k=3))
    f = spec.feature("v")
    assert f.vocabulary == ("a", "b", "c")  # c and d tie at 3: broken by value
    assert f.reference_counts == (5, 4, 3, 3, 2)


def test_edges_match_kll_in_exact_mode() -> None:
    """For n <= kll_k the sketch holds all values and its quantiles equal ours."""
    x = np.random.default_rng(5).normal(size=160)
    sketch = kll_doubles_sketch(200)
    sketch.update(x)
    ranks = [i / 8 for i in range(9)]
    np.testing.assert_array_equal(equal_mass_edges(x, 8), np.unique(sketch.get_quantiles(ranks)))


def test_equal_mass_edges_constant_extremes() -> None:
    assert list(equal_mass_edges(np.array([0.0, 0.0]), 4)) == [0.0, 1e-9]
    assert list(equal_mass_edges(np.array([-2e6] * 3), 4)) == [-2e6, -2e6 + 2e6 * 1e-9]
    big = np.finfo(np.float64).max
    e = equal_mass_edges(np.array([big]), 4)
    assert e[1] == big and e[0] < big and np.all(np.isfinite(e))


# -- bin_numeric ----------------------------------------------------------------------------


def test_bin_numeric_layout() -> None:
    edges = np.array([0.0, 1.0, 2.0])
    x = np.array([-np.inf, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0 + 1e-12, np.inf, np.nan])
    #                     under  [0,1)    [1,2]  over  missing
    assert bin_numeric(edges, x).tolist() == [2, 2, 3, 2, 1]


def _loop_counts(edges: list[float], xs: list[float]) -> list[int]:
    counts = [0] * (len(edges) + 2)
    for x in xs:
        if math.isnan(x):
            counts[-1] += 1
        elif x < edges[0]:
            counts[0] += 1
        elif x > edges[-1]:
            counts[-2] += 1
        elif x == edges[-1]:
            counts[-3] += 1
        else:
            counts[1 + max(i for i, e in enumerate(edges) if e <= x)] += 1
    return counts


@settings(max_examples=200, deadline=None)
@given(
    edges=st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=8, unique=True).map(sorted),
    xs=st.lists(st.one_of(st.floats(-2e6, 2e6), st.just(math.nan), st.just(math.inf),
                          st.just(-math.inf), st.sampled_from([0.0, 1.0, -1.0])), max_size=40),
)
def test_bin_numeric_matches_loop(edges: list[float], xs: list[float]) -> None:
    xs = xs + edges  # always hit the edges themselves
    assert bin_numeric(np.array(edges), np.array(xs)).tolist() == _loop_counts(edges, xs)


# -- errors ---------------------------------------------------------------------------------


def _csv(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    p = tmp_path / "bad.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "kwargs", "match"),
    [
        ("", {}, "empty file"),
        ("\n\n", {}, "empty file"),
        ("a,b\n", {}, "no data rows"),
        ("a,b\n1,2\n3\n4,5\n", {}, "line 3: expected 2 fields, got 1"),
        ("a,b\n1,2\n3,4,5\n", {}, "line 3"),
        ("a,a\n1,2\n", {}, "duplicate column 'a'"),
        ("a,\n1,2\n", {}, "column 2 has an empty name"),
        ("a,b\n1,2\n", {"prediction_col": "p"}, "prediction_col 'p'"),
        ("a,b\n1,2\n", {"label_col": "y"}, "label_col 'y'"),
        ("a,b\n1,2\n", {"latency_col": "lat"}, "latency_col 'lat'"),
        ("a,b\n1,2\n", {"categorical": ["zz"]}, "'zz'"),
        ("a,b\n1,2\n", {"prediction_col": "a", "label_col": "a"}, "'a' is both"),
        ("a,b\n1,2\n", {"prediction_col": "a", "label_col": "b"}, "no feature columns"),
        ("a,b\n1,\n2,NA\n3,nan\n", {}, "column 'b': no usable values"),
        ("a,b\n1, \n2,\n", {"categorical": ["a", "b"]}, "column 'b': no usable values"),
        ("a,b\n1,inf\n2,-inf\n", {}, "column 'b': no usable values"),
        ("a,b\n1,x\n2,y\n", {"latency_col": "b"}, "latency column 'b' must be numeric"),
        ("a,b\n1,\n2,\n", {"latency_col": "b"}, "latency column 'b': no usable values"),
    ],
)
def test_csv_errors(tmp_path: pathlib.Path, text: str, kwargs: dict[str, object],
                    match: str) -> None:
    p = _csv(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        build_spec_from_csv(p, model="m", model_version="1", **kwargs)  # type: ignore[arg-type]
    assert str(p) in str(info.value)


def test_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_csv_columns(tmp_path / "nope.csv")


def test_column_errors() -> None:
    kw: dict[str, str] = {"model": "m", "model_version": "1"}
    with pytest.raises(ConfigError, match="no columns"):
        build_spec_from_columns({}, **kw)
    with pytest.raises(ConfigError, match="no rows"):
        build_spec_from_columns({"a": np.array([])}, **kw)
    with pytest.raises(ConfigError, match="column 'b' has 2 rows, column 'a' has 3"):
        build_spec_from_columns({"a": [1, 2, 3], "b": [1, 2]}, **kw)
    with pytest.raises(ConfigError, match="column 'a': expected a 1-D array"):
        build_spec_from_columns({"a": np.zeros((2, 2))}, **kw)
    with pytest.raises(ConfigError, match="column 'a': no usable values"):
        build_spec_from_columns({"a": np.full(4, np.nan), "b": [1, 2, 3, 4]}, **kw)
    with pytest.raises(ConfigError, match="model_version"):
        build_spec_from_columns({"a": [1.0]}, model="m", model_version="")


@pytest.mark.parametrize(
    ("field", "value"),
    [("bins", 0), ("bins", 1000), ("top_k", 0), ("top_k", 1001), ("window_length_s", 0),
     ("window_length_s", 86401), ("kll_k", 7), ("max_categories_lg", 2), ("bins", 2.5),
     ("bins", True)],
)
def test_options_validation(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"BaselineOptions.{field}"):
        BaselineOptions(**{field: value})  # type: ignore[arg-type]


def test_options_accept_limits() -> None:
    o = BaselineOptions(bins=np.int64(999), top_k=1000, window_length_s=86400)  # type: ignore[arg-type]
    assert o.bins == 999 and type(o.bins) is int


# -- ground truth -------------------------------------------------------------------------------

def _labeled_columns(seed: int = 11, n: int = 2000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, n)
    score = 1 / (1 + np.exp(-2 * x))
    return {"x": x, "score": score, "y": (rng.random(n) < score).astype(np.int64)}


def test_binary_task_is_inferred_from_a_score_and_two_labels() -> None:
    cols = _labeled_columns()
    spec = build_spec_from_columns(cols, model="m", model_version="1", prediction_col="score",
                                   label_col="y")
    assert spec.labels is not None and spec.labels.task == BINARY
    assert spec.labels.classes == ("0", "1") and spec.labels.threshold == 0.5
    assert [f.name for f in spec.features] == ["x"]  # the label is not a feature
    for labels, classes in ((np.where(cols["y"] == 1, "yes", "no"), ("no", "yes")),
                            (cols["y"] == 1, ("False", "True")),
                            (np.where(cols["y"] == 1, 3.0, -1.0), ("-1", "3")),
                            (np.where(cols["y"] == 1, "b", "a"), ("a", "b"))):
        spec = build_spec_from_columns({**cols, "y": labels}, model="m", model_version="1",
                                       prediction_col="score", label_col="y")
        assert spec.labels.classes == classes  # the positive class second


def test_multiclass_task_from_a_categorical_prediction() -> None:
    rng = np.random.default_rng(12)
    classes = np.array(["cat", "dog", "owl", "emu"])
    y = classes[rng.choice(4, 3000, p=[0.5, 0.3, 0.15, 0.05])]
    cols = {"x": rng.normal(size=3000), "pred": y.copy(), "y": y}
    spec = build_spec_from_columns(cols, model="m", model_version="1", prediction_col="pred",
                                   label_col="y", options=BaselineOptions(top_k=3))
    assert spec.labels.task == MULTICLASS
    assert spec.labels.classes == ("cat", "dog", "owl")  # the label's top-3 by count


def test_regression_residual_edges_cover_the_reference_residuals() -> None:
    rng = np.random.default_rng(13)
    n = 5000
    y = rng.normal(10, 4, n)
    pred = y + rng.normal(0, 0.7, n)
    cols = {"x": rng.normal(size=n), "pred": pred, "y": y}
    spec = build_spec_from_columns(cols, model="m", model_version="1", prediction_col="pred",
                                   label_col="y")
    ls = spec.labels
    assert ls.task == REGRESSION and len(ls.residual_edges) == 41
    half = ls.residual_edges[-1]
    assert ls.residual_edges[0] == -half
    assert np.allclose(np.diff(ls.residual_edges), 2 * half / 40)
    # Independently: the 99.9th percentile of |residual|, rounded up to 2 significant digits.
    q = np.quantile(np.abs(pred - y), 0.999)
    assert q <= half <= q * 1.1 + 1e-12
    assert float(f"{half:.2g}") == half
    # The same data in another row order gives the same spec.
    order = rng.permutation(n)
    again = build_spec_from_columns({k: v[order] for k, v in cols.items()}, model="m",
                                    model_version="1", prediction_col="pred", label_col="y")
    assert again.hash == spec.hash


def test_task_can_be_given_and_is_checked() -> None:
    cols = _labeled_columns()
    rng = np.random.default_rng(14)
    reg = {**cols, "y": rng.normal(size=cols["y"].size)}
    spec = build_spec_from_columns(reg, model="m", model_version="1", prediction_col="score",
                                   label_col="y", task="regression")
    assert spec.labels.task == REGRESSION
    with pytest.raises(ConfigError, match="exactly 2 distinct"):
        build_spec_from_columns(reg, model="m", model_version="1", prediction_col="score",
                                label_col="y", task="binary")
    with pytest.raises(ConfigError, match="categorical prediction"):
        build_spec_from_columns(cols, model="m", model_version="1", prediction_col="score",
                                label_col="y", task="multiclass")
    with pytest.raises(ConfigError, match="task must be one of"):
        build_spec_from_columns(cols, model="m", model_version="1", prediction_col="score",
                                label_col="y", task="ranking")
    with pytest.raises(ConfigError, match="prediction column"):
        build_spec_from_columns(cols, model="m", model_version="1", label_col="y",
                                task="binary")
    # A score outside [0, 1] and a two-valued label: not a probability, no guess.
    with pytest.raises(ConfigError, match="--task"):
        build_spec_from_columns({**cols, "score": cols["score"] * 5}, model="m",
                                model_version="1", prediction_col="score", label_col="y")
    # Without a prediction to join with, the label is left out (as before labels existed).
    spec = build_spec_from_columns(cols, model="m", model_version="1", label_col="y")
    assert spec.labels is None


def test_cli_baseline_build_with_task(tmp_path: pathlib.Path) -> None:
    from aggregator.cli import main

    cols = _labeled_columns(n=300)
    data = tmp_path / "ref.csv"
    with data.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "score", "y"])
        w.writerows(zip(cols["x"], cols["score"], cols["y"], strict=True))
    out = tmp_path / "spec.json"
    assert main(["baseline", "build", "--data", str(data), "--model", "m", "--model-version",
                 "1", "--prediction-col", "score", "--label-col", "y", "--task", "binary",
                 "--out", str(out)]) == 0
    spec = Spec.load(out)
    assert spec.labels is not None and spec.labels.classes == ("0", "1")
    assert spec.private_histograms == 5  # x, the score, and three label histograms
