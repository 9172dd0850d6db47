"""vLLM's flags that the spec owns, and how vLLM's own parser reads ``vllmExtraArgs``.

``serving.render.vllm_args`` emits only flags listed in ``OWNED`` (it checks), and
``vllmExtraArgs`` may reach none of them, in any spelling vLLM's parser accepts. vLLM is not
installed where stacks are validated, so its parsing rules are restated here, from
``vllm.utils.argparse_utils.FlexibleArgumentParser`` and Python's ``argparse``:

- before argparse sees them, ``--`` arguments have ``_`` replaced by ``-`` in the name (the
  part before ``=`` and before the first ``.``); ``--name.key=value`` sets a key of the JSON
  argument ``--name``;
- ``--name=value`` is ``--name value``; ``-tp=2`` is ``-tp 2``;
- ``allow_abbrev`` is on: an unambiguous prefix (``--hos``) is completed to the option it
  starts (``--host``), an ambiguous one is an error;
- a ``--config FILE`` item makes vLLM read more flags from a YAML file the spec cannot see;
- an item that holds a space and matches no option is taken as a positional argument,
  which the server refuses;
- ``-O3`` / ``-O=3`` / ``-Odecode`` is rewritten to ``--optimization-level``; ``-1`` or ``-.5``
  is a value (argparse reads negative numbers as values when no option looks like one).

A flag that vLLM's parser does not know (``--no-such-flag``, a typo, an ambiguous prefix)
would stop vLLM from starting on the host, after the rollout began; it is refused here, by the
list of the pinned vLLM's options in ``serving.stack.vllm_options``.
"""

from __future__ import annotations

import re

from serving.stack.vllm_options import OPTIONS, PARSER_VERSION

# vLLM dest -> (its option strings, the config key that sets it), read from the parser of
# vLLM 0.32 (tests/stack/test_vllm_flags.py compares with the real one where it is installed).
# Boolean options have a `--no-` twin (argparse.BooleanOptionalAction); aliases share a dest
# (`-tp`, `--device-memory-utilization`). Besides what the spec renders: flags that would open
# another listener, put a secret on the command line, or read flags from a file.
OWNED: dict[str, tuple[tuple[str, ...], str]] = {
    "model": (("--model",), "modelId / modelSource"),
    "served_model_name": (("--served-model-name",), "servedModelName"),
    "revision": (("--revision",), "modelRevision"),
    "code_revision": (("--code-revision",), "modelRevision"),
    "tokenizer_revision": (("--tokenizer-revision",), "modelRevision"),
    "trust_remote_code": (("--trust-remote-code", "--no-trust-remote-code"), "modelRevision"),
    "host": (("--host",), "target (the bind address is the target's)"),
    "port": (("--port",), "vllmPort"),
    "uds": (("--uds",), "vllmPort (the server listens on host and port only)"),
    "grpc": (("--grpc",), "vllmPort (the server listens on host and port only)"),
    "grpc_port": (("--grpc-port",), "vllmPort (the server listens on host and port only)"),
    "dtype": (("--dtype",), "dtype"),
    "max_model_len": (("--max-model-len",), "maxModelLen"),
    "max_num_seqs": (("--max-num-seqs",), "maxNumSeqs"),
    "api_server_count": (("--api-server-count", "-asc"), "apiServerCount"),
    "gpu_memory_utilization": (
        ("--gpu-memory-utilization", "--device-memory-utilization"),
        "gpuMemoryUtilization",
    ),
    "tensor_parallel_size": (("--tensor-parallel-size", "-tp"), "tensorParallelSize"),
    "enable_lora": (("--enable-lora", "--no-enable-lora"), "adapters (LoRA is always on)"),
    "max_loras": (("--max-loras",), "maxLoras"),
    "max_cpu_loras": (("--max-cpu-loras",), "maxCpuLoras"),
    "max_lora_rank": (("--max-lora-rank",), "maxLoraRank"),
    "lora_modules": (("--lora-modules",), "adapters"),
    # LoRA weights from any path, applied by modality: outside the verified adapter set.
    "default_mm_loras": (("--default-mm-loras",), "adapters"),
    "api_key": (
        ("--api-key",),
        "apiKey / apiKeyRef (the key goes to vLLM's environment, never argv)",
    ),
    "hf_token": (("--hf-token",), "hfTokenRef (a token never goes on the command line)"),
    "config": (("--config",), "the stack itself (a config file holds flags the spec cannot see)"),
}
OWNED_OPTIONS: dict[str, str] = {opt: dest for dest, (opts, _) in OWNED.items() for opt in opts}
# vLLM options that an owned option starts with: given in full they are themselves, not an
# abbreviation (argparse tries an exact match first).
EXACT_NOT_OWNED = frozenset({"--tokenizer"})

