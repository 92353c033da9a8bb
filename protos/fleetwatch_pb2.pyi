from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeatureType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_TYPE_UNSPECIFIED: _ClassVar[FeatureType]
    FEATURE_TYPE_NUMERIC: _ClassVar[FeatureType]
    FEATURE_TYPE_CATEGORICAL: _ClassVar[FeatureType]

class PrivacyUnit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIVACY_UNIT_UNSPECIFIED: _ClassVar[PrivacyUnit]
    PRIVACY_UNIT_EVENT: _ClassVar[PrivacyUnit]
    PRIVACY_UNIT_DEVICE_DAY: _ClassVar[PrivacyUnit]

class NoiseMechanism(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NOISE_MECHANISM_UNSPECIFIED: _ClassVar[NoiseMechanism]
    NOISE_MECHANISM_DISCRETE_LAPLACE: _ClassVar[NoiseMechanism]
    NOISE_MECHANISM_DISCRETE_GAUSSIAN: _ClassVar[NoiseMechanism]
    NOISE_MECHANISM_NONE: _ClassVar[NoiseMechanism]

class LabelTask(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_TASK_UNSPECIFIED: _ClassVar[LabelTask]
    LABEL_TASK_BINARY: _ClassVar[LabelTask]
    LABEL_TASK_MULTICLASS: _ClassVar[LabelTask]
    LABEL_TASK_REGRESSION: _ClassVar[LabelTask]
FEATURE_TYPE_UNSPECIFIED: FeatureType
FEATURE_TYPE_NUMERIC: FeatureType
FEATURE_TYPE_CATEGORICAL: FeatureType
PRIVACY_UNIT_UNSPECIFIED: PrivacyUnit
PRIVACY_UNIT_EVENT: PrivacyUnit
PRIVACY_UNIT_DEVICE_DAY: PrivacyUnit
NOISE_MECHANISM_UNSPECIFIED: NoiseMechanism
NOISE_MECHANISM_DISCRETE_LAPLACE: NoiseMechanism
NOISE_MECHANISM_DISCRETE_GAUSSIAN: NoiseMechanism
NOISE_MECHANISM_NONE: NoiseMechanism
LABEL_TASK_UNSPECIFIED: LabelTask
LABEL_TASK_BINARY: LabelTask
LABEL_TASK_MULTICLASS: LabelTask
LABEL_TASK_REGRESSION: LabelTask

class FeatureSpec(_message.Message):
    __slots__ = ("name", "type", "edges", "vocabulary", "reference_counts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: FeatureType
    edges: _containers.RepeatedScalarFieldContainer[float]
    vocabulary: _containers.RepeatedScalarFieldContainer[str]
    reference_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[FeatureType, str]] = ..., edges: _Optional[_Iterable[float]] = ..., vocabulary: _Optional[_Iterable[str]] = ..., reference_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class PrivacySpec(_message.Message):
    __slots__ = ("unit", "mechanism", "epsilon_per_window", "delta", "daily_epsilon_budget", "max_events_per_window")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    EPSILON_PER_WINDOW_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DAILY_EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_EVENTS_PER_WINDOW_FIELD_NUMBER: _ClassVar[int]
    unit: PrivacyUnit
    mechanism: NoiseMechanism
    epsilon_per_window: float
    delta: float
    daily_epsilon_budget: float
    max_events_per_window: int
    def __init__(self, unit: _Optional[_Union[PrivacyUnit, str]] = ..., mechanism: _Optional[_Union[NoiseMechanism, str]] = ..., epsilon_per_window: _Optional[float] = ..., delta: _Optional[float] = ..., daily_epsilon_budget: _Optional[float] = ..., max_events_per_window: _Optional[int] = ...) -> None: ...

class LatencySpec(_message.Message):
    __slots__ = ("reference_kll",)
    REFERENCE_KLL_FIELD_NUMBER: _ClassVar[int]
    reference_kll: bytes
    def __init__(self, reference_kll: _Optional[bytes] = ...) -> None: ...

class LabelSpec(_message.Message):
    __slots__ = ("task", "classes", "threshold", "calibration_edges", "residual_edges", "latency_edges")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_EDGES_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_EDGES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_EDGES_FIELD_NUMBER: _ClassVar[int]
    task: LabelTask
    classes: _containers.RepeatedScalarFieldContainer[str]
    threshold: float
    calibration_edges: _containers.RepeatedScalarFieldContainer[float]
    residual_edges: _containers.RepeatedScalarFieldContainer[float]
    latency_edges: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, task: _Optional[_Union[LabelTask, str]] = ..., classes: _Optional[_Iterable[str]] = ..., threshold: _Optional[float] = ..., calibration_edges: _Optional[_Iterable[float]] = ..., residual_edges: _Optional[_Iterable[float]] = ..., latency_edges: _Optional[_Iterable[float]] = ...) -> None: ...

class Spec(_message.Message):
    __slots__ = ("model", "model_version", "features", "prediction", "latency", "window_length_s", "hash", "created_unix_s", "reference_rows", "privacy", "labels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    WINDOW_LENGTH_S_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ROWS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    features: _containers.RepeatedCompositeFieldContainer[FeatureSpec]
    prediction: FeatureSpec
    latency: LatencySpec
    window_length_s: int
    hash: str
    created_unix_s: int
    reference_rows: int
    privacy: PrivacySpec
    labels: LabelSpec
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., features: _Optional[_Iterable[_Union[FeatureSpec, _Mapping]]] = ..., prediction: _Optional[_Union[FeatureSpec, _Mapping]] = ..., latency: _Optional[_Union[LatencySpec, _Mapping]] = ..., window_length_s: _Optional[int] = ..., hash: _Optional[str] = ..., created_unix_s: _Optional[int] = ..., reference_rows: _Optional[int] = ..., privacy: _Optional[_Union[PrivacySpec, _Mapping]] = ..., labels: _Optional[_Union[LabelSpec, _Mapping]] = ...) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("counts",)
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, counts: _Optional[_Iterable[int]] = ...) -> None: ...

