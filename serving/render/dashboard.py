"""The Grafana dashboard of a vLLM fleet, laid out from ``monitoring.dashboard_panels``: the
same series, selector and windows as the alert rules, so a panel shows what an alert judges.

One dashboard serves every stack: a ``job`` variable lists the stacks' scrape jobs
(``exaone-vllm-<stack>``) found in the chosen data source (an Azure Monitor workspace, or any
Prometheus). The checked-in copy (``docs/grafana/exaone-vllm.json``) is this module's output.
"""

from __future__ import annotations

import json
from typing import Any

from serving.render import monitoring
from serving.stack.layout import SERVICE_NAME

UID = SERVICE_NAME
TITLE = "EXAONE on vLLM"
JOB_VARIABLE = "job"
DATASOURCE_VARIABLE = "datasource"
DATASOURCE = {"type": "prometheus", "uid": f"${{{DATASOURCE_VARIABLE}}}"}
_WIDTH, _HEIGHT, _COLUMNS = 12, 8, 2


def selector() -> str:
    return monitoring.selector(f"${JOB_VARIABLE}", regex=True)


def _panel(i: int, panel: monitoring.Panel) -> dict[str, Any]:
    targets = [{"refId": chr(ord("A") + n), "datasource": DATASOURCE, "expr": expr,
                "legendFormat": legend, **({"instant": True, "format": "table"}
                                           if panel.kind == "table" else {})}
               for n, (legend, expr) in enumerate(panel.queries)]
    return {
        "id": i + 1,
        "type": panel.kind,
        "title": panel.title,
        "datasource": DATASOURCE,
        "gridPos": {"x": (i % _COLUMNS) * _WIDTH, "y": (i // _COLUMNS) * _HEIGHT,
                    "w": _WIDTH, "h": _HEIGHT},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": targets,
    }


def dashboard() -> dict[str, Any]:
    panels = monitoring.dashboard_panels(selector())
    return {
        "uid": UID,
        "title": TITLE,
        "tags": [SERVICE_NAME, "vllm"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": DATASOURCE_VARIABLE, "type": "datasource", "query": "prometheus",
             "label": "Data source"},
            {"name": JOB_VARIABLE, "type": "query", "label": "Stack", "datasource": DATASOURCE,
             "query": f"label_values({monitoring.REQUESTS_RUNNING}, job)",
             "regex": f"{SERVICE_NAME}-.*", "multi": True, "includeAll": True,
             "refresh": 2},
        ]},
        "panels": [_panel(i, p) for i, p in enumerate(panels)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"