_NAME_RE = re.compile(r"(?<=^--)[^.]*")
_NEGATIVE_NUMBER_RE = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse's own test
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def option_key(item: str) -> str | None:
    """The option name vLLM's parser looks up for ``item``, or None for a value."""
    if len(item) < 2 or not item.startswith("-") or item == "--" or \
            _NEGATIVE_NUMBER_RE.match(item):
        return None
    key = item.split("=", 1)[0]
    if item.startswith("--"):
        key = _NAME_RE.sub(lambda m: m.group(0).replace("_", "-"), key, count=1)
        key = key.split(".", 1)[0]
    return key


def owned_reached(item: str) -> list[str]:
    """The owned options ``item`` reaches: exactly, or as a prefix that argparse completes
    (several when ambiguous: vLLM would refuse to start; the spec refuses it first)."""
    key = option_key(item)
    if key is None or key in EXACT_NOT_OWNED:
        return []
    if key in OWNED_OPTIONS:
        return [key]
    return sorted(opt for opt in OWNED_OPTIONS if opt.startswith(key))


def known_reached(key: str) -> list[str]:
    """The options of vLLM's parser that the option name ``key`` (``option_key``) reaches:
    itself, or the options it abbreviates (several: ambiguous, vLLM refuses it; none: vLLM
    does not know it)."""
    if key in OPTIONS:
        return [key]
    if not key.startswith("--") and key.startswith("-O"):
        return ["--optimization-level"]  # vLLM's parser rewrites -O<level> first
    found = {opt for opt in OPTIONS if opt.startswith(key)}
    if not key.startswith("--") and key[:2] in OPTIONS:
        found.add(key[:2])  # a short option with its value attached: -n5
    return sorted(found)


def _shown(item: str) -> str:
    """The option part of an item, never its value (``--api-key=SECRET``)."""
    head = re.split(r"[=\s]", item, maxsplit=1)[0]
    return repr(head if len(head) <= 40 else head[:37] + "...")


def extra_arg_problems(items: tuple[str, ...] | list[str]) -> list[tuple[int, str]]:
    """(index, message) for each item of vllmExtraArgs that vLLM would read as an owned
    option, or as nothing at all."""
    found: list[tuple[int, str]] = []
    for i, item in enumerate(items):
        if _CONTROL_RE.search(item):
            found.append((i, "holds a line break or control character (value not shown); "
                             "allowed: printable text, one argument per item"))
            continue
        key = option_key(item)
        if key is None:
            continue
        if re.search(r"\s", key):
            found.append((i, (
                f"{_shown(item)} holds a space, so vLLM takes it as a stray argument; "
                "allowed: --flag=value, or the flag and its value as two items")))
            continue
        reached = owned_reached(item)
        if not reached:
            known = known_reached(key)
            if not known:
                found.append((i, (
                    f"{_shown(item)} is not a flag of vLLM {PARSER_VERSION} (vLLM would not "
                    "start); allowed: a flag `vllm serve --help` lists")))
            elif len(known) > 1:
                shown = ", ".join(known[:4]) + (", ..." if len(known) > 4 else "")
                found.append((i, (
                    f"{_shown(item)} abbreviates several vLLM flags ({shown}), which vLLM "
                    "refuses; allowed: the flag in full")))
            continue
        dests = {OWNED_OPTIONS[opt] for opt in reached}
        keys = "; ".join(dict.fromkeys(OWNED[d][1] for d in sorted(dests)))
        how = "is" if key in OWNED_OPTIONS else "abbreviates"
        found.append((i, (
            f"{_shown(item)} {how} {' / '.join(reached)}: rendered from the spec; "
            f"allowed: other vLLM flags; set {keys} instead")))
    return found


def value_of(items: tuple[str, ...] | list[str], option: str) -> str | None:
    """The value of ``option`` (a non-owned vLLM option in full) in vllmExtraArgs, in any
    spelling vLLM reads as that option (``--name V``, ``--name=V``, ``--na_me=V``); the last
    one wins, as in argparse."""
    value = None
    for i, item in enumerate(items):
        if option_key(item) != option:
            continue
        if "=" in item:
            value = item.split("=", 1)[1]
        elif i + 1 < len(items):
            value = items[i + 1]
    return value