class FeatureHistogram(_message.Message):
    __slots__ = ("name", "histogram")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    name: str
    histogram: Histogram
    def __init__(self, name: _Optional[str] = ..., histogram: _Optional[_Union[Histogram, _Mapping]] = ...) -> None: ...

class WindowReport(_message.Message):
    __slots__ = ("device_id", "model", "model_version", "labels", "window_start_unix_s", "window_length_s", "seq", "spec_hash", "event_count", "error_count", "features", "prediction", "latency_kll", "late_event_count", "invalid_value_count", "unknown_feature_count", "spool_dropped_count", "created_unix_ms", "agent_version", "private_withheld", "epsilon_spent", "day_epsilon_spent", "clamped_event_count", "labeled_count", "confusion", "calibration", "residuals", "label_latency", "heartbeat", "labels_unmatched_count", "label_cache_evicted_count", "clamped_label_count", "merged", "contributions")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    WINDOW_LENGTH_S_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    ERROR_COUNT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_KLL_FIELD_NUMBER: _ClassVar[int]
    LATE_EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    INVALID_VALUE_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FEATURE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DROPPED_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_WITHHELD_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    DAY_EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    CLAMPED_EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELED_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    LABEL_LATENCY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    LABELS_UNMATCHED_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABEL_CACHE_EVICTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    CLAMPED_LABEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    model: str
    model_version: str
    labels: _containers.ScalarMap[str, str]
    window_start_unix_s: int
    window_length_s: int
    seq: int
    spec_hash: str
    event_count: int
    error_count: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureHistogram]
    prediction: Histogram
    latency_kll: bytes
    late_event_count: int
    invalid_value_count: int
    unknown_feature_count: int
    spool_dropped_count: int
    created_unix_ms: int
    agent_version: str
    private_withheld: bool
    epsilon_spent: float
    day_epsilon_spent: float
    clamped_event_count: int
    labeled_count: int
    confusion: Histogram
    calibration: Histogram
    residuals: Histogram
    label_latency: Histogram
    heartbeat: bool
    labels_unmatched_count: int
    label_cache_evicted_count: int
    clamped_label_count: int
    merged: Summary
    contributions: _containers.RepeatedCompositeFieldContainer[Contribution]
    def __init__(self, device_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., window_start_unix_s: _Optional[int] = ..., window_length_s: _Optional[int] = ..., seq: _Optional[int] = ..., spec_hash: _Optional[str] = ..., event_count: _Optional[int] = ..., error_count: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureHistogram, _Mapping]]] = ..., prediction: _Optional[_Union[Histogram, _Mapping]] = ..., latency_kll: _Optional[bytes] = ..., late_event_count: _Optional[int] = ..., invalid_value_count: _Optional[int] = ..., unknown_feature_count: _Optional[int] = ..., spool_dropped_count: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., agent_version: _Optional[str] = ..., private_withheld: _Optional[bool] = ..., epsilon_spent: _Optional[float] = ..., day_epsilon_spent: _Optional[float] = ..., clamped_event_count: _Optional[int] = ..., labeled_count: _Optional[int] = ..., confusion: _Optional[_Union[Histogram, _Mapping]] = ..., calibration: _Optional[_Union[Histogram, _Mapping]] = ..., residuals: _Optional[_Union[Histogram, _Mapping]] = ..., label_latency: _Optional[_Union[Histogram, _Mapping]] = ..., heartbeat: _Optional[bool] = ..., labels_unmatched_count: _Optional[int] = ..., label_cache_evicted_count: _Optional[int] = ..., clamped_label_count: _Optional[int] = ..., merged: _Optional[_Union[Summary, _Mapping]] = ..., contributions: _Optional[_Iterable[_Union[Contribution, _Mapping]]] = ...) -> None: ...

