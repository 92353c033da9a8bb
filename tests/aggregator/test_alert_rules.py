"""Alert rule files: the documented example parses; every validation error names rule and line."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from aggregator.alerts import rules as rules_mod
from aggregator.alerts.rules import (
    DEFAULT_BURN_WINDOWS,
    BurnWindow,
    RuleError,
    format_duration,
    load_rules,
    load_rules_file,
    parse_duration,
)

EXAMPLE = """\
# fleet alerts
[[rule]]
name = "latency-p95"
metric = "latency_p95_ms"      # any SLI, or "psi:FEATURE" / "psi:*" for drift
op = ">"
threshold = 200
clear = 180                    # hysteresis
for = "5m"
by = ["region"]
severity = "page"
runbook = "https://runbooks.example/latency"
summary = "p95 latency above 200 ms"

[[slo]]
name = "errors"
metric = "error_rate"
objective = "< 0.001"
target = 0.99                  # of windows
by = ["region"]
"""


def test_example_parses() -> None:
    rs = load_rules(EXAMPLE, known_label_keys={"region", "hardware"})
    (rule,) = rs.rules
    assert rule.name == "latency-p95"
    assert rule.metric == "latency_p95_ms"
    assert (rule.op, rule.threshold, rule.clear, rule.for_s) == (">", 200.0, 180.0, 300.0)
    assert rule.by == ("region",)
    assert rule.severity == "page"
    assert rule.runbook == "https://runbooks.example/latency"
    assert rule.summary == "p95 latency above 200 ms"
    assert rule.line == 2
    (slo,) = rs.slos
    assert (slo.name, slo.metric, slo.op, slo.objective) == ("errors", "error_rate", "<", 0.001)
    assert slo.target == 0.99
    assert slo.period_s == 30 * 86400
    assert slo.windows == DEFAULT_BURN_WINDOWS
    assert slo.line == 14
    assert rs.groupings == frozenset({("region",)})


def test_defaults_and_extensions() -> None:
    rs = load_rules("""
[[rule]]
name = "drift"
metric = "drifting:*"
op = ">="
threshold = 1
by = ["region", "hardware"]

[[rule]]
name = "psi"
metric = "psi:f0"
op = "<"
threshold = 0.5

