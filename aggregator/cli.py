"""The `fleetwatch` command line: parse options, call the library, print, map errors to exit codes.

Exit codes: 0 success, 1 an operation failed (unreachable aggregator, refused request),
2 bad usage or input (argparse's convention), 3 the canary gate failed (`compare`: the candidate
is significantly worse on a metric named in --fail-on).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from agent.errors import ConfigError, FleetwatchError, SpecError
from agent.spec import PrivacySpec, Spec
from agent.wire import spec_to_proto
from aggregator.render import (
    alerts_json,
    alerts_table,
    compare_failures,
    compare_json,
    compare_tables,
    compare_tests,
    explain_json,
    explain_table,
    fairness_json,
    fairness_table,
    health_json,
    health_tables,
    privacy_json,
    privacy_table,
    table,
    use_color,
)
from aggregator.store.base import parse_labels
from protos import fleetwatch_pb2 as pb
from protos import fleetwatch_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from aggregator.forward import ForwardConfig

__all__ = ["main", "parse_duration"]

logger = logging.getLogger(__name__)

EPILOG = """\
workflows:
  try it            fleetwatch demo
  run a server      fleetwatch serve --db fleet.db --listen 127.0.0.1:7070
  secure it         fleetwatch certs init --dir pki; fleetwatch certs issue-device --dir pki \\
                        --device-id ID; fleetwatch serve --tls-dir pki --listen 0.0.0.0:7070
                    (clients: --cacert --cert --key; docs/security.md)
  make a spec       fleetwatch baseline build --data train.csv --model M --model-version V \\
                        --prediction-col score --latency-col latency_ms --out spec.json
  register it       fleetwatch spec push --aggregator 127.0.0.1:7070 spec.json
  instrument        from agent import Monitor  (see README.md)
  ask               fleetwatch health --aggregator 127.0.0.1:7070 --model M --by region
                    fleetwatch cohorts --aggregator 127.0.0.1:7070 --model M
                    fleetwatch privacy --aggregator 127.0.0.1:7070 --model M --by region
  alert             fleetwatch serve --db fleet.db --rules alerts.toml --webhook URL
                    fleetwatch alerts --aggregator 127.0.0.1:7070 --state firing
  gate a rollout    fleetwatch compare --aggregator 127.0.0.1:7070 --model M --baseline 1 \\
                        --candidate 2 --by region --fail-on latency_p95_ms,error_rate
  find the cause    fleetwatch explain --aggregator 127.0.0.1:7070 --model M \\
                        --metric latency_p95_ms   (or psi:FEATURE, error_rate, accuracy, ...)
  watch it          fleetwatch serve --db fleet.db --http 127.0.0.1:8080
                        (dashboard at http://127.0.0.1:8080/, Prometheus at /metrics)
  the server itself fleetwatch stats --aggregator 127.0.0.1:7070
  output            every query takes --json; tables are colored on a terminal only
                    (NO_COLOR=1 turns color off)

Run `fleetwatch COMMAND --help` for the options of each command.
"""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(FleetwatchError):
    """Bad command-line input (exit code 2)."""


def parse_duration(text: str) -> float:
    """"90s", "30m", "1h30m", "2d" -> seconds."""
    text = text.strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise UsageError(f"{text!r} is not a duration (use e.g. 90s, 30m, 1h30m, 2d)")
    return total


def _retain_raw(text: str) -> float | None:
    if text.strip().lower() == "forever":
        return None
    seconds = parse_duration(text)
    if seconds <= 0:
        raise UsageError(f"--retain-raw: {text!r} must be positive (or 'forever')")
    return seconds


def _parse_time(text: str) -> int:
    """Unix seconds, or an ISO-8601 timestamp (UTC when it has no offset)."""
    if re.fullmatch(r"\d+", text):
        return int(text)
    from datetime import UTC, datetime

    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r} is neither Unix seconds nor an ISO-8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def _selector(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    try:
        return parse_labels(text)
    except ValueError as e:
        raise UsageError(f"--cohort: {e} (expected k=v,k2=v2)") from None


TLS_OPTIONS = ("cacert", "cert", "key")


def _channel(ns: argparse.Namespace) -> grpc.Channel:
    """The channel to --aggregator: mutual TLS with --cacert/--cert/--key, plaintext without
    (which an aggregator serves on loopback only)."""
    given = [o for o in TLS_OPTIONS if getattr(ns, o, None)]
    if not given:
        return grpc.insecure_channel(ns.aggregator)
    if len(given) < len(TLS_OPTIONS):
        missing = " ".join(f"--{o}" for o in TLS_OPTIONS if o not in given)
        raise UsageError(f"mutual TLS needs --cacert, --cert and --key together; missing "
                         f"{missing}")
    ca, cert, key = (_read_pem(o, getattr(ns, o)) for o in TLS_OPTIONS)
    return grpc.secure_channel(ns.aggregator, grpc.ssl_channel_credentials(ca, key, cert))


def _read_pem(option: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"--{option}: cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data:  # never echo it: --key is a secret
        raise UsageError(f"--{option}: {path} is not a PEM file")
    return data


def _rpc(what: str, call: Callable[[], object], target: str) -> object:
    try:
        return call()
    except grpc.RpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise FleetwatchError(f"{what}: cannot reach an aggregator at {target} "
                                  f"({e.details()}); is `fleetwatch serve` running there? "
                                  "(one started with --tls-dir needs --cacert, --cert and "
                                  "--key)") from None
        hint = _STATUS_HINTS.get(code, "")
        raise FleetwatchError(f"{what}: {code.name}: {e.details()}{hint}") from None


# What to do about a refusal, when the server's message may not say it.
_STATUS_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: " (give an operator certificate: --cacert, --cert, --key; "
    "make one with `fleetwatch certs issue-operator`)",
    grpc.StatusCode.PERMISSION_DENIED: " (operators need a certificate from `fleetwatch certs "
    "issue-operator`; device certificates may only report)",
    grpc.StatusCode.UNIMPLEMENTED: " (the aggregator is older than this CLI: upgrade it)",
}


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


# -- commands ------------------------------------------------------------------------------------

def _forward_config(ns: argparse.Namespace) -> ForwardConfig | None:
    """`serve --upstream`: a regional aggregator (docs/scaling.md)."""
    from agent.transport import TlsCredentials
    from aggregator.forward import ForwardConfig

    tls_files = (ns.upstream_cacert, ns.upstream_cert, ns.upstream_key)
    if ns.upstream is None:
        if ns.upstream_id or any(tls_files) or ns.upstream_sign_key:
            raise ConfigError("--upstream-*: given without --upstream HOST:PORT")
        return None
    if not ns.upstream_id:
        raise ConfigError("--upstream-id: name this regional aggregator (its "
                          "`fleetwatch certs issue-aggregator` name)")
    if any(tls_files) and not all(tls_files):
        raise ConfigError("--upstream-cacert, --upstream-cert and --upstream-key: give all "
                          "three (mutual TLS to the upstream) or none (plaintext, loopback)")
    tls = None if not all(tls_files) else TlsCredentials(*tls_files)
    return ForwardConfig(upstream=ns.upstream, upstream_id=ns.upstream_id, tls=tls,
                         signing_key=ns.upstream_sign_key, idle_s=ns.forward_idle_s)


def cmd_serve(ns: argparse.Namespace) -> int:
    from aggregator.server import AggregatorConfig, serve
    from aggregator.store import describe_db

    config = AggregatorConfig(
        db=ns.db, listen=ns.listen, workers=ns.workers, ingest_process=ns.ingest_process,
        rules_path=ns.rules,
        webhooks=tuple(ns.webhook or ()), external_url=ns.external_url or "",
        alert_lateness_s=(parse_duration(ns.alert_lateness) if ns.alert_lateness is not None
                          else None),
        alert_idle_flush_s=parse_duration(ns.alert_idle_flush), tls_dir=ns.tls_dir,
        # Report signatures use the same DIR (devices/<ID>.sign.pub), required unless overridden.
        signing_keys_dir=ns.tls_dir, require_signatures=ns.require_signatures,
        http_listen=ns.http, metrics_groupings=_metrics_groupings(ns.metrics_by),
        metrics_range_s=parse_duration(ns.metrics_range),
        metrics_max_cohorts=ns.metrics_max_cohorts, forward=_forward_config(ns),
        retain_raw_s=_retain_raw(ns.retain_raw))
    stop = threading.Event()
    with serve(config) as running:  # a bad rule file raises here: exit code 2
        previous = {sig: signal.signal(sig, lambda *_: stop.set())
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        host = ns.listen.rsplit(":", 1)[0]
        security = (f"mutual TLS from {ns.tls_dir}" if ns.tls_dir
                    else "WITHOUT TLS, loopback only")
        print(f"fleetwatch aggregator listening on {host}:{running.port} ({security}; db "
              f"{describe_db(ns.db)}); Ctrl-C stops it", flush=True)
        if running.alerts is not None:
            r = running.alerts.rules
            sinks = "the log" + (f" and {_plural(len(config.webhooks), 'webhook')}"
                                 if config.webhooks else "")
            print(f"alerting: {_plural(len(r.rules), 'threshold rule')} and "
                  f"{_plural(len(r.slos), 'SLO')} from {ns.rules}; notifying {sinks}",
                  flush=True)
        if running.http_port is not None:
            scheme = "https" if ns.tls_dir else "http"
            base = f"{scheme}://{ns.http.rsplit(':', 1)[0]}:{running.http_port}"
            print(f"dashboard at {base}/, Prometheus metrics at {base}/metrics"
                  + (" (operator certificates only)" if ns.tls_dir else ""), flush=True)
        try:
            stop.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print("stopping", flush=True)
    return 0


def _metrics_groupings(values: list[str] | None) -> tuple[tuple[str, ...], ...]:
    from aggregator.metrics import parse_groupings

    for v in values or ():
        if "=" in v:
            raise UsageError(f"--metrics-by: {v!r} names label keys (e.g. region,hw), not "
                             "values")
    return parse_groupings(values or ())


def cmd_alerts(ns: argparse.Namespace) -> int:
    if ns.resolved < 0:
        raise UsageError(f"--resolved: must be >= 0, got {ns.resolved}")
    request = pb.ListAlertsRequest(model=ns.model or "", state=ns.state or "",
                                   resolved_limit=ns.resolved)
    with _channel(ns) as channel:
        stub = pb_grpc.QueryStub(channel)
        resp = _rpc("alerts", lambda: stub.ListAlerts(request, timeout=ns.timeout),
                    ns.aggregator)
    if ns.json:
        print(json.dumps(alerts_json(resp), indent=2))  # type: ignore[arg-type]
    else:
        print(alerts_table(resp, color=use_color()))  # type: ignore[arg-type]
    return 0


def _health_request(ns: argparse.Namespace) -> pb.CohortHealthRequest:
    end = _parse_time(ns.until) if ns.until else int(time.time())
    start = end - int(parse_duration(ns.since))
    group_by = [k.strip() for value in (ns.by or []) for k in value.split(",") if k.strip()]
    return pb.CohortHealthRequest(model=ns.model, model_version=ns.model_version or "",
                                  selector=_selector(ns.cohort), group_by=group_by,
                                  start_unix_s=start, end_unix_s=end,
                                  # health only; the privacy command shares this request
                                  fairness_key=(getattr(ns, "fairness_key", None) or "").strip())


def _cohort_query(ns: argparse.Namespace, what: str, method: str,
                  to_json: Callable[[list], object], to_table: Callable[..., str]) -> int:
    """Ask a per-cohort Query method and print its answer as JSON or a table."""
    request = _health_request(ns)
    with _channel(ns) as channel:
        call = getattr(pb_grpc.QueryStub(channel), method)
        resp = _rpc(what, lambda: call(request, timeout=ns.timeout), ns.aggregator)
    cohorts = list(resp.cohorts)  # type: ignore[attr-defined]
    if ns.json:
        print(json.dumps(to_json(cohorts), indent=2))
    else:
        print(to_table(cohorts, color=use_color()))
    return 0


def cmd_health(ns: argparse.Namespace) -> int:
    request = _health_request(ns)
    if not request.fairness_key:
        return _cohort_query(ns, "health", "CohortHealth", health_json, health_tables)
    with _channel(ns) as channel:
        stub = pb_grpc.QueryStub(channel)
        resp = _rpc("health", lambda: stub.CohortHealth(request, timeout=ns.timeout),
                    ns.aggregator)
    cohorts = list(resp.cohorts)  # type: ignore[attr-defined]
    fairness = resp.fairness  # type: ignore[attr-defined]
    if ns.json:  # an object, not the bare list: docs/health-json.md
        print(json.dumps({"cohorts": health_json(cohorts), "fairness": fairness_json(fairness)},
                         indent=2))
    else:
        color = use_color()
        print(health_tables(cohorts, color=color) + "\n\n" + fairness_table(fairness, color))
    return 0


def cmd_privacy(ns: argparse.Namespace) -> int:
    return _cohort_query(ns, "privacy", "CohortPrivacy", privacy_json, privacy_table)


def cmd_cohorts(ns: argparse.Namespace) -> int:
    with _channel(ns) as channel:
        stub = pb_grpc.QueryStub(channel)
        resp = _rpc("cohorts", lambda: stub.ListCohorts(
            pb.ListCohortsRequest(model=ns.model, model_version=ns.model_version or ""),
            timeout=ns.timeout), ns.aggregator)
    if ns.json:
        print(json.dumps({"label_sets": list(resp.label_sets),  # type: ignore[attr-defined]
                          "keys": {lv.key: list(lv.values)
                                   for lv in resp.keys}}, indent=2))  # type: ignore[attr-defined]
        return 0
    rows = [[lv.key, str(len(lv.values)), ", ".join(lv.values[:12])
             + (" ..." if len(lv.values) > 12 else "")]
            for lv in resp.keys]  # type: ignore[attr-defined]
    print(table(["label", "values", "seen"], rows, use_color()))
    print(f"\n{len(resp.label_sets)} distinct label sets")  # type: ignore[attr-defined]
    return 0


def cmd_stats(ns: argparse.Namespace) -> int:
    with _channel(ns) as channel:
        stub = pb_grpc.AdminStub(channel)
        resp = _rpc("stats", lambda: stub.ServerStats(pb.ServerStatsRequest(),
                                                      timeout=ns.timeout), ns.aggregator)
    assert isinstance(resp, pb.ServerStatsResponse)
    rejected = dict(sorted(resp.rejected.items()))
    forwarding = dict(sorted(resp.forwarding.items()))
    if ns.json:
        out = {"accepted": resp.accepted, "duplicates": resp.duplicates,
               "rejected": rejected, "started_unix_s": resp.started_unix_s}
        if forwarding:
            out["forwarding"] = forwarding
        print(json.dumps(out, indent=2))
        return 0
    up_s = max(0, int(time.time()) - resp.started_unix_s)
    print(f"up {up_s} s: {_plural(resp.accepted, 'report')} accepted, "
          f"{_plural(resp.duplicates, 'duplicate')} acknowledged, "
          f"{sum(rejected.values())} refused")
    if rejected:
        print()
        print(table(["refused because", "count"],
                    [[reason, str(n)] for reason, n in rejected.items()], use_color()))
    if forwarding:
        print()
        print(table(["forwarding upstream", "count"],
                    [[k, str(n)] for k, n in forwarding.items()], use_color()))
    return 0


EXIT_GATE_FAILED = 3
DEFAULT_FAIL_ON = "latency_p95_ms,error_rate,accuracy"
# What --fail-on may name, besides psi:FEATURE and psi:* (aggregator/compare.py).
FAIL_ON_METRICS = ("error_rate", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
                   "accuracy", "prediction_psi")


def _fail_on(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    valid = ", ".join(FAIL_ON_METRICS) + ", psi:FEATURE, psi:*"
    if not names:
        raise UsageError(f"--fail-on: name at least one metric ({valid})")
    for n in names:
        if n not in FAIL_ON_METRICS and not (n.startswith("psi:") and len(n) > 4):
            raise UsageError(f"--fail-on: unknown metric {n!r} (valid: {valid})")
    return names


def cmd_compare(ns: argparse.Namespace) -> int:
    fail_on = _fail_on(ns.fail_on)
    if not 0 < ns.alpha < 1:
        raise UsageError(f"--alpha must be in (0, 1), got {ns.alpha:g}")
    if ns.baseline == ns.candidate:
        raise UsageError(f"--candidate is the --baseline version {ns.baseline!r} itself")
    end = _parse_time(ns.until) if ns.until else int(time.time())
    start = end - int(parse_duration(ns.since))
    group_by = [k.strip() for value in (ns.by or []) for k in value.split(",") if k.strip()]
    request = pb.CompareRequest(model=ns.model, baseline_version=ns.baseline,
                                candidate_version=ns.candidate, selector=_selector(ns.cohort),
                                group_by=group_by, start_unix_s=start, end_unix_s=end,
                                alpha=ns.alpha)
    with _channel(ns) as channel:
        stub = pb_grpc.QueryStub(channel)
        resp: pb.CompareResponse = _rpc(  # type: ignore[assignment]
            "compare", lambda: stub.CompareVersions(request, timeout=ns.timeout), ns.aggregator)
    # psi:FEATURE can only be checked against the specs, i.e. against what came back.
    seen = {m.metric for c in resp.cohorts for m in c.metrics}
    unknown = [n for n in fail_on if n.startswith("psi:") and n != "psi:*" and n not in seen]
    if resp.cohorts and unknown:
        features = sorted(m[4:] for m in seen if m.startswith("psi:"))
        raise UsageError(f"--fail-on: no feature {unknown[0][4:]!r} in either version's spec "
                         f"(features: {', '.join(features) or 'none'})")
    options = {"baseline_version": ns.baseline, "candidate_version": ns.candidate,
               "alpha": ns.alpha, "fail_on": fail_on}
    if ns.json:
        print(json.dumps(compare_json(resp, model=ns.model, **options), indent=2))
    else:
        print(compare_tables(resp, color=use_color(), **options))
    if compare_failures(resp, fail_on):
        return EXIT_GATE_FAILED
    if not compare_tests(resp):
        print("fleetwatch compare: error: no cohort has data of both versions in the range: "
              "nothing was compared", file=sys.stderr)
        return 1
    # A gate must not pass on no evidence: a metric it names that no cohort could compare
    # (accuracy without labels on both sides, say) is an error when the operator named it,
    # a warning when it only came with the default list.
    tested = {m.metric for c in resp.cohorts for m in c.metrics if math.isfinite(m.p_value)
              or (m.metric.startswith("psi:") and math.isfinite(m.baseline + m.candidate))}
    untested = [n for n in fail_on if n != "psi:*" and n not in tested]
    if untested:
        named = ns.fail_on != DEFAULT_FAIL_ON
        print(f"fleetwatch compare: {'error' if named else 'warning'}: --fail-on "
              f"{', '.join(untested)}: not compared in any cohort (no data of both versions "
              "for it, e.g. no labels)", file=sys.stderr)
        if named:
            return 1
    return 0


def cmd_explain(ns: argparse.Namespace) -> int:
    metric = ns.metric.strip()
    if not metric:
        raise UsageError("--metric: name the regression to explain, e.g. latency_p95_ms, "
                         "error_rate, accuracy, psi:FEATURE or psi:prediction")
    if ns.limit < 0:
        raise UsageError(f"--limit: must be >= 0, got {ns.limit}")
    end = _parse_time(ns.until) if ns.until else int(time.time())
    start = end - int(parse_duration(ns.since))
    keys = [k.strip() for value in (ns.by or []) for k in value.split(",") if k.strip()]
    request = pb.ExplainRequest(model=ns.model, model_version=ns.model_version or "",
                                selector=_selector(ns.cohort), metric=metric,
                                start_unix_s=start, end_unix_s=end, keys=keys, limit=ns.limit)
    with _channel(ns) as channel:
        stub = pb_grpc.QueryStub(channel)
        resp: pb.ExplainResponse = _rpc(  # type: ignore[assignment]
            "explain", lambda: stub.Explain(request, timeout=ns.timeout), ns.aggregator)
    if ns.json:
        print(json.dumps(explain_json(resp), indent=2))
    else:
        print(explain_table(resp, color=use_color()))
    return 0


def cmd_baseline_build(ns: argparse.Namespace) -> int:
    from aggregator.baseline import BaselineOptions, build_spec_from_csv

    privacy = PrivacySpec(unit=ns.unit, mechanism=ns.mechanism, epsilon_per_window=ns.epsilon,
                          delta=ns.delta, daily_epsilon_budget=ns.daily_budget,
                          max_events_per_window=ns.max_events_per_window)
    options = BaselineOptions(bins=ns.bins, top_k=ns.top_k,
                              window_length_s=int(parse_duration(ns.window)), privacy=privacy)
    categorical = [c.strip() for c in (ns.categorical or "").split(",") if c.strip()]

    def progress(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    spec = build_spec_from_csv(ns.data, model=ns.model, model_version=ns.model_version,
                               prediction_col=ns.prediction_col, label_col=ns.label_col,
                               latency_col=ns.latency_col, categorical=categorical,
                               options=options, progress=progress, task=ns.task)
    spec.save(ns.out)
    print(f"wrote {ns.out}: {len(spec.features)} features from {spec.reference_rows} rows, "
          f"spec hash {spec.hash[:16]}")
    return 0


def cmd_spec_push(ns: argparse.Namespace) -> int:
    spec = Spec.load(ns.spec)
    with _channel(ns) as channel:
        stub = pb_grpc.AdminStub(channel)
        resp = _rpc("spec push", lambda: stub.PushSpec(spec_to_proto(spec), timeout=ns.timeout),
                    ns.aggregator)
    if ns.json:
        print(json.dumps({"hash": spec.hash, "model": spec.model,
                          "model_version": spec.model_version,
                          "created": resp.created}, indent=2))  # type: ignore[attr-defined]
        return 0
    state = "registered" if resp.created else "was already registered"  # type: ignore[attr-defined]
    print(f"spec {spec.hash[:16]} for {spec.model}/{spec.model_version} {state}")
    return 0


def _feature_json(f: object) -> dict[str, object]:
    return {"name": f.name, "type": f.type,  # type: ignore[attr-defined]
            "edges": list(f.edges), "vocabulary": list(f.vocabulary)}  # type: ignore[attr-defined]


def cmd_spec_show(ns: argparse.Namespace) -> int:
    spec = Spec.load(ns.spec)
    if ns.json:
        pv = spec.privacy
        print(json.dumps({
            "model": spec.model, "model_version": spec.model_version, "hash": spec.hash,
            "window_length_s": spec.window_length_s, "reference_rows": spec.reference_rows,
            "privacy": {"mechanism": pv.mechanism, "unit": pv.unit, "noisy": pv.noisy,
                        "epsilon_per_window": pv.epsilon_per_window, "delta": pv.delta,
                        "daily_epsilon_budget": pv.daily_epsilon_budget,
                        "max_events_per_window": pv.max_events_per_window},
            "features": [_feature_json(f) for f in spec.features],
            "prediction": _feature_json(spec.prediction) if spec.prediction else None,
            "labels": spec.labels.task if spec.labels is not None else None}, indent=2))
        return 0
    print(f"model {spec.model} version {spec.model_version}, window {spec.window_length_s} s, "
          f"{spec.reference_rows} reference rows, hash {spec.hash}")
    pv = spec.privacy
    if pv.noisy:
        extra = (f", delta {pv.delta:g}" if pv.delta else "") + (
            f", daily budget {pv.daily_epsilon_budget:g}, at most {pv.max_events_per_window} "
            "events per window" if pv.unit == "device-day" else "")
        print(f"privacy: {pv.mechanism}, unit {pv.unit}, epsilon {pv.epsilon_per_window:g} per "
              f"window{extra}")
    else:
        print("privacy: none (histograms are sent exactly: NOT private)")
    rows = [[f.name, f.type, str(len(f.edges) - 1 if f.edges else len(f.vocabulary)),
             (f"{f.edges[0]:.4g} .. {f.edges[-1]:.4g}" if f.edges
              else ", ".join(f.vocabulary[:5]) + (" ..." if len(f.vocabulary) > 5 else ""))]
            for f in spec.features + ((spec.prediction,) if spec.prediction else ())]
    print(table(["feature", "type", "bins/values", "range / vocabulary"], rows, use_color()))
    return 0


def _print_issued(issued: object, what: str, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps({"what": what, "paths": [str(p) for p in issued.paths],  # type: ignore[attr-defined]
                          "serial": issued.serial_hex,  # type: ignore[attr-defined]
                          "not_after": issued.not_after.isoformat()},  # type: ignore[attr-defined]
                         indent=2))
        return
    for path in issued.paths:  # type: ignore[attr-defined]
        print(f"wrote {path}")
    print(f"{what}: serial {issued.serial_hex}, valid until "  # type: ignore[attr-defined]
          f"{issued.not_after:%Y-%m-%d %H:%M} UTC")  # type: ignore[attr-defined]


def cmd_certs_init(ns: argparse.Namespace) -> int:
    from aggregator.certs import init_ca

    issued = init_ca(ns.dir, tuple(ns.hostname or ()), days=ns.days,
                     server_days=ns.server_days, force=ns.force)
    _print_issued(issued, "CA", ns.json)
    if not ns.json:
        print("keep ca.key offline; serve with: fleetwatch serve --tls-dir " + ns.dir)
    return 0


def cmd_certs_issue_server(ns: argparse.Namespace) -> int:
    from aggregator.certs import issue_server

    issued = issue_server(ns.dir, tuple(ns.hostname or ()), days=ns.days, force=ns.force)
    _print_issued(issued, "server certificate (restart `fleetwatch serve` to use it)", ns.json)
    return 0


def cmd_certs_issue_device(ns: argparse.Namespace) -> int:
    from aggregator.certs import issue_device, spiffe_id

    issued = issue_device(ns.dir, ns.device_id, days=ns.days, force=ns.force)
    _print_issued(issued, spiffe_id("device", ns.device_id), ns.json)
    return 0


def cmd_certs_issue_aggregator(ns: argparse.Namespace) -> int:
    from aggregator.certs import AGGREGATOR, issue_aggregator, spiffe_id

    issued = issue_aggregator(ns.dir, ns.name, days=ns.days, force=ns.force)
    _print_issued(issued, spiffe_id(AGGREGATOR, ns.name), ns.json)
    return 0


def cmd_certs_issue_operator(ns: argparse.Namespace) -> int:
    from aggregator.certs import issue_operator, spiffe_id

    issued = issue_operator(ns.dir, ns.name, days=ns.days, force=ns.force)
    _print_issued(issued, spiffe_id("operator", ns.name), ns.json)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from aggregator.demo import DEMO_RULES, DemoOptions, demo_report, run_demo

    if ns.print_rules:
        print(DEMO_RULES, end="")
        return 0

    def progress(msg: str) -> None:
        print(f"[demo] {msg}", file=sys.stderr, flush=True)

    options = DemoOptions(devices=ns.devices, minutes=ns.minutes, seed=ns.seed,
                          workdir=ns.workdir, keep=ns.workdir is not None)
    result = run_demo(options, progress)
    if ns.json:
        print(json.dumps({"cohorts": health_json(result.cohorts),
                          "alerts": alerts_json(result.alerts)}, indent=2))
        return 0
    print(demo_report(result, color=use_color()))
    return 0


# -- parser --------------------------------------------------------------------------------------

def _client_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument("--aggregator", default="127.0.0.1:7070", metavar="HOST:PORT",
                   help="the aggregator's gRPC address (default: %(default)s)")
    if model:
        p.add_argument("--model", required=True, help="model name")
        p.add_argument("--model-version", default="",
                       help="model version (default: the most recently registered spec)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="RPC deadline in seconds (default: %(default)s)")
    g = p.add_argument_group("mutual TLS (an aggregator started with --tls-dir)")
    g.add_argument("--cacert", metavar="FILE", help="the fleet CA certificate (ca.pem)")
    g.add_argument("--cert", metavar="FILE",
                   help="your operator certificate (operators/NAME.pem)")
    g.add_argument("--key", metavar="FILE", help="its private key (operators/NAME.key)")


def _cohort_args(p: argparse.ArgumentParser, since: str, json_help: str,
                 by_help: str = "group by these label keys (repeat or comma-separate)") -> None:
    """Selector, grouping, time range and --json: the options of every per-cohort query."""
    p.add_argument("--cohort", metavar="K=V,...", help="label selector, e.g. region=eu,hw=jetson")
    p.add_argument("--by", action="append", metavar="KEY", help=by_help)
    p.add_argument("--since", default=since, metavar="DUR",
                   help="look back this long from --until (default: %(default)s)")
    p.add_argument("--until", default=None, metavar="TIME",
                   help="end of the range: Unix seconds or ISO-8601 (default: now)")
    p.add_argument("--json", action="store_true", help=json_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetwatch",
        description="Model performance monitoring for fleets of edge devices.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run a simulated fleet end to end and show cohort health",
                       description="Start an aggregator on a free loopback port with a temporary "
                       "SQLite file, build a spec from generated reference data, simulate a "
                       "fleet with injected drift and a latency incident, print cohort health.")
    p.add_argument("--devices", type=int, default=200, help="simulated devices (default: 200)")
    p.add_argument("--minutes", type=int, default=30, help="simulated minutes (default: 30)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    p.add_argument("--workdir", default=None,
                   help="keep the database and spools in this directory (default: a temporary "
                   "directory, deleted afterwards)")
    p.add_argument("--json", action="store_true",
                   help='print {"cohorts": [cohort health], "alerts": {alerts}} as JSON')
    p.add_argument("--print-rules", action="store_true",
                   help="print the alert rules the demo's aggregator runs, and exit")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="run the aggregator (gRPC ingest and query)",
                       description="Run the aggregator on an embedded SQLite database, or on "
                       "PostgreSQL (a postgresql:// DSN) that several replicas can share.")
    p.add_argument("--db", default="fleetwatch.db",
                   help="SQLite file or postgresql:// DSN (default: %(default)s)")
    p.add_argument("--listen", default="127.0.0.1:7070", metavar="HOST:PORT",
                   help="gRPC listen address; loopback only without --tls-dir "
                   "(default: %(default)s; port 0 picks a free one)")
    p.add_argument("--tls-dir", metavar="DIR",
                   help="serve mutual TLS with DIR/ca.pem, server.pem, server.key (from "
                   "`fleetwatch certs init`); clients need a certificate of that CA, and "
                   "DIR/revoked.txt is the deny-list (docs/security.md)")
    p.add_argument("--require-signatures", action=argparse.BooleanOptionalAction, default=None,
                   help="refuse reports not signed with the device's DIR/devices/<ID>.sign.pub "
                   "key (default: on with --tls-dir; --no-require-signatures still verifies "
                   "signed reports but takes unsigned ones)")
    p.add_argument("--ingest-process", action="store_true",
                   help="check and store reports in a child process with its own GIL: on two "
                        "or more cores, more reports per second (docs/performance.md)")
    p.add_argument("--workers", type=int, default=8,
                   help="threads for queries and admin calls; reports are taken on the "
                        "server's event loop and stored by one writer thread (default: 8)")
    p.add_argument("--retain-raw", metavar="DUR", default="7d",
                   help="keep each report's raw envelope this long after its window, then "
                   "drop the bytes (its row, rollups and counts stay, and it still "
                   "deduplicates); 'forever' keeps them (default: %(default)s)")
    g = p.add_argument_group("alerting (docs/alerts.md)")
    g.add_argument("--rules", metavar="FILE",
                   help="alert rules (TOML), validated at start; without it no alerts")
    g.add_argument("--webhook", action="append", metavar="URL",
                   help="POST Alertmanager-compatible notifications here (repeatable)")
    g.add_argument("--external-url", metavar="URL",
                   help="this aggregator's URL for operators: externalURL and generatorURL "
                   "in notifications")
    g.add_argument("--alert-lateness", metavar="DUR", default=None,
                   help="how far behind the newest window start a window closes "
                   "(default: one window length)")
    g.add_argument("--alert-idle-flush", metavar="DUR", default="30s",
                   help="after this long (wall clock) without reports, evaluate the last "
                   "windows too (default: %(default)s)")
    g = p.add_argument_group("HTTP: Prometheus /metrics, JSON API, dashboard (docs/metrics.md)")
    g.add_argument("--http", metavar="HOST:PORT", default=None,
                   help="serve HTTP here (port 0 picks one); loopback only without "
                   "--tls-dir, HTTPS for operator certificates with it")
    g.add_argument("--metrics-by", action="append", metavar="KEY,...",
                   help="a grouping of the per-cohort metrics, e.g. region,hw (repeatable; "
                   "'fleet' is the whole fleet; default: the fleet and each label key alone)")
    g.add_argument("--metrics-range", metavar="DUR", default="5m",
                   help="trailing range the per-cohort metrics cover (default: %(default)s)")
    g.add_argument("--metrics-max-cohorts", type=int, default=100, metavar="N",
                   help="at most N cohorts per scrape, the worst kept; the rest are counted "
                   "in fleetwatch_metrics_cohorts_dropped (default: %(default)s)")
    g = p.add_argument_group("regional tier: forward merged windows upstream (docs/scaling.md)")
    g.add_argument("--upstream", metavar="HOST:PORT", default=None,
                   help="also forward each closed window, merged, to this central aggregator")
    g.add_argument("--upstream-id", metavar="NAME", default=None,
                   help="this regional aggregator's name there (its certificate's, from "
                   "`fleetwatch certs issue-aggregator --name NAME`); the same on every "
                   "replica of a region")
    g.add_argument("--upstream-cacert", metavar="FILE", help="the upstream's CA (ca.pem)")
    g.add_argument("--upstream-cert", metavar="FILE",
                   help="this regional's client certificate (aggregators/NAME.pem)")
    g.add_argument("--upstream-key", metavar="FILE",
                   help="its private key (aggregators/NAME.key)")
    g.add_argument("--upstream-sign-key", metavar="FILE",
                   help="sign forwarded reports with this key (aggregators/NAME.sign.key)")
    g.add_argument("--forward-idle-s", type=float, default=10.0, metavar="S",
                   help="forward a window once no report came for it for S seconds, even if "
                   "the event-time watermark has not passed it (default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("alerts", help="alerts and SLO error budgets of a running aggregator",
                       description="Pending, firing and recently resolved alerts, the error "
                       "budget left per SLO and cohort, and how far rules were evaluated.")
    _client_args(p, model=False)
    p.add_argument("--model", default="", help="only this model (default: every model)")
    p.add_argument("--state", choices=["pending", "firing", "resolved"],
                   help="only alerts in this state")
    p.add_argument("--resolved", type=int, default=20, metavar="N",
                   help="resolved alerts to show at most, newest first (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON object (schema: docs/alerts.md)")
    p.set_defaults(func=cmd_alerts)

    p = sub.add_parser("health", help="cohort health: volume, errors, latency, drift",
                       description="Per cohort: devices and availability, events, error "
                       "rate, latency p50/p95/p99, per feature PSI, Jensen-Shannon distance, KS "
                       "and Wasserstein against the spec's reference, and, when devices send "
                       "ground truth, accuracy/F1/calibration (or MAE/RMSE) and label latency.")
    _client_args(p)
    _cohort_args(p, since="1h", json_help="print a JSON list of cohort objects (schema: "
                 "docs/health-json.md); with --fairness-key, an object {cohorts, fairness}")
    p.add_argument("--fairness-key", default="", metavar="KEY",
                   help="also show the largest gaps in accuracy and positive rate between the "
                   "values of this label key, e.g. region")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("privacy", help="privacy budget per cohort: spend, withholding devices",
                       description="Per cohort: the noise mechanism and unit, devices whose "
                       "budget is spent (withholding private histograms), and the spend so far.")
    _client_args(p)
    _cohort_args(p, since="24h", json_help="print a JSON list of cohort objects (fields: "
                 "docs/privacy.md)")
    p.set_defaults(func=cmd_privacy)

    p = sub.add_parser("cohorts", help="list the label keys and values seen for a model")
    _client_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cohorts)

    p = sub.add_parser("stats", help="the aggregator's own counters: accepted, duplicate and "
                       "refused reports by reason",
                       description="Reports accepted and acknowledged as duplicates since the "
                       "server started, and refused reports and calls by reason (oversize, "
                       "invalid, bad_sketch, too_many_label_values, ...).")
    _client_args(p, model=False)
    p.add_argument("--json", action="store_true",
                   help="print {accepted, duplicates, rejected: {reason: count}, "
                   "started_unix_s}")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "compare", help="the canary gate: two model versions side by side, per cohort",
        description="Per cohort (the --by values present for either version): events, "
        "devices, error rate, latency p50/p95/p99, accuracy (with labels) and each feature's "
        "drift for the baseline and the candidate version, the difference, its p-value and "
        "whether it is significant; the family-wise error over all tests is held at --alpha "
        "(Bonferroni). See docs/compare.md. Exit codes: 0 pass; 1 the query failed, or no "
        "cohort has data of both versions; 2 bad usage; 3 the candidate is significantly worse "
        "on a metric named in --fail-on (stop the rollout).")
    _client_args(p, model=False)
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--baseline", required=True, metavar="V", help="the version running now")
    p.add_argument("--candidate", required=True, metavar="V", help="the version under test")
    _cohort_args(p, "1h", "print a JSON object (schema: docs/compare.md)")
    p.add_argument("--alpha", type=float, default=0.01, metavar="A",
                   help="family-wise false-alarm level over all comparisons (default: "
                   "%(default)s)")
    p.add_argument("--fail-on", default=DEFAULT_FAIL_ON, metavar="M,...",
                   help="fail (exit 3) when the candidate is significantly worse on one of "
                   f"these: {', '.join(FAIL_ON_METRICS)}, psi:FEATURE, psi:* "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "explain", help="root cause: which cohorts a fleet-level regression comes from",
        description="For a fleet-level regression of --metric, rank the cohorts along each "
        "label key by their contribution: the fleet's value minus its value without the "
        "cohort (leave-one-out over merged summaries), positive when removing the cohort "
        "makes the fleet better; with each cohort's own value, its share of the events and "
        "its share of the fleet's regression against the reference (the spec's reference "
        "latency; 0 for error rates and PSI). Ends with a one-line verdict.")
    _client_args(p)
    p.add_argument("--metric", required=True, metavar="METRIC",
                   help="what regressed: latency_p50_ms, latency_p95_ms, latency_p99_ms, "
                   "error_rate, availability, accuracy, precision, recall, f1, brier, ece, "
                   "mae, rmse, label_latency_p50_s, label_latency_p95_s, psi:FEATURE, "
                   "psi:prediction")
    _cohort_args(p, "1h", "print a JSON object {metric, fleet_value, reference_value, "
                 "verdict, contributions: [...]}",
                 by_help="rank the cohorts along these label keys (repeat or comma-separate; "
                 "default: every key the selection's devices have)")
    p.add_argument("--limit", type=int, default=10, metavar="N",
                   help="at most N cohorts per key (default: %(default)s)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("baseline", help="build a spec from reference data")
    bsub = p.add_subparsers(dest="baseline_command", metavar="ACTION", required=True)
    b = bsub.add_parser("build", help="sketch a CSV into bins, vocabularies and references",
                        description="Read reference (training) data, sketch each column with "
                        "datasketches (KLL for numbers, frequent items for strings), and write "
                        "a spec with equal-mass bins, vocabularies and reference histograms.")
    b.add_argument("--data", required=True, help="CSV file with a header row")
    b.add_argument("--model", required=True)
    b.add_argument("--model-version", required=True)
    b.add_argument("--prediction-col", help="column holding the model's output")
    b.add_argument("--label-col", help="column holding ground truth (not a feature); with "
                   "--prediction-col the spec summarizes labels joined by Monitor.label")
    b.add_argument("--task", choices=["binary", "multiclass", "regression"],
                   help="what the labels measure (default: inferred: a score in [0, 1] with "
                   "two label values is binary, a categorical prediction multiclass, a "
                   "numeric prediction of a many-valued numeric label regression)")
    b.add_argument("--latency-col", help="column holding latencies in ms (reference latency)")
    b.add_argument("--categorical", metavar="COL,...",
                   help="treat these columns as categorical even if they look numeric")
    b.add_argument("--bins", type=int, default=10, help="equal-mass bins (default: 10)")
    b.add_argument("--top-k", type=int, default=20, help="vocabulary size (default: 20)")
    b.add_argument("--window", default="60s", help="window length (default: 60s)")
    g = b.add_argument_group("privacy (docs/privacy.md)")
    g.add_argument("--epsilon", type=float, default=1.0,
                   help="privacy loss per window, all private histograms together "
                   "(default: %(default)s)")
    g.add_argument("--unit", choices=["event", "device-day"], default="event",
                   help="what is protected (default: %(default)s)")
    g.add_argument("--mechanism", choices=["discrete_laplace", "discrete_gaussian", "none"],
                   default="discrete_laplace",
                   help="noise; 'none' is NOT private (default: %(default)s)")
    g.add_argument("--delta", type=float, default=0.0, help="delta, discrete Gaussian only")
    g.add_argument("--daily-budget", type=float, default=0.0, metavar="EPS",
                   help="device-day: epsilon one device may spend per UTC day")
    g.add_argument("--max-events-per-window", type=int, default=0, metavar="N",
                   help="device-day: events per window that reach the private histograms")
    b.add_argument("--out", required=True, help="spec JSON to write")
    b.set_defaults(func=cmd_baseline_build)

    p = sub.add_parser("spec", help="register or inspect specs")
    ssub = p.add_subparsers(dest="spec_command", metavar="ACTION", required=True)
    s = ssub.add_parser("push", help="register a spec with an aggregator")
    _client_args(s, model=False)
    s.add_argument("spec", help="spec JSON file")
    s.add_argument("--json", action="store_true",
                   help="print {hash, model, model_version, created}")
    s.set_defaults(func=cmd_spec_push)
    s = ssub.add_parser("show", help="summarize a spec file")
    s.add_argument("spec", help="spec JSON file")
    s.add_argument("--json", action="store_true",
                   help="print {model, model_version, hash, window_length_s, privacy, "
                   "features, prediction, labels}")
    s.set_defaults(func=cmd_spec_show)

    p = sub.add_parser("certs", help="make the CA and mutual-TLS certificates",
                       description="A CA, the aggregator's server certificate, and client "
                       "certificates whose URI SAN names a device or an operator (the roles the "
                       "server enforces). Keys are written 0600; nothing is overwritten without "
                       "--force. See docs/security.md.")
    csub = p.add_subparsers(dest="certs_command", metavar="ACTION", required=True)

    def certs_parser(name: str, help: str, days: int) -> argparse.ArgumentParser:
        c = csub.add_parser(name, help=help, description=help)
        c.add_argument("--dir", required=True, help="the certificate directory")
        c.add_argument("--days", type=int, default=days,
                       help="validity in days (default: %(default)s)")
        c.add_argument("--force", action="store_true", help="replace existing files")
        c.add_argument("--json", action="store_true",
                       help="print {what, paths, serial, not_after}")
        return c

    c = certs_parser("init", "make ca.pem/ca.key and server.pem/server.key", 3650)
    c.add_argument("--hostname", action="append", metavar="H",
                   help="a name or address devices reach the aggregator by (repeatable; "
                   "localhost, 127.0.0.1 and ::1 are always included)")
    c.add_argument("--server-days", type=int, default=90,
                   help="validity of the server certificate (default: %(default)s)")
    c.set_defaults(func=cmd_certs_init)
    c = certs_parser("issue-server", "reissue server.pem/server.key from the CA (rotation)", 90)
    c.add_argument("--hostname", action="append", metavar="H",
                   help="a name or address devices reach the aggregator by (repeatable)")
    c.set_defaults(func=cmd_certs_issue_server)
    c = certs_parser("issue-device", "a device's client certificate and report-signing key",
                     90)
    c.add_argument("--device-id", required=True, help="the device id (1-128 of A-Za-z0-9._-:)")
    c.set_defaults(func=cmd_certs_issue_device)
    c = certs_parser("issue-operator", "an operator's client certificate", 90)
    c.add_argument("--name", required=True, help="the operator's name (1-128 of A-Za-z0-9._-:)")
    c.set_defaults(func=cmd_certs_issue_operator)
    c = certs_parser("issue-aggregator", "a regional aggregator's client certificate and "
                     "forwarding signing key (`serve --upstream`)", 90)
    c.add_argument("--name", required=True,
                   help="the regional aggregator's name (1-128 of A-Za-z0-9._-:)")
    c.set_defaults(func=cmd_certs_issue_aggregator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(ns.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        return ns.func(ns)
    except (UsageError, ConfigError, SpecError, FileNotFoundError, IsADirectoryError) as e:
        print(f"fleetwatch {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except FleetwatchError as e:
        print(f"fleetwatch {ns.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