class Contribution(_message.Message):
    __slots__ = ("device_id", "reports", "withheld", "max_day_epsilon")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_FIELD_NUMBER: _ClassVar[int]
    MAX_DAY_EPSILON_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    reports: int
    withheld: int
    max_day_epsilon: float
    def __init__(self, device_id: _Optional[str] = ..., reports: _Optional[int] = ..., withheld: _Optional[int] = ..., max_day_epsilon: _Optional[float] = ...) -> None: ...

class ReportEnvelope(_message.Message):
    __slots__ = ("report", "signature", "key_id")
    REPORT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    report: bytes
    signature: bytes
    key_id: str
    def __init__(self, report: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("report_count", "event_count", "error_count", "features", "prediction", "latency_kll", "late_event_count", "invalid_value_count", "unknown_feature_count", "spool_dropped_count", "noise_variance_per_bin", "withheld_report_count", "histogram_event_count", "clamped_event_count", "labeled_count", "confusion", "calibration", "residuals", "label_latency", "heartbeat_count", "labels_unmatched_count", "label_cache_evicted_count", "clamped_label_count", "label_histogram_count")
    REPORT_COUNT_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    ERROR_COUNT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_KLL_FIELD_NUMBER: _ClassVar[int]
    LATE_EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    INVALID_VALUE_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FEATURE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DROPPED_COUNT_FIELD_NUMBER: _ClassVar[int]
    NOISE_VARIANCE_PER_BIN_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_REPORT_COUNT_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CLAMPED_EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELED_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    LABEL_LATENCY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELS_UNMATCHED_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABEL_CACHE_EVICTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    CLAMPED_LABEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABEL_HISTOGRAM_COUNT_FIELD_NUMBER: _ClassVar[int]
    report_count: int
    event_count: int
    error_count: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureHistogram]
    prediction: Histogram
    latency_kll: bytes
    late_event_count: int
    invalid_value_count: int
    unknown_feature_count: int
    spool_dropped_count: int
    noise_variance_per_bin: float
    withheld_report_count: int
    histogram_event_count: int
    clamped_event_count: int
    labeled_count: int
    confusion: Histogram
    calibration: Histogram
    residuals: Histogram
    label_latency: Histogram
    heartbeat_count: int
    labels_unmatched_count: int
    label_cache_evicted_count: int
    clamped_label_count: int
    label_histogram_count: int
    def __init__(self, report_count: _Optional[int] = ..., event_count: _Optional[int] = ..., error_count: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureHistogram, _Mapping]]] = ..., prediction: _Optional[_Union[Histogram, _Mapping]] = ..., latency_kll: _Optional[bytes] = ..., late_event_count: _Optional[int] = ..., invalid_value_count: _Optional[int] = ..., unknown_feature_count: _Optional[int] = ..., spool_dropped_count: _Optional[int] = ..., noise_variance_per_bin: _Optional[float] = ..., withheld_report_count: _Optional[int] = ..., histogram_event_count: _Optional[int] = ..., clamped_event_count: _Optional[int] = ..., labeled_count: _Optional[int] = ..., confusion: _Optional[_Union[Histogram, _Mapping]] = ..., calibration: _Optional[_Union[Histogram, _Mapping]] = ..., residuals: _Optional[_Union[Histogram, _Mapping]] = ..., label_latency: _Optional[_Union[Histogram, _Mapping]] = ..., heartbeat_count: _Optional[int] = ..., labels_unmatched_count: _Optional[int] = ..., label_cache_evicted_count: _Optional[int] = ..., clamped_label_count: _Optional[int] = ..., label_histogram_count: _Optional[int] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("status", "seq", "high_water_mark")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[ReportResponse.Status]
        ACCEPTED: _ClassVar[ReportResponse.Status]
        DUPLICATE: _ClassVar[ReportResponse.Status]
        STALE_SEQ: _ClassVar[ReportResponse.Status]
    STATUS_UNSPECIFIED: ReportResponse.Status
    ACCEPTED: ReportResponse.Status
    DUPLICATE: ReportResponse.Status
    STALE_SEQ: ReportResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATER_MARK_FIELD_NUMBER: _ClassVar[int]
    status: ReportResponse.Status
    seq: int
    high_water_mark: int
    def __init__(self, status: _Optional[_Union[ReportResponse.Status, str]] = ..., seq: _Optional[int] = ..., high_water_mark: _Optional[int] = ...) -> None: ...

