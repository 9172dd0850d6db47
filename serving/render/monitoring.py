"""Prometheus scrape job and alert rules for vLLM's ``/metrics``, built from the spec.

vLLM answers ``/metrics`` without the API key (``--api-key`` guards only ``/v1/*``), so the
scrape needs no credentials, and the port must stay private: reachable from the VNet and the
named API networks only (NSG, NetworkPolicy, the units' IPAddressAllow). The scrape goes to the
API port, where the API proxy (``serving.render.proxy``) passes ``/metrics`` on to vLLM.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from serving.stack.layout import SERVICE_NAME
from serving.stack.spec import Spec

# Series names as vLLM 0.33 exposes them (vllm/v1/metrics/loggers.py; counters get their
# `_total` suffix from prometheus_client). Every series carries `model_name` and `engine`
# labels. vllm:kv_cache_usage_perc replaced vllm:gpu_cache_usage_perc (deprecated in 0.9,
# since removed) and is a fraction in [0, 1], not a percentage.
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
REQUESTS_RUNNING = "vllm:num_requests_running"
REQUESTS_WAITING = "vllm:num_requests_waiting"
PREEMPTIONS = "vllm:num_preemptions_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
E2E_LATENCY_BUCKETS = "vllm:e2e_request_latency_seconds_bucket"
TTFT_BUCKETS = "vllm:time_to_first_token_seconds_bucket"
ITL_BUCKETS = "vllm:inter_token_latency_seconds_bucket"
# One sample per distinct (running, waiting) adapter list, its value the time vLLM wrote it: the
# newest sample is the current state, so a panel takes topk(1) by value, not a sum.
LORA_INFO = "vllm:lora_requests_info"
VLLM_SERIES = (
    KV_CACHE_USAGE, REQUESTS_RUNNING, REQUESTS_WAITING, PREEMPTIONS, GENERATION_TOKENS,
    E2E_LATENCY_BUCKETS, TTFT_BUCKETS, ITL_BUCKETS, LORA_INFO,
)
# Written by Prometheus itself for every target.
UP = "up"

METRICS_PATH = "/metrics"
SCRAPE_INTERVAL = "15s"
SCRAPE_TIMEOUT = "10s"
# The per-instance, per-model view every rule aggregates to (`engine` is summed away).
BY = "instance, model_name"


@dataclass(frozen=True)
class Thresholds:
    """Alert limits; tune per deployment. Durations are PromQL durations."""

    # vLLM cannot serve while it loads the model and compiles (minutes): don't page for that.
    target_down_for: str = "10m"
    kv_cache_fraction: float = 0.95
    kv_cache_for: str = "15m"
    # The queue has not emptied once in this long: demand exceeds the batch vLLM runs.
    queue_window: str = "10m"
    queue_for: str = "5m"
    preemption_window: str = "10m"
    preemption_for: str = "15m"
    ttft_p95_seconds: float = 5.0
    e2e_p99_seconds: float = 120.0
    latency_window: str = "5m"
    latency_for: str = "15m"
    # Requests have been running all along and no token came out: the engine is stuck.
    stall_window: str = "5m"
    stall_for: str = "5m"


DEFAULT_THRESHOLDS = Thresholds()


def job_name(spec: Spec) -> str:
    return f"{SERVICE_NAME}-{spec.stack}"


def _target(address: str, port: int) -> str:
    """``host``, ``host:port``, an IPv6 address or ``[v6]:port`` -> ``host:port``."""
    text = address.strip()
    if not text or "/" in text:
        raise ValueError(f"{address!r} is not a scrape target; allowed: host or host:port")
    if text.startswith("["):
        return text if "]:" in text else f"{text}:{port}"
    try:
        if ipaddress.ip_address(text).version == 6:
            return f"[{text}]:{port}"
    except ValueError:
        pass
    return text if ":" in text else f"{text}:{port}"


def scrape_config(spec: Spec, targets: list[str]) -> dict[str, Any]:
    """One ``scrape_configs`` entry for the stack's vLLM servers (port from the spec)."""
    if not targets:
        raise ValueError("no scrape targets; allowed: the serving hosts' addresses")
    return {
        "job_name": job_name(spec),
        "metrics_path": METRICS_PATH,
        # vLLM serves plain HTTP here; no auth because the key does not guard /metrics.
        "scheme": "http",
        "scrape_interval": SCRAPE_INTERVAL,
        "scrape_timeout": SCRAPE_TIMEOUT,
        "static_configs": [{
            "targets": [_target(t, spec.vllm.port) for t in targets],
            "labels": {"stack": spec.stack, "service": SERVICE_NAME},
        }],
    }


