"""fleetwatch agent: summarize a model's inputs, outputs and latency on the device."""

from agent.errors import ConfigError, FleetwatchError, SpecError, ValidationError
from agent.monitor import Monitor, MonitorStats
from agent.spec import FeatureSpec, LabelSpec, Spec
from agent.transport import TlsCredentials

__all__ = [
    "ConfigError",
    "FeatureSpec",
    "FleetwatchError",
    "LabelSpec",
    "Monitor",
    "MonitorStats",
    "Spec",
    "SpecError",
    "TlsCredentials",
    "ValidationError",
]