class GetSpecRequest(_message.Message):
    __slots__ = ("model", "model_version", "hash")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    hash: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., hash: _Optional[str] = ...) -> None: ...

class PushSpecResponse(_message.Message):
    __slots__ = ("hash", "created")
    HASH_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    hash: str
    created: bool
    def __init__(self, hash: _Optional[str] = ..., created: _Optional[bool] = ...) -> None: ...

class ListSpecsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListSpecsResponse(_message.Message):
    __slots__ = ("specs",)
    SPECS_FIELD_NUMBER: _ClassVar[int]
    specs: _containers.RepeatedCompositeFieldContainer[Spec]
    def __init__(self, specs: _Optional[_Iterable[_Union[Spec, _Mapping]]] = ...) -> None: ...

class ServerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerStatsResponse(_message.Message):
    __slots__ = ("accepted", "duplicates", "rejected", "started_unix_s", "forwarding")
    class RejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ForwardingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    FORWARDING_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    rejected: _containers.ScalarMap[str, int]
    started_unix_s: int
    forwarding: _containers.ScalarMap[str, int]
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[_Mapping[str, int]] = ..., started_unix_s: _Optional[int] = ..., forwarding: _Optional[_Mapping[str, int]] = ...) -> None: ...

class CohortHealthRequest(_message.Message):
    __slots__ = ("model", "model_version", "selector", "group_by", "start_unix_s", "end_unix_s", "fairness_key")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    FAIRNESS_KEY_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    selector: _containers.ScalarMap[str, str]
    group_by: _containers.RepeatedScalarFieldContainer[str]
    start_unix_s: int
    end_unix_s: int
    fairness_key: str
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., group_by: _Optional[_Iterable[str]] = ..., start_unix_s: _Optional[int] = ..., end_unix_s: _Optional[int] = ..., fairness_key: _Optional[str] = ...) -> None: ...

class FeatureDrift(_message.Message):
    __slots__ = ("name", "count", "psi", "js_distance", "ks", "wasserstein", "wasserstein_norm", "missing_rate", "p_value", "drifting", "insufficient_data", "expected_null_psi")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    JS_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    KS_FIELD_NUMBER: _ClassVar[int]
    WASSERSTEIN_FIELD_NUMBER: _ClassVar[int]
    WASSERSTEIN_NORM_FIELD_NUMBER: _ClassVar[int]
    MISSING_RATE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    DRIFTING_FIELD_NUMBER: _ClassVar[int]
    INSUFFICIENT_DATA_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_NULL_PSI_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    psi: float
    js_distance: float
    ks: float
    wasserstein: float
    wasserstein_norm: float
    missing_rate: float
    p_value: float
    drifting: bool
    insufficient_data: bool
    expected_null_psi: float
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., psi: _Optional[float] = ..., js_distance: _Optional[float] = ..., ks: _Optional[float] = ..., wasserstein: _Optional[float] = ..., wasserstein_norm: _Optional[float] = ..., missing_rate: _Optional[float] = ..., p_value: _Optional[float] = ..., drifting: _Optional[bool] = ..., insufficient_data: _Optional[bool] = ..., expected_null_psi: _Optional[float] = ...) -> None: ...