def prometheus_config(
    spec: Spec, targets: list[str], rule_files: Sequence[str] = ()
) -> dict[str, Any]:
    """A whole ``prometheus.yml`` with just this job, for a standalone Prometheus."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [scrape_config(spec, targets)],
    }
    if rule_files:
        config["rule_files"] = list(rule_files)
    return config


def _rule(
    spec: Spec, name: str, expr: str, for_: str, severity: str, summary: str, description: str
) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity, "stack": spec.stack, "service": SERVICE_NAME},
        "annotations": {"summary": summary, "description": description},
    }


def selector(job: str, *, regex: bool = False) -> str:
    """The series selector every rule and panel uses: the stack's job (or a Grafana variable)."""
    return f'{{job{"=~" if regex else "="}"{job}"}}'


def quantile(q: float, buckets: str, sel: str, window: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {BY}) (rate({buckets}{sel}[{window}])))"


@dataclass(frozen=True)
class Panel:
    """One dashboard panel: its queries as ``(legend, PromQL)``, and Grafana's unit."""

    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]
    kind: str = "timeseries"


def dashboard_panels(sel: str, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> list[Panel]:
    """What the dashboard shows, from the same series, selector and windows as the alerts
    (``serving.render.dashboard`` lays them out as Grafana JSON)."""
    w = thresholds.latency_window
    who = "{{instance}} {{model_name}}"

    def latency(title: str, buckets: str, qs: tuple[float, ...]) -> Panel:
        return Panel(title, "s", tuple((f"p{round(q * 100)} {who}", quantile(q, buckets, sel, w))
                                       for q in qs))

    return [
        latency("Time to first token", TTFT_BUCKETS, (0.5, 0.95)),
        latency("Inter-token latency", ITL_BUCKETS, (0.5, 0.95)),
        latency("End-to-end request latency", E2E_LATENCY_BUCKETS, (0.5, 0.99)),
        Panel("Requests running and waiting", "short", (
            (f"running {who}", f"sum by ({BY}) ({REQUESTS_RUNNING}{sel})"),
            (f"waiting {who}", f"sum by ({BY}) ({REQUESTS_WAITING}{sel})"),
        )),
        Panel("KV-cache use", "percentunit", (
            (who, f"max by ({BY}) ({KV_CACHE_USAGE}{sel})"),
        )),
        Panel("Preemptions", "ops", (
            (who, f"sum by ({BY}) (rate({PREEMPTIONS}{sel}[{thresholds.preemption_window}]))"),
        )),
        Panel("Generated tokens", "ops", (
            (who, f"sum by ({BY}) (rate({GENERATION_TOKENS}{sel}[{thresholds.stall_window}]))"),
        )),
        Panel("Adapters running and waiting", "dateTimeAsIso", (
            ("{{instance}} running: {{running_lora_adapters}} waiting: "
             "{{waiting_lora_adapters}}",
             f"topk by (instance) (1, {LORA_INFO}{sel})"),
        ), kind="table"),
    ]


def alert_rules(spec: Spec, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """A Prometheus rule file (``groups:``) for the stack's scrape job."""
    t = thresholds
    sel = selector(job_name(spec))


    where = "{{ $labels.instance }}"
    model = "{{ $labels.model_name }} on {{ $labels.instance }}"
    rules = [
        _rule(
            spec, "VllmTargetDown", f"{UP}{sel} == 0", t.target_down_for, "critical",
            f"vLLM on {where} is not answering /metrics",
            "The scrape fails: the service is down, restarting, or still loading the model "
            f"after {t.target_down_for}. Check `systemctl status {SERVICE_NAME}` and its journal.",
        ),
        _rule(
            spec, "VllmKvCacheNearlyFull",
            f"max by ({BY}) ({KV_CACHE_USAGE}{sel}) > {t.kv_cache_fraction:g}",
            t.kv_cache_for, "warning",
            f"KV cache of {model} is above {t.kv_cache_fraction:.0%}",
            "Requests will queue or be preempted: lower maxNumSeqs or maxModelLen, raise "
            "gpuMemoryUtilization, or add replicas. Value: {{ $value | humanizePercentage }}.",
        ),
        _rule(
            spec, "VllmRequestsQueueing",
            f"min by ({BY}) (min_over_time({REQUESTS_WAITING}{sel}[{t.queue_window}])) > 0",
            t.queue_for, "warning",
            f"Requests to {model} keep waiting for a slot in the batch",
            "The waiting queue never emptied: demand exceeds what one batch serves. "
            "At least {{ $value }} requests waiting throughout.",
        ),
        _rule(
            spec, "VllmPreempting",
            f"sum by ({BY}) (rate({PREEMPTIONS}{sel}[{t.preemption_window}])) > 0",
            t.preemption_for, "warning",
            f"{model} keeps preempting requests",
            "vLLM evicts running requests for lack of KV-cache blocks and recomputes them "
            "later; latency suffers. {{ $value | humanize }} preemptions/s.",
        ),
        _rule(
            spec, "VllmSlowFirstToken",
            f"{quantile(0.95, TTFT_BUCKETS, sel, t.latency_window)} > {t.ttft_p95_seconds:g}",
            t.latency_for, "warning",
            f"p95 time to first token of {model} is above {t.ttft_p95_seconds:g}s",
            "p95 TTFT is {{ $value | humanizeDuration }}: prefill is queueing behind the batch.",
        ),
        _rule(
            spec, "VllmSlowRequests",
            f"{quantile(0.99, E2E_LATENCY_BUCKETS, sel, t.latency_window)} > {t.e2e_p99_seconds:g}",
            t.latency_for, "warning",
            f"p99 request latency of {model} is above {t.e2e_p99_seconds:g}s",
            "p99 end-to-end latency is {{ $value | humanizeDuration }}.",
        ),
        _rule(
            spec, "VllmNoThroughput",
            f"sum by ({BY}) (rate({GENERATION_TOKENS}{sel}[{t.stall_window}])) == 0 "
            f"and on ({BY}) "
            f"min by ({BY}) (min_over_time({REQUESTS_RUNNING}{sel}[{t.stall_window}])) > 0",
            t.stall_for, "critical",
            f"{model} produces no tokens while requests are running",
            f"Requests have been running for {t.stall_window} and no token was generated: the "
            "engine is stuck (GPU fault, deadlock). Restart the service and check the journal.",
        ),
    ]
    return {"groups": [{"name": job_name(spec), "rules": rules}]}


# -- VMs: Prometheus in agent mode, writing to the stack's Azure Monitor workspace ------------

# Azure Monitor's ingestion takes remote-write at the data collection rule's stream; the DCE
# gives the host name, the DCR its immutable id (infra.monitoring builds the URL).
INGESTION_API_VERSION = "2023-04-24"
PROMETHEUS_STREAM = "Microsoft-PrometheusMetrics"
# What ``render`` writes where the cloud values go (``fab deploy`` renders the real ones).
PLACEHOLDER_INGESTION_URL = (
    "https://dce.region-1.metrics.ingest.monitor.azure.com/dataCollectionRules/dcr-0/streams/"
    f"{PROMETHEUS_STREAM}/api/v1/write?api-version={INGESTION_API_VERSION}")
PLACEHOLDER_CLIENT_ID = "00000000-0000-0000-0000-000000000000"


def ingestion_url(endpoint: str, rule_immutable_id: str) -> str:
    """The remote-write URL of a data collection rule's Prometheus stream."""
    return (f"{endpoint.rstrip('/')}/dataCollectionRules/{rule_immutable_id}/streams/"
            f"{PROMETHEUS_STREAM}/api/v1/write?api-version={INGESTION_API_VERSION}")


def agent_config(spec: Spec, *, instance: str, vllm_address: str, token_file: str,
                 remote_write_url: str = PLACEHOLDER_INGESTION_URL) -> dict[str, Any]:
    """Prometheus in agent mode on a VM: scrape vLLM on loopback under the stack's job (so the
    alert rules select it as on AKS) with the host's name as ``instance``, and remote-write
    with the bearer token in ``token_file``: the VM's user-assigned identity's, which a
    refresher keeps current (``serving.render.metrics_unit``; the identity must hold
    Monitoring Metrics Publisher on the data collection rule). Prometheus reads the file on
    every request, so the configuration holds its path, never the token. An agent has no rules
    and no query API: the rules run in the workspace."""
    scrape = scrape_config(spec, [vllm_address])
    scrape["static_configs"][0]["labels"]["instance"] = instance
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL,
                   "external_labels": {"stack": spec.stack}},
        "scrape_configs": [scrape],
        "remote_write": [{
            "url": remote_write_url,
            "authorization": {"type": "Bearer", "credentials_file": token_file},
        }],
    }