[[slo]]
name = "lat"
metric = "latency_p95_ms"
objective = "<= 200"
target = 0.999
period = "7d"
page = { long = "2h", short = "10m", burn = 10 }
ticket = { burn = 3 }
""", known_features={"f0"})
    drift, psi = rs.rules
    assert drift.clear == drift.threshold == 1.0
    assert drift.for_s == 0.0 and drift.severity == "ticket"
    assert drift.by == ("hardware", "region")        # sorted: the grouping key
    assert psi.clear == 0.5 and psi.by == ()
    (slo,) = rs.slos
    assert slo.period_s == 7 * 86400
    assert slo.windows == (BurnWindow("page", 7200.0, 600.0, 10.0),
                           BurnWindow("ticket", 21600.0, 1800.0, 3.0))


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("30d", 2592000.0), ("0", 0.0),
    ("1.5h", 5400.0), ("250ms", 0.25), ("1w", 604800.0), (" 2m ", 120.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "m", "5 m", "5x", "-5m", "1h-", "h1"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (300, 1800, 3600, 21600, 5400, 90, 86400 * 30)] == \
        ["5m", "30m", "1h", "6h", "1h30m", "1m30s", "30d"]


def _rule(**overrides: object) -> str:
    """A valid threshold rule preceded by two comment lines, with keys replaced or dropped."""
    keys: dict[str, object] = {"name": '"r1"', "metric": '"error_rate"', "op": '">"',
                               "threshold": "0.1"}
    keys.update(overrides)
    body = "\n".join(f"{k} = {v}" for k, v in keys.items() if v is not None)
    return f"# header\n\n[[rule]]\n{body}\n"


@pytest.mark.parametrize(("text", "line", "needle"), [
    (_rule(metric='"latency_p42_ms"'), 5, "unknown metric 'latency_p42_ms'"),
    (_rule(op='"=>"'), 6, "bad op"),
    (_rule(threshold='"high"'), 7, "'threshold' must be a finite number"),
    (_rule(threshold=None), 3, "missing required key 'threshold'"),
    (_rule(metric=None), 3, "missing required key 'metric'"),
    (_rule(**{"for": '"5 minutes"'}), 8, "bad duration"),
    (_rule(clear="0.2"), 8, "clear 0.2 must not be above threshold 0.1"),
    (_rule(op='"<"', clear="0.05"), 8, "must not be below threshold"),
    (_rule(severity='"critical"'), 8, "bad severity"),
    (_rule(treshold="3"), 8, "unknown key 'treshold'"),
    (_rule(by='"region"'), 8, "'by' must be a list"),
    (_rule(by='["region", "region"]'), 8, "repeats"),
    (_rule(by='["severity"]'), 8, "reserved"),
    (_rule(metric='"psi:"'), 5, "names no feature"),
])
def test_threshold_rule_errors_name_rule_and_line(text: str, line: int, needle: str) -> None:
    with pytest.raises(RuleError) as info:
        load_rules(text, source="alerts.toml")
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, ConfigError)
    assert err.line == line, str(err)
    assert err.rule == "r1"
    assert needle in str(err)
    assert str(err).startswith(f"alerts.toml:{line}: rule 'r1': ")


def _slo(**overrides: object) -> str:
    keys: dict[str, object] = {"name": '"s1"', "metric": '"error_rate"',
                               "objective": '"< 0.001"', "target": "0.99"}
    keys.update(overrides)
    body = "\n".join(f"{k} = {v}" for k, v in keys.items() if v is not None)
    return f'[[rule]]\nname = "r0"\nmetric = "events"\nop = "<"\nthreshold = 1\n\n[[slo]]\n{body}\n'


@pytest.mark.parametrize(("text", "line", "needle"), [
    (_slo(objective='"below 0.001"'), 10, "bad objective"),
    (_slo(objective='"0.001"'), 10, "bad objective"),
    (_slo(target="1.0"), 11, "strictly between 0 and 1"),
    (_slo(target="0"), 11, "strictly between 0 and 1"),
    (_slo(target="-0.5"), 11, "strictly between 0 and 1"),
    (_slo(period='"thirty days"'), 12, "bad duration"),
    (_slo(period='"30m"'), 12, "exceeds the period"),
    (_slo(page='{ long = "5m", short = "1h" }'), 12, "shorter than the long one"),
    (_slo(page='{ burn = 0 }'), 12, "positive number"),
    (_slo(page='{ lng = "1h" }'), 12, "unknown key 'lng'"),
    (_slo(severity='"page"'), 12, "unknown key 'severity'"),
    (_slo(metric='"accuracy_top5"'), 9, "unknown metric"),
    (_slo(name='"r0"'), 8, "duplicate rule name 'r0' (first defined at line 1)"),
])
def test_slo_errors_name_rule_and_line(text: str, line: int, needle: str) -> None:
    with pytest.raises(RuleError) as info:
        load_rules(text)
    assert info.value.line == line, str(info.value)
    assert needle in str(info.value)
    assert info.value.rule in ("s1", "r0")


def test_duplicate_names_point_at_the_second_rule() -> None:
    text = _rule() + "\n" + _rule()
    with pytest.raises(RuleError) as info:
        load_rules(text)
    assert info.value.line == 12 and info.value.rule == "r1"   # its name line
    assert "duplicate rule name" in str(info.value)


def test_known_label_keys() -> None:
    load_rules(_rule(by='["region"]'), known_label_keys=["region", "hardware"])
    load_rules(_rule(by='["nowhere"]'))            # unchecked without known keys
    with pytest.raises(RuleError) as info:
        load_rules(_rule(by='["region", "hw"]'), known_label_keys=["region", "hardware"])
    assert info.value.line == 8
    assert "cohort key 'hw' is not a label of any device" in str(info.value)
    assert "known: hardware, region" in str(info.value)


def test_known_features() -> None:
    for metric in ("psi:f0", "psi:*", "drifting:f0", "drifting:*"):
        load_rules(_rule(metric=f'"{metric}"'), known_features={"f0", "f1"})
    load_rules(_rule(metric='"psi:zzz"'))             # unchecked without known features
    for metric in ("psi:zzz", "drifting:zzz"):
        with pytest.raises(RuleError) as info:
            load_rules(_rule(metric=f'"{metric}"'), known_features={"f0", "f1"})
        assert info.value.line == 5
        assert "unknown feature 'zzz'" in str(info.value)


def test_every_sli_metric_is_accepted() -> None:
    for metric in sorted(rules_mod.SLI_METRICS):
        (rule,) = load_rules(_rule(metric=f'"{metric}"')).rules
        assert rule.metric == metric


def test_file_level_errors() -> None:
    with pytest.raises(RuleError) as info:
        load_rules('[[rule]]\nname = "x"\nop = >\n', source="f.toml")
    assert info.value.line == 3 and "not valid TOML" in str(info.value)
    with pytest.raises(RuleError) as info:
        load_rules(_rule() + '\n[[rules]]\nname = "typo"\n')
    assert info.value.line == 9 and "unknown top-level key 'rules'" in str(info.value)
    assert load_rules("# nothing yet\n").rules == ()


def test_load_rules_file(tmp_path) -> None:
    path = tmp_path / "alerts.toml"
    path.write_text(EXAMPLE)
    assert load_rules_file(path).rules[0].name == "latency-p95"
    path.write_text(_rule(op='"!="'))
    with pytest.raises(RuleError, match=r"alerts\.toml:6: rule 'r1': bad op"):
        load_rules_file(path)
    with pytest.raises(RuleError, match="cannot read"):
        load_rules_file(tmp_path / "missing.toml")