class CohortHealth(_message.Message):
    __slots__ = ("cohort", "model", "model_version", "spec_hash", "start_unix_s", "end_unix_s", "devices", "reports", "events", "errors", "error_rate", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_rank_error", "features", "prediction", "late_events", "invalid_values", "unknown_features", "spool_dropped", "reference_latency_p50_ms", "reference_latency_p95_ms", "reference_latency_p99_ms", "withheld_reports", "histogram_events", "noise_sd_per_bin", "devices_last_day", "availability", "heartbeats", "task", "labeled", "accuracy", "precision", "recall", "f1", "brier", "ece", "mae", "rmse", "label_latency_p50_s", "label_latency_p95_s", "labels_unmatched", "label_cache_evicted", "positive_rate")
    class CohortEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COHORT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_RANK_ERROR_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    LATE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    INVALID_VALUES_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DROPPED_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_REPORTS_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_EVENTS_FIELD_NUMBER: _ClassVar[int]
    NOISE_SD_PER_BIN_FIELD_NUMBER: _ClassVar[int]
    DEVICES_LAST_DAY_FIELD_NUMBER: _ClassVar[int]
    AVAILABILITY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LABELED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    BRIER_FIELD_NUMBER: _ClassVar[int]
    ECE_FIELD_NUMBER: _ClassVar[int]
    MAE_FIELD_NUMBER: _ClassVar[int]
    RMSE_FIELD_NUMBER: _ClassVar[int]
    LABEL_LATENCY_P50_S_FIELD_NUMBER: _ClassVar[int]
    LABEL_LATENCY_P95_S_FIELD_NUMBER: _ClassVar[int]
    LABELS_UNMATCHED_FIELD_NUMBER: _ClassVar[int]
    LABEL_CACHE_EVICTED_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_RATE_FIELD_NUMBER: _ClassVar[int]
    cohort: _containers.ScalarMap[str, str]
    model: str
    model_version: str
    spec_hash: str
    start_unix_s: int
    end_unix_s: int
    devices: int
    reports: int
    events: int
    errors: int
    error_rate: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    latency_rank_error: float
    features: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    prediction: FeatureDrift
    late_events: int
    invalid_values: int
    unknown_features: int
    spool_dropped: int
    reference_latency_p50_ms: float
    reference_latency_p95_ms: float
    reference_latency_p99_ms: float
    withheld_reports: int
    histogram_events: int
    noise_sd_per_bin: float
    devices_last_day: int
    availability: float
    heartbeats: int
    task: str
    labeled: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    brier: float
    ece: float
    mae: float
    rmse: float
    label_latency_p50_s: float
    label_latency_p95_s: float
    labels_unmatched: int
    label_cache_evicted: int
    positive_rate: float
    def __init__(self, cohort: _Optional[_Mapping[str, str]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., spec_hash: _Optional[str] = ..., start_unix_s: _Optional[int] = ..., end_unix_s: _Optional[int] = ..., devices: _Optional[int] = ..., reports: _Optional[int] = ..., events: _Optional[int] = ..., errors: _Optional[int] = ..., error_rate: _Optional[float] = ..., latency_p50_ms: _Optional[float] = ..., latency_p95_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., latency_rank_error: _Optional[float] = ..., features: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ..., prediction: _Optional[_Union[FeatureDrift, _Mapping]] = ..., late_events: _Optional[int] = ..., invalid_values: _Optional[int] = ..., unknown_features: _Optional[int] = ..., spool_dropped: _Optional[int] = ..., reference_latency_p50_ms: _Optional[float] = ..., reference_latency_p95_ms: _Optional[float] = ..., reference_latency_p99_ms: _Optional[float] = ..., withheld_reports: _Optional[int] = ..., histogram_events: _Optional[int] = ..., noise_sd_per_bin: _Optional[float] = ..., devices_last_day: _Optional[int] = ..., availability: _Optional[float] = ..., heartbeats: _Optional[int] = ..., task: _Optional[str] = ..., labeled: _Optional[int] = ..., accuracy: _Optional[float] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ..., brier: _Optional[float] = ..., ece: _Optional[float] = ..., mae: _Optional[float] = ..., rmse: _Optional[float] = ..., label_latency_p50_s: _Optional[float] = ..., label_latency_p95_s: _Optional[float] = ..., labels_unmatched: _Optional[int] = ..., label_cache_evicted: _Optional[int] = ..., positive_rate: _Optional[float] = ...) -> None: ...

class FairnessGroup(_message.Message):
    __slots__ = ("value", "labeled", "accuracy", "positive_rate")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LABELED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_RATE_FIELD_NUMBER: _ClassVar[int]
    value: str
    labeled: int
    accuracy: float
    positive_rate: float
    def __init__(self, value: _Optional[str] = ..., labeled: _Optional[int] = ..., accuracy: _Optional[float] = ..., positive_rate: _Optional[float] = ...) -> None: ...

class FairnessDelta(_message.Message):
    __slots__ = ("key", "accuracy_gap", "accuracy_best", "accuracy_worst", "positive_rate_gap", "positive_rate_highest", "positive_rate_lowest", "groups")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_GAP_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_BEST_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_WORST_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_RATE_GAP_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_RATE_HIGHEST_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_RATE_LOWEST_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    key: str
    accuracy_gap: float
    accuracy_best: str
    accuracy_worst: str
    positive_rate_gap: float
    positive_rate_highest: str
    positive_rate_lowest: str
    groups: _containers.RepeatedCompositeFieldContainer[FairnessGroup]
    def __init__(self, key: _Optional[str] = ..., accuracy_gap: _Optional[float] = ..., accuracy_best: _Optional[str] = ..., accuracy_worst: _Optional[str] = ..., positive_rate_gap: _Optional[float] = ..., positive_rate_highest: _Optional[str] = ..., positive_rate_lowest: _Optional[str] = ..., groups: _Optional[_Iterable[_Union[FairnessGroup, _Mapping]]] = ...) -> None: ...

class CohortHealthResponse(_message.Message):
    __slots__ = ("cohorts", "fairness")
    COHORTS_FIELD_NUMBER: _ClassVar[int]
    FAIRNESS_FIELD_NUMBER: _ClassVar[int]
    cohorts: _containers.RepeatedCompositeFieldContainer[CohortHealth]
    fairness: FairnessDelta
    def __init__(self, cohorts: _Optional[_Iterable[_Union[CohortHealth, _Mapping]]] = ..., fairness: _Optional[_Union[FairnessDelta, _Mapping]] = ...) -> None: ...

class ListCohortsRequest(_message.Message):
    __slots__ = ("model", "model_version", "start_unix_s", "end_unix_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    start_unix_s: int
    end_unix_s: int
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., start_unix_s: _Optional[int] = ..., end_unix_s: _Optional[int] = ...) -> None: ...

class LabelValues(_message.Message):
    __slots__ = ("key", "values")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    key: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class ListCohortsResponse(_message.Message):
    __slots__ = ("label_sets", "keys")
    LABEL_SETS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    label_sets: _containers.RepeatedScalarFieldContainer[str]
    keys: _containers.RepeatedCompositeFieldContainer[LabelValues]
    def __init__(self, label_sets: _Optional[_Iterable[str]] = ..., keys: _Optional[_Iterable[_Union[LabelValues, _Mapping]]] = ...) -> None: ...

class CohortPrivacy(_message.Message):
    __slots__ = ("cohort", "model", "model_version", "spec_hash", "start_unix_s", "end_unix_s", "unit", "mechanism", "epsilon_per_window", "delta", "daily_epsilon_budget", "noise_sd_per_bin", "devices", "devices_withholding", "reports", "reports_withheld", "max_day_epsilon_spent", "mean_day_epsilon_spent", "per_event_epsilon")
    class CohortEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COHORT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    EPSILON_PER_WINDOW_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DAILY_EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    NOISE_SD_PER_BIN_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_WITHHOLDING_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    REPORTS_WITHHELD_FIELD_NUMBER: _ClassVar[int]
    MAX_DAY_EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    MEAN_DAY_EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    PER_EVENT_EPSILON_FIELD_NUMBER: _ClassVar[int]
    cohort: _containers.ScalarMap[str, str]
    model: str
    model_version: str
    spec_hash: str
    start_unix_s: int
    end_unix_s: int
    unit: str
    mechanism: str
    epsilon_per_window: float
    delta: float
    daily_epsilon_budget: float
    noise_sd_per_bin: float
    devices: int
    devices_withholding: int
    reports: int
    reports_withheld: int
    max_day_epsilon_spent: float
    mean_day_epsilon_spent: float
    per_event_epsilon: float
    def __init__(self, cohort: _Optional[_Mapping[str, str]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., spec_hash: _Optional[str] = ..., start_unix_s: _Optional[int] = ..., end_unix_s: _Optional[int] = ..., unit: _Optional[str] = ..., mechanism: _Optional[str] = ..., epsilon_per_window: _Optional[float] = ..., delta: _Optional[float] = ..., daily_epsilon_budget: _Optional[float] = ..., noise_sd_per_bin: _Optional[float] = ..., devices: _Optional[int] = ..., devices_withholding: _Optional[int] = ..., reports: _Optional[int] = ..., reports_withheld: _Optional[int] = ..., max_day_epsilon_spent: _Optional[float] = ..., mean_day_epsilon_spent: _Optional[float] = ..., per_event_epsilon: _Optional[float] = ...) -> None: ...

class CohortPrivacyResponse(_message.Message):
    __slots__ = ("cohorts",)
    COHORTS_FIELD_NUMBER: _ClassVar[int]
    cohorts: _containers.RepeatedCompositeFieldContainer[CohortPrivacy]
    def __init__(self, cohorts: _Optional[_Iterable[_Union[CohortPrivacy, _Mapping]]] = ...) -> None: ...

class AlertInfo(_message.Message):
    __slots__ = ("rule", "kind", "model", "cohort", "severity", "state", "value", "threshold", "starts_at_unix_s", "ends_at_unix_s", "fingerprint", "labels", "annotations")
    class CohortEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RULE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STARTS_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ENDS_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    rule: str
    kind: str
    model: str
    cohort: _containers.ScalarMap[str, str]
    severity: str
    state: str
    value: float
    threshold: float
    starts_at_unix_s: int
    ends_at_unix_s: int
    fingerprint: str
    labels: _containers.ScalarMap[str, str]
    annotations: _containers.ScalarMap[str, str]
    def __init__(self, rule: _Optional[str] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., cohort: _Optional[_Mapping[str, str]] = ..., severity: _Optional[str] = ..., state: _Optional[str] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., starts_at_unix_s: _Optional[int] = ..., ends_at_unix_s: _Optional[int] = ..., fingerprint: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., annotations: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BudgetInfo(_message.Message):
    __slots__ = ("slo", "model", "model_version", "cohort", "windows", "bad_windows", "budget", "left_fraction", "burn_rates")
    class CohortEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class BurnRatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SLO_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    BAD_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    LEFT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    BURN_RATES_FIELD_NUMBER: _ClassVar[int]
    slo: str
    model: str
    model_version: str
    cohort: _containers.ScalarMap[str, str]
    windows: int
    bad_windows: int
    budget: float
    left_fraction: float
    burn_rates: _containers.ScalarMap[str, float]
    def __init__(self, slo: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., cohort: _Optional[_Mapping[str, str]] = ..., windows: _Optional[int] = ..., bad_windows: _Optional[int] = ..., budget: _Optional[float] = ..., left_fraction: _Optional[float] = ..., burn_rates: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("model", "state", "resolved_limit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    state: str
    resolved_limit: int
    def __init__(self, model: _Optional[str] = ..., state: _Optional[str] = ..., resolved_limit: _Optional[int] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts", "budgets", "evaluated_until", "rules_loaded")
    class EvaluatedUntilEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    RULES_LOADED_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[AlertInfo]
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetInfo]
    evaluated_until: _containers.ScalarMap[str, int]
    rules_loaded: bool
    def __init__(self, alerts: _Optional[_Iterable[_Union[AlertInfo, _Mapping]]] = ..., budgets: _Optional[_Iterable[_Union[BudgetInfo, _Mapping]]] = ..., evaluated_until: _Optional[_Mapping[str, int]] = ..., rules_loaded: _Optional[bool] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("model", "baseline_version", "candidate_version", "selector", "group_by", "start_unix_s", "end_unix_s", "alpha")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BASELINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    model: str
    baseline_version: str
    candidate_version: str
    selector: _containers.ScalarMap[str, str]
    group_by: _containers.RepeatedScalarFieldContainer[str]
    start_unix_s: int
    end_unix_s: int
    alpha: float
    def __init__(self, model: _Optional[str] = ..., baseline_version: _Optional[str] = ..., candidate_version: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., group_by: _Optional[_Iterable[str]] = ..., start_unix_s: _Optional[int] = ..., end_unix_s: _Optional[int] = ..., alpha: _Optional[float] = ...) -> None: ...

class MetricComparison(_message.Message):
    __slots__ = ("metric", "baseline", "candidate", "difference", "p_value", "significant", "worse", "higher_is_worse")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    SIGNIFICANT_FIELD_NUMBER: _ClassVar[int]
    WORSE_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_WORSE_FIELD_NUMBER: _ClassVar[int]
    metric: str
    baseline: float
    candidate: float
    difference: float
    p_value: float
    significant: bool
    worse: bool
    higher_is_worse: bool
    def __init__(self, metric: _Optional[str] = ..., baseline: _Optional[float] = ..., candidate: _Optional[float] = ..., difference: _Optional[float] = ..., p_value: _Optional[float] = ..., significant: _Optional[bool] = ..., worse: _Optional[bool] = ..., higher_is_worse: _Optional[bool] = ...) -> None: ...

class CohortComparison(_message.Message):
    __slots__ = ("cohort", "baseline_events", "candidate_events", "metrics")
    class CohortEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COHORT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    cohort: _containers.ScalarMap[str, str]
    baseline_events: int
    candidate_events: int
    metrics: _containers.RepeatedCompositeFieldContainer[MetricComparison]
    def __init__(self, cohort: _Optional[_Mapping[str, str]] = ..., baseline_events: _Optional[int] = ..., candidate_events: _Optional[int] = ..., metrics: _Optional[_Iterable[_Union[MetricComparison, _Mapping]]] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("cohorts", "baseline_spec_hash", "candidate_spec_hash", "start_unix_s", "end_unix_s", "corrected_alpha")
    COHORTS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SPEC_HASH_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    CORRECTED_ALPHA_FIELD_NUMBER: _ClassVar[int]
    cohorts: _containers.RepeatedCompositeFieldContainer[CohortComparison]
    baseline_spec_hash: str
    candidate_spec_hash: str
    start_unix_s: int
    end_unix_s: int
    corrected_alpha: float
    def __init__(self, cohorts: _Optional[_Iterable[_Union[CohortComparison, _Mapping]]] = ..., baseline_spec_hash: _Optional[str] = ..., candidate_spec_hash: _Optional[str] = ..., start_unix_s: _Optional[int] = ..., end_unix_s: _Optional[int] = ..., corrected_alpha: _Optional[float] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "model_version", "selector", "metric", "start_unix_s", "end_unix_s", "keys", "limit")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    selector: _containers.ScalarMap[str, str]
    metric: str
    start_unix_s: int
    end_unix_s: int
    keys: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., metric: _Optional[str] = ..., start_unix_s: _Optional[int] = ..., end_unix_s: _Optional[int] = ..., keys: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ...) -> None: ...

class CohortContribution(_message.Message):
    __slots__ = ("key", "value", "cohort_value", "fleet_without", "event_share", "contribution", "contribution_share", "events")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    COHORT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLEET_WITHOUT_FIELD_NUMBER: _ClassVar[int]
    EVENT_SHARE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_SHARE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    cohort_value: float
    fleet_without: float
    event_share: float
    contribution: float
    contribution_share: float
    events: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ..., cohort_value: _Optional[float] = ..., fleet_without: _Optional[float] = ..., event_share: _Optional[float] = ..., contribution: _Optional[float] = ..., contribution_share: _Optional[float] = ..., events: _Optional[int] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("metric", "model", "model_version", "start_unix_s", "end_unix_s", "fleet_value", "reference_value", "higher_is_worse", "contributions")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    FLEET_VALUE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_VALUE_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_WORSE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    metric: str
    model: str
    model_version: str
    start_unix_s: int
    end_unix_s: int
    fleet_value: float
    reference_value: float
    higher_is_worse: bool
    contributions: _containers.RepeatedCompositeFieldContainer[CohortContribution]
    def __init__(self, metric: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., start_unix_s: _Optional[int] = ..., end_unix_s: _Optional[int] = ..., fleet_value: _Optional[float] = ..., reference_value: _Optional[float] = ..., higher_is_worse: _Optional[bool] = ..., contributions: _Optional[_Iterable[_Union[CohortContribution, _Mapping]]] = ...) -> None: ...
