"""The add-ons' custom resources judged by schemas this project writes from their documented APIs.

``kubernetes-validate`` bundles only Kubernetes' own kinds: for a ``PodMonitor`` or a KEDA
``ScaledObject`` it warns "Couldn't find schema" and exits 0. So each kind the project renders
has a compact JSON Schema here, covering the fields the project uses and their documented
neighbours, with the documented required fields, types and enums. An object that names a
field the schema does not know is refused: ``kubectl apply`` validates fields strictly on the
server since Kubernetes 1.27 and refuses a field a CRD's schema does not name, where an older
client would have had it pruned without a word (a typo would vanish silently).

These schemas are narrower than the add-ons' APIs (fields the project has no use for are not
listed, so they are refused here): extend the kind's schema when the builders start using one.
"""

from __future__ import annotations

from typing import Any

import jsonschema

# -- shared pieces ----------------------------------------------------------------------------

_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_BOOL: dict[str, Any] = {"type": "boolean"}
_STR_MAP: dict[str, Any] = {"type": "object", "additionalProperties": _STR}
_STR_LIST: dict[str, Any] = {"type": "array", "items": _STR}
# Prometheus durations: one or more <number><unit> from ms to y ("15s", "1m30s"), or "0".
_DURATION: dict[str, Any] = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}


def _obj(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    """An object that refuses fields it does not name."""
    out: dict[str, Any] = {"type": "object", "properties": properties,
                           "additionalProperties": False}
    if required:
        out["required"] = list(required)
    return out


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Any Kubernetes object: apiVersion/kind fixed, metadata left to the API server."""
    return _obj({
        "apiVersion": {"const": api_version},
        "kind": {"const": kind},
        "metadata": _obj({"name": _STR, "namespace": _STR, "labels": _STR_MAP,
                          "annotations": _STR_MAP}, "name"),
        "spec": spec,
        "status": {"type": "object"},
    }, "apiVersion", "kind", "metadata", "spec")


_LABEL_SELECTOR = _obj({
    "matchLabels": _STR_MAP,
    "matchExpressions": {"type": "array", "items": _obj({
        "key": _STR,
        "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": _STR_LIST,
    }, "key", "operator")},
})

# -- PodMonitor, as read by Azure Monitor managed Prometheus ------------------------------------
# Follows https://learn.microsoft.com/azure/azure-monitor/containers/prometheus-metrics-scrape-crd
# (the group is azmonitoring.coreos.com; the fields are those of the Prometheus operator's
# PodMonitor: https://prometheus-operator.dev/docs/api-reference/api/#monitoring.coreos.com/v1.PodMonitor).

_RELABEL_ACTIONS = ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                    "lowercase", "uppercase", "keepequal", "dropequal"]
_RELABEL = _obj({
    "sourceLabels": {"type": "array",
                     "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": _STR,
    "targetLabel": _STR,
    "regex": _STR,
    "modulus": _INT,
    "replacement": _STR,
    # Both spellings are accepted ("replace" and "Replace").
    "action": {"enum": _RELABEL_ACTIONS + [a.capitalize() for a in _RELABEL_ACTIONS]},
})

_POD_METRICS_ENDPOINT = _obj({
    "port": _STR,
    "targetPort": {"type": ["integer", "string"]},
    "path": {"type": "string", "pattern": "^/"},
    "scheme": {"enum": ["http", "https"]},
    "params": {"type": "object", "additionalProperties": _STR_LIST},
    "interval": _DURATION,
    "scrapeTimeout": _DURATION,
    "honorLabels": _BOOL,
    "honorTimestamps": _BOOL,
    "relabelings": {"type": "array", "items": _RELABEL},
    "metricRelabelings": {"type": "array", "items": _RELABEL},
})

POD_MONITOR = _resource("azmonitoring.coreos.com/v1", "PodMonitor", _obj({
    "selector": _LABEL_SELECTOR,
    "namespaceSelector": _obj({"any": _BOOL, "matchNames": _STR_LIST}),
    "jobLabel": _STR,
    "podTargetLabels": _STR_LIST,
    "sampleLimit": {"type": "integer", "minimum": 0},
    "podMetricsEndpoints": {"type": "array", "items": _POD_METRICS_ENDPOINT},
}, "selector"))

# -- KEDA ScaledObject --------------------------------------------------------------------------
# Follows https://keda.sh/docs/latest/reference/scaledobject-spec/ and, for the triggers'
# metadata, https://keda.sh/docs/latest/scalers/prometheus/.

_HPA_SCALING_RULES = _obj({
    "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
    "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
    "policies": {"type": "array", "items": _obj({
        "type": {"enum": ["Pods", "Percent"]},
        "value": {"type": "integer", "minimum": 1},
        "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
    }, "type", "value", "periodSeconds")},
})

_TRIGGER = _obj({
    "type": _STR,
    "name": _STR,
    # Scaler settings are strings, numbers included ("threshold": "5").
    "metadata": _STR_MAP,
    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
    "useCachedMetrics": _BOOL,
    "authenticationRef": _obj({
        "name": _STR,
        "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
    }, "name"),
}, "type", "metadata")

SCALED_OBJECT = _resource("keda.sh/v1alpha1", "ScaledObject", _obj({
    "scaleTargetRef": _obj({"apiVersion": _STR, "kind": _STR, "name": _STR,
                            "envSourceContainerName": _STR}, "name"),
    "pollingInterval": {"type": "integer", "minimum": 1},
    "cooldownPeriod": {"type": "integer", "minimum": 0},
    "initialCooldownPeriod": {"type": "integer", "minimum": 0},
    "idleReplicaCount": {"type": "integer", "minimum": 0},
    "minReplicaCount": {"type": "integer", "minimum": 0},
    "maxReplicaCount": {"type": "integer", "minimum": 1},
    "fallback": _obj({"failureThreshold": {"type": "integer", "minimum": 1},
                      "replicas": {"type": "integer", "minimum": 0}},
                     "failureThreshold", "replicas"),
    "advanced": _obj({
        "restoreToOriginalReplicaCount": _BOOL,
        "horizontalPodAutoscalerConfig": _obj({
            "name": _STR,
            "behavior": _obj({"scaleUp": _HPA_SCALING_RULES,
                              "scaleDown": _HPA_SCALING_RULES}),
        }),
    }),
    "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
}, "scaleTargetRef", "triggers"))

# -- KEDA TriggerAuthentication -----------------------------------------------------------------
# Follows https://keda.sh/docs/latest/concepts/authentication/ and, for the identity the
# project uses, https://keda.sh/docs/latest/authentication-providers/azure-ad-workload-identity/.

TRIGGER_AUTHENTICATION = _resource("keda.sh/v1alpha1", "TriggerAuthentication", _obj({
    "podIdentity": _obj({
        "provider": {"enum": ["none", "azure-workload", "aws", "aws-eks", "gcp"]},
        "identityId": _STR,
        "identityTenantId": _STR,
        "identityAuthorityHost": _STR,
    }, "provider"),
    "secretTargetRef": {"type": "array", "items": _obj(
        {"parameter": _STR, "name": _STR, "key": _STR}, "parameter", "name", "key")},
    "env": {"type": "array", "items": _obj(
        {"parameter": _STR, "name": _STR, "containerName": _STR}, "parameter", "name")},
}))

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("azmonitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGER_AUTHENTICATION,
}


def is_custom(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) in SCHEMAS


def errors(obj: dict[str, Any]) -> list[str]:
    """Why ``obj`` does not fit its kind's schema (empty when it does)."""
    schema = SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if schema is None:
        return [f"no schema for {obj['apiVersion']} {obj['kind']}"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))]
