"""Alerting: rules from TOML (:mod:`.rules`) evaluated per closed window (:mod:`.engine`).

Example::

    from aggregator.alerts import AlertEngine, load_rules_file

    engine = AlertEngine(load_rules_file("alerts.toml", known_label_keys={"region"}))
    transitions = engine.evaluate(start_s, end_s, samples_by_grouping)

See ``docs/alerts.md`` for the rule format and the semantics.
"""

from aggregator.alerts.engine import (
    Alert,
    AlertEngine,
    AlertState,
    AlertTransition,
    BudgetState,
    CohortSample,
    metric_value,
)
from aggregator.alerts.rules import (
    DEFAULT_BURN_WINDOWS,
    DEFAULT_PERIOD_S,
    SLI_METRICS,
    BurnWindow,
    RuleError,
    RuleSet,
    SloRule,
    ThresholdRule,
    load_rules,
    load_rules_file,
    parse_duration,
)

__all__ = [
    "DEFAULT_BURN_WINDOWS",
    "DEFAULT_PERIOD_S",
    "SLI_METRICS",
    "Alert",
    "AlertEngine",
    "AlertState",
    "AlertTransition",
    "BudgetState",
    "BurnWindow",
    "CohortSample",
    "RuleError",
    "RuleSet",
    "SloRule",
    "ThresholdRule",
    "load_rules",
    "load_rules_file",
    "metric_value",
    "parse_duration",
]
