"""Tier 1: the AKS objects, read as policies, for every AKS stack and re-targeted specs."""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

import pytest

import k8s
from k8s import fetch, objects
from k8s import proxy as k8s_proxy
from serving.render import proxy as proxy_config
from serving.render import vllm_args
from serving.stack import layout, stackfile
from serving.stack.spec import SecretRef, Spec

APP_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
)
API_KEY = "test-key-must-never-appear-inline"


def _retarget(stack: str, **vllm: Any) -> Spec:
    spec = stackfile.load(stack).model_copy(update={"target": "aks"})
    return spec.model_copy(update={"vllm": spec.vllm.model_copy(update=vllm)}) if vllm else spec


def _custom() -> Spec:
    """Nothing of the checked-in stacks: other namespace, port, size, TP, model source."""
    spec = _retarget(
        "dev",
        port=9100,
        tensor_parallel_size=2,
        image="registry.example.com/vllm-openai",
        image_digest="sha256:" + "ab" * 32,
    )
    return spec.model_copy(update={
        "stack": "custom",
        "aks": spec.aks.model_copy(update={"namespace": "llm-serving", "replicas": 3}),
        "vm": spec.vm.model_copy(update={"size": "Standard_NC80adis_H100_v5"}),
        "model": spec.model.model_copy(update={"source": "hf", "id": "other-org/other-model"}),
        "network": spec.network.model_copy(update={"api_cidrs": ()}),
    })


def _cases() -> list[Any]:
    cases = [
        pytest.param(stackfile.load(name), id=name)
        for name in stackfile.stack_names()
        if stackfile.load(name).target == "aks"
    ]
    cases.append(pytest.param(_retarget("dev"), id="dev-as-aks"))
    cases.append(pytest.param(_custom(), id="custom"))
    return cases


CASES = _cases()


def test_a_checked_in_stack_targets_aks() -> None:
    assert any(c.id != "dev-as-aks" and c.id != "custom" for c in CASES)


def _by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _pod(spec: Spec) -> dict[str, Any]:
    return _by_kind(objects.vllm_objects(spec), "Deployment")["spec"]["template"]["spec"]


def _vllm(spec: Spec) -> dict[str, Any]:
    (container,) = [c for c in _pod(spec)["containers"] if c["name"] == "vllm"]
    return container


def _init(spec: Spec) -> dict[str, Any]:
    (container,) = _pod(spec)["initContainers"]
    return container


@pytest.mark.parametrize("spec", CASES)
def test_objects_come_in_apply_order_in_the_spec_namespace(spec: Spec) -> None:
    objs = objects.vllm_objects(spec)
    assert [o["kind"] for o in objs] == [
        "Namespace", "ServiceAccount", "ConfigMap", "ConfigMap", "Deployment", "Service",
        "PodDisruptionBudget", "NetworkPolicy",
    ]
    assert objs[0]["metadata"]["name"] == spec.aks.namespace
    for obj in [*objs[1:], objects.api_key_secret(spec, API_KEY)]:
        assert obj["metadata"]["namespace"] == spec.aks.namespace, obj["kind"]


@pytest.mark.parametrize("spec", CASES)
def test_container_runs_exactly_the_vllm_command_line(spec: Spec) -> None:
    container = _vllm(spec)
    expected = vllm_args.command(spec, layout.POD)
    assert container["command"] == [expected[0]] == ["python3"]
    assert container["args"] == expected[1:]


@pytest.mark.parametrize("spec", CASES)
def test_environment_is_vllm_args_plus_the_key_from_the_secret(spec: Spec) -> None:
    env = {e["name"]: e for e in _vllm(spec)["env"]}
    for name, value in vllm_args.environment(spec, layout.POD).items():
        assert env[name] == {"name": name, "value": value}
    secret = objects.api_key_secret(spec, API_KEY)
    key_ref = env[layout.API_KEY_ENV]["valueFrom"]["secretKeyRef"]
    assert key_ref["name"] == secret["metadata"]["name"]
    assert key_ref["key"] in secret["stringData"]
    assert secret["stringData"][key_ref["key"]] == API_KEY


@pytest.mark.parametrize("spec", CASES)
def test_the_api_key_is_never_inlined(spec: Spec) -> None:
    rendered = json.dumps(objects.vllm_objects(spec))
    assert API_KEY not in rendered
    assert "--api-key" not in _vllm(spec)["args"]
    assert "value" not in next(e for e in _vllm(spec)["env"] if e["name"] == layout.API_KEY_ENV)


def test_no_key_reference_when_the_spec_has_no_api_key() -> None:
    spec = _retarget("dev").model_copy(update={
        "api_key": SecretRef(kind="none"),
    })
    names = [e["name"] for e in _vllm(spec)["env"]]
    assert layout.API_KEY_ENV not in names
    annotations = _by_kind(objects.vllm_objects(spec), "Deployment")["metadata"]["annotations"]
    assert not any(v.startswith("CKV_K8S_35=") for v in annotations.values())


@pytest.mark.parametrize("spec", CASES)
def test_image_is_the_pinned_vllm_release(spec: Spec) -> None:
    expected = f"{spec.vllm.image}:v{spec.vllm.version}"
    if spec.vllm.image_digest:
        expected += f"@{spec.vllm.image_digest}"
    assert _vllm(spec)["image"] == expected
    assert not _vllm(spec)["image"].endswith(":latest")


DIGEST_RE = re.compile(r"^[a-z0-9.-]+(/[a-z0-9._-]+)+:[A-Za-z0-9._-]+@sha256:[0-9a-f]{64}$")


@pytest.mark.parametrize("spec", CASES)
def test_the_proxy_sidecar_is_pinned_by_digest_from_one_place(spec: Spec) -> None:
    """The sidecar that serves every client request runs exactly the image named in
    k8s/proxy.py, by tag and digest, and is not among the images the checkov skip excuses."""
    deployment = _by_kind(objects.vllm_objects(spec), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    proxies = [c for c in pod["containers"] if "nginx" in c["image"]]
    assert [c["image"] for c in proxies] == [k8s_proxy.image()]
    assert DIGEST_RE.match(k8s_proxy.image()), k8s_proxy.image()
    assert k8s_proxy.image() == f"{k8s_proxy.NGINX_IMAGE}@{k8s_proxy.NGINX_DIGEST}"
    skip = " ".join(v for v in deployment["metadata"]["annotations"].values()
                    if v.startswith("CKV_K8S_43="))
    assert k8s_proxy.NGINX_IMAGE not in skip, skip


@pytest.mark.parametrize("spec", CASES)
def test_every_image_is_pinned_by_digest_or_excused_by_name(spec: Spec) -> None:
    deployment = _by_kind(objects.vllm_objects(spec), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    skip = " ".join(v for v in deployment["metadata"]["annotations"].values()
                    if v.startswith("CKV_K8S_43="))
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        image = container["image"]
        assert DIGEST_RE.match(image) or image in skip, (container["name"], image, skip)


@pytest.mark.parametrize("spec", CASES)
def test_vllm_binds_loopback_and_is_probed_there(spec: Spec) -> None:
    container = _vllm(spec)
    argv = [*container["command"], *container["args"]]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    backend = layout.vllm_port(spec)
    assert argv[argv.index("--port") + 1] == str(backend) != str(spec.vllm.port)
    # Nothing of vLLM is exposed: the kubelet reaches only the proxy's port.
    assert "ports" not in container
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[-1] == f"http://127.0.0.1:{backend}/health", probe
        assert command[0] == "python3"
    startup = container["startupProbe"]
    budget_seconds = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget_seconds >= 15 * 60, "model load takes minutes"


def _proxy(spec: Spec) -> dict[str, Any]:
    (container,) = [c for c in _pod(spec)["containers"] if c["name"] == "proxy"]
    return container


def _config_map(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("spec", CASES)
def test_service_and_policy_target_the_proxy_sidecar(spec: Spec) -> None:
    objs = objects.vllm_objects(spec)
    container = _proxy(spec)
    (port,) = container["ports"]
    assert port == {"name": objects.PORT_NAME, "containerPort": spec.vllm.port, "protocol": "TCP"}
    svc = _by_kind(objs, "Service")["spec"]["ports"][0]
    assert svc["targetPort"] == objects.PORT_NAME
    assert container["readinessProbe"]["httpGet"] == {"path": "/health",
                                                      "port": objects.PORT_NAME}
    # The proxy serves its rendered configuration, from its ConfigMap, and nothing else.
    config = _config_map(objs, k8s_proxy.CONFIG_NAME)["data"][k8s_proxy.CONFIG_KEY]
    assert config == proxy_config.render_config(spec, proxy_config.POD)
    assert container["command"] == ["nginx", "-c",
                                    f"{k8s_proxy.CONFIG_DIR}/{k8s_proxy.CONFIG_KEY}"]
    assert f"listen 0.0.0.0:{spec.vllm.port};" in config
    assert f"server 127.0.0.1:{layout.vllm_port(spec)};" in config
    assert "load_lora_adapter" not in "".join(
        line for line in config.splitlines() if "proxy_pass" in line)
    annotations = _by_kind(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert k8s_proxy.config_digest(spec) in annotations.values()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[k8s_proxy.CONFIG_DIR]["readOnly"] is True
    assert proxy_config.POD.run_dir in mounts


@pytest.mark.parametrize("spec", CASES)
def test_every_container_is_locked_down(spec: Spec) -> None:
    pod = _pod(spec)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["runAsGroup"] >= 10000
    assert "fsGroup" in pod["securityContext"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), key
    assert not any("hostPath" in v for v in pod["volumes"])
    for container in [*pod["initContainers"], *pod["containers"]]:
        sc = container["securityContext"]
        assert sc.get("privileged") is not True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["runAsNonRoot"] is True, container["name"]
        assert sc["runAsUser"] >= 10000, container["name"]


@pytest.mark.parametrize("spec", CASES)
def test_writable_paths_are_volumes(spec: Spec) -> None:
    pod = _pod(spec)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _vllm(spec)["volumeMounts"]}
    for path in (layout.POD.models_dir, layout.POD.adapters_dir, layout.POD.cache_dir, "/tmp"):
        empty_dir = volumes[mounts[path]]["emptyDir"]
        assert empty_dir["sizeLimit"].endswith("Gi"), path
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("spec", CASES)
def test_pod_runs_on_the_gpu_pool_with_its_gpus(spec: Spec) -> None:
    pod = _pod(spec)
    assert {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in (
        pod["tolerations"]
    )
    assert pod["nodeSelector"] == k8s.GPU_NODE_SELECTOR
    resources = _vllm(spec)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == str(spec.vllm.tensor_parallel_size)


def test_gpu_pool_facts_are_the_aks_taint() -> None:
    assert k8s.GPU_NODE_TAINT == "sku=gpu:NoSchedule"
    assert k8s.GPU_NODE_SELECTOR.items() <= k8s.GPU_NODE_LABELS.items()


@pytest.mark.parametrize("spec", CASES)
def test_cpu_and_memory_fit_the_node_for_every_pod_on_it(spec: Spec) -> None:
    resources = _vllm(spec)["resources"]
    for kind in ("cpu", "memory"):
        assert resources["requests"][kind] == resources["limits"][kind], kind
    sku = spec.vm.sku
    pods_per_node = sku.gpus // spec.vllm.tensor_parallel_size
    cpu = int(resources["requests"]["cpu"])
    memory = int(resources["requests"]["memory"].removesuffix("Gi"))
    assert 1 <= cpu * pods_per_node < sku.vcpus
    assert 1 <= memory * pods_per_node < sku.ram_gib


@pytest.mark.parametrize("spec", CASES)
def test_every_object_and_the_pod_carry_the_standard_labels(spec: Spec) -> None:
    objs = [*objects.vllm_objects(spec), objects.api_key_secret(spec, API_KEY)]
    objs += k8s.device_plugin(spec)
    for obj in objs:
        labels = obj["metadata"]["labels"]
        assert all(labels.get(k) for k in APP_LABELS), (obj["kind"], labels)
        template = obj.get("spec", {}).get("template")
        if template:
            assert all(template["metadata"]["labels"].get(k) for k in APP_LABELS), obj["kind"]
            selector = obj["spec"]["selector"]["matchLabels"]
            assert selector.items() <= template["metadata"]["labels"].items(), obj["kind"]


@pytest.mark.parametrize("spec", CASES)
def test_workload_identity_without_a_kubernetes_api_token(spec: Spec) -> None:
    objs = objects.vllm_objects(spec, client_id="cid", tenant_id="tid")
    account = _by_kind(objs, "ServiceAccount")
    assert account["metadata"]["annotations"]["azure.workload.identity/client-id"] == "cid"
    assert account["metadata"]["annotations"]["azure.workload.identity/tenant-id"] == "tid"
    assert account["automountServiceAccountToken"] is False
    template = _by_kind(objs, "Deployment")["spec"]["template"]
    assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert template["spec"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("spec", CASES)
def test_namespace_enforces_the_restricted_pod_security_standard(spec: Spec) -> None:
    labels = objects.vllm_objects(spec)[0]["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


@pytest.mark.parametrize("spec", CASES)
def test_service_is_never_public(spec: Spec) -> None:
    svc = _by_kind(objects.vllm_objects(spec), "Service")
    kind = svc["spec"]["type"]
    assert kind in ("ClusterIP", "LoadBalancer")
    if kind == "LoadBalancer":
        annotations = svc["metadata"]["annotations"]
        assert annotations["service.beta.kubernetes.io/azure-load-balancer-internal"] == "true"
        ranges = svc["spec"]["loadBalancerSourceRanges"]
        assert ranges == list(spec.network.api_cidrs)
        assert all(ipaddress.ip_network(r).prefixlen > 0 for r in ranges)
    else:
        assert not spec.network.api_cidrs
    assert svc["spec"]["ports"][0]["port"] == spec.vllm.port


@pytest.mark.parametrize("spec", CASES)
def test_network_policy_admits_only_named_networks_to_the_api_port(spec: Spec) -> None:
    policy = _by_kind(objects.vllm_objects(spec), "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    blocks = []
    for rule in policy["ingress"]:
        assert rule["ports"] == [{"port": spec.vllm.port, "protocol": "TCP"}]
        assert rule["from"], "an empty 'from' admits everyone"
        blocks += [peer["ipBlock"]["cidr"] for peer in rule["from"] if "ipBlock" in peer]
    assert blocks == list(spec.network.api_cidrs)
    assert all(ipaddress.ip_network(b).prefixlen > 0 for b in blocks), "no 0.0.0.0/0 or ::/0"
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 443}


@pytest.mark.parametrize("spec", CASES)
def test_rollout_fits_a_full_gpu_pool(spec: Spec) -> None:
    deployment = _by_kind(objects.vllm_objects(spec), "Deployment")["spec"]
    assert deployment["replicas"] == spec.aks.replicas
    assert deployment["strategy"]["rollingUpdate"]["maxSurge"] == 0
    budget = _by_kind(objects.vllm_objects(spec), "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] >= 1 and "minAvailable" not in budget


@pytest.mark.parametrize("spec", CASES)
def test_init_container_fetches_to_the_paths_vllm_is_given(spec: Spec) -> None:
    rows = fetch.manifest_rows(spec)
    model_rows = [r for r in rows if r[0] == "model"]
    if spec.model.source_kind == "blob":
        assert model_rows == [("model", spec.model.source, layout.POD.model_path(spec), "-")]
        assert layout.POD.model_path(spec) in _vllm(spec)["args"]
    else:
        assert model_rows == []
    adapters = {r[2]: (r[1], r[3]) for r in rows if r[0] == "adapter"}
    assert adapters == {
        layout.POD.adapter_path(spec, a): (a.source, a.sha256) for a in spec.adapters
    }
    modules = vllm_args.lora_modules(spec, layout.POD)
    assert {json.loads(m)["path"] for m in modules} == set(adapters)


@pytest.mark.parametrize("spec", CASES)
def test_init_container_runs_the_checked_in_script(spec: Spec) -> None:
    objs = objects.vllm_objects(spec, storage_account="acct123")
    config = _config_map(objs, objects.FETCH_CONFIG_NAME)
    assert config["data"][fetch.SCRIPT_KEY] == fetch.SCRIPT_PATH.read_text()
    assert config["data"][fetch.MANIFEST_KEY] == fetch.manifest(spec)
    init = _init(spec)
    assert init["image"].startswith("mcr.microsoft.com/azure-cli:2.")
    assert init["command"][1:] == [
        f"{fetch.MOUNT_DIR}/{fetch.SCRIPT_KEY}", f"{fetch.MOUNT_DIR}/{fetch.MANIFEST_KEY}",
    ]
    volume = next(v for v in _pod(spec)["volumes"] if v["name"] == "fetch")
    assert volume["configMap"]["name"] == config["metadata"]["name"]
    init = _by_kind(objs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    assert {"name": "STORAGE_ACCOUNT", "value": "acct123"} in init["env"]
    writable = {m["mountPath"] for m in init["volumeMounts"] if not m.get("readOnly")}
    assert {layout.POD.models_dir, layout.POD.adapters_dir} <= writable


def test_pods_roll_when_the_adapter_set_changes() -> None:
    spec = _retarget("dev")
    changed = spec.model_copy(update={"adapters": spec.adapters[:1]})

    def digest(s: Spec) -> str:
        return _by_kind(objects.vllm_objects(s), "Deployment")["spec"]["template"]["metadata"][
            "annotations"]["exaone-serving/fetch-config-sha256"]

    assert digest(spec) != digest(changed)


@pytest.mark.parametrize("spec", CASES)
def test_checkov_skips_state_their_reasons(spec: Spec) -> None:
    objs = [*objects.vllm_objects(spec), *k8s.device_plugin(spec)]
    for obj in objs:
        for key, value in obj["metadata"].get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert check.startswith(("CKV_K8S_", "CKV2_K8S_")), value
                assert len(reason.split()) >= 5, f"{obj['kind']}: {value} needs a reason"


@pytest.mark.parametrize("spec", CASES)
def test_device_plugin_runs_on_the_gpu_pool(spec: Spec) -> None:
    (daemon_set,) = k8s.device_plugin(spec)
    assert daemon_set["kind"] == "DaemonSet"
    assert daemon_set["metadata"]["namespace"] == "kube-system"
    pod = daemon_set["spec"]["template"]["spec"]
    assert k8s.GPU_TOLERATION in pod["tolerations"]
    assert pod["nodeSelector"] == k8s.GPU_NODE_SELECTOR
    container = pod["containers"][0]
    assert container["securityContext"]["privileged"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_every_aks_stack_gets_the_device_plugin() -> None:
    """AKS installs the driver, never the device plugin (the spec refuses aksGpuDriver none)."""
    assert len(k8s.device_plugin(_retarget("dev"))) == 1
