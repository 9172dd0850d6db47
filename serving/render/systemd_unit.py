"""The vLLM systemd unit and its environment files, rendered from the spec.

The argv and environment come from ``serving.render.vllm_args``; this module only quotes them for
systemd and fills ``systemd/exaone-vllm.service.j2`` with values computed here. The API key
never enters a rendering: the deploy writes ``render_secret_env(key)`` to ``SECRET_ENV_FILE``
(root-owned, mode 0600), which systemd reads before it drops to the service user.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import jinja2

from serving.render import proxy, vllm_args
from serving.stack import layout as layouts
from serving.stack.layout import API_KEY_ENV, SERVICE_NAME, SERVICE_USER, Layout
from serving.stack.spec import Spec

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "systemd"
TEMPLATE = f"{SERVICE_NAME}.service.j2"

UNIT_NAME = f"{SERVICE_NAME}.service"
UNIT_FILE = f"/etc/systemd/system/{UNIT_NAME}"
ENV_NAME = f"{SERVICE_NAME}.env"
SECRET_ENV_NAME = f"{SERVICE_NAME}.secret.env"


def env_file(layout: Layout) -> str:
    """Non-secret environment (``render_env``)."""
    return f"{layout.config_dir}/{ENV_NAME}"


def secret_env_file(layout: Layout) -> str:
    """``VLLM_API_KEY=...`` (``render_secret_env``), written by the deploy with mode 0600."""
    return f"{layout.config_dir}/{SECRET_ENV_NAME}"


ENV_FILE = env_file(layouts.VM)
SECRET_ENV_FILE = secret_env_file(layouts.VM)

# A cold start (weights, torch.compile, CUDA graphs) takes minutes; a failure shows late.
RESTART_DELAY_SECONDS = 30
START_LIMIT_INTERVAL_SECONDS = 30 * 60
START_LIMIT_BURST = 4
# Drain: in-flight generations finish after SIGTERM before systemd sends SIGKILL.
STOP_TIMEOUT_SECONDS = 300
# vLLM raises its soft limit to 65535 itself; give it the hard limit to do so.
NOFILE_LIMIT = 65536

# Device groups from /proc/devices (major numbers are dynamic). The GPU and control nodes
# register as "nvidia-frontend", or as "nvidia" with some driver builds: an absent group is
# skipped by systemd. nvidia-uvm carries CUDA's unified memory and is required for compute.
NVIDIA_DEVICE_ALLOW = ("char-nvidia-frontend rw", "char-nvidia rw", "char-nvidia-uvm rw")
# NoNewPrivileges stops CUDA from running the setuid nvidia-modprobe that creates missing
# /dev/nvidia-uvm nodes; run it as root before start ('+'), tolerating its absence ('-').
NVIDIA_MODPROBE = ("/usr/bin/nvidia-modprobe", "-u", "-c0")
GPU_AFTER = ("nvidia-persistenced.service",)

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Words systemd takes literally without quotes (no quote, backslash, space, % or $).
_BARE_WORD_RE = re.compile(r"^[A-Za-z0-9_+=:,./@-]+$")
# C escapes systemd's command-line parser understands inside double quotes.
_C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
              "\v": "\\v"}


def quote_exec_word(word: str) -> str:
    """One argv item as a word of an ``Exec*=`` line (systemd.service(5)).

    Plain words stay bare; others are double-quoted, and inside the quotes systemd undoes C
    escapes. After unquoting systemd still expands ``%`` specifiers (when loading) and ``$``
    variables (when starting), so both are doubled everywhere. Quoting also keeps an item
    that is a lone ``;`` from being read as a command separator.
    """
    if "\0" in word:
        raise ValueError("an argv item cannot contain a NUL byte")
    if _BARE_WORD_RE.fullmatch(word):
        return word
    out = []
    for char in word:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char in _C_ESCAPES:
            out.append(_C_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        elif char in "%$":
            out.append(char * 2)
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def exec_line(argv: list[str]) -> str:
    """An ``Exec*=`` value, continued over lines: each option with its value on one line, and
    each further value (the ``--lora-modules`` items) on its own, so review diffs stay small."""
    if not argv or not PurePosixPath(argv[0]).is_absolute():
        raise ValueError(f"the unit's executable must be an absolute path, got {argv[:1]!r}")
    lines: list[list[str]] = []
    for word in argv:
        if not lines or word.startswith("-") or len(lines[-1]) > 1:
            lines.append([])
        lines[-1].append(quote_exec_word(word))
    return " \\\n    ".join(" ".join(line) for line in lines)


def quote_env_value(value: str) -> str:
    """A value for an ``EnvironmentFile=`` line (systemd.exec(5)), double-quoted.

    Within double quotes systemd drops a backslash before one of ``"\\`$`` and keeps the
    character; anything else, newlines included, is taken as is. The same text is valid for
    a POSIX shell's ``.``, so operators can source the file.
    """
    if "\0" in value:
        raise ValueError("an environment value cannot contain a NUL byte")
    return '"' + re.sub(r'(["\\`$])', r"\\\1", value) + '"'


def _env_lines(env: dict[str, str]) -> str:
    lines = []
    for name, value in env.items():
        if not _ENV_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        lines.append(f"{name}={quote_env_value(value)}\n")
    return "".join(lines)


def render_env(spec: Spec, layout: Layout = layouts.VM) -> str:
    """The non-secret environment file: exactly ``vllm_args.environment``, nothing else."""
    env = vllm_args.environment(spec, layout)
    if API_KEY_ENV in env:
        raise ValueError(f"{API_KEY_ENV} belongs in the secret file, not {env_file(layout)}")
    header = f"# {SERVICE_NAME} environment for stack {spec.stack}; rendered from the spec.\n"
    return header + _env_lines(env)


def render_secret_env(api_key: str) -> str:
    """The secret environment file's text. Write it with mode 0600, owned by root."""
    if not api_key:
        raise ValueError("the API key is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in api_key):
        # Most likely a trailing newline read from a file: clients would never match it.
        raise ValueError("the API key contains control characters (a trailing newline?)")
    return _env_lines({API_KEY_ENV: api_key})


def _ip_allow(spec: Spec) -> list[str]:
    """Behind the API proxy vLLM answers loopback only (the proxy and the host's own tools);
    the proxy's unit admits the client networks (``serving.render.proxy_unit``)."""
    if spec.on.api_proxy:
        return ["localhost"]
    return ["localhost", *proxy.client_networks(spec)]


def unit_context(spec: Spec, layout: Layout = layouts.VM) -> dict[str, object]:
    """Every value the template shows; the template adds only fixed sandbox settings."""
    gpu = not spec.vllm.cpu
    files = [env_file(layout)]
    if spec.api_key.kind != "none":
        # No '-' prefix: a missing key file must fail the start, not serve without a key.
        files.append(secret_env_file(layout))
    return {
        "stack": spec.stack,
        "description": (
            f"vLLM OpenAI-compatible server: {spec.model.id} with LoRA adapters "
            f"(stack {spec.stack})"
        ).replace("%", "%%"),
        "after": ["network-online.target", *(GPU_AFTER if gpu else ())],
        # The models folder may be its own mount (local NVMe): wait for it, and its parents.
        "mounts": [layout.models_dir, layout.adapters_dir, layout.cache_dir],
        "start_limit_interval_s": START_LIMIT_INTERVAL_SECONDS,
        "start_limit_burst": START_LIMIT_BURST,
        "user": SERVICE_USER,
        "group": SERVICE_USER,
        "working_directory": layout.state_dir,
        "environment_files": files,
        "exec_start_pre": ["-+" + exec_line(list(NVIDIA_MODPROBE))] if gpu else [],
        "exec_start": exec_line(vllm_args.command(spec, layout)),
        "restart_s": RESTART_DELAY_SECONDS,
        "stop_timeout_s": STOP_TIMEOUT_SECONDS,
        "nofile": NOFILE_LIMIT,
        "state_dir": layout.state_dir,
        "read_write_paths": [layout.cache_dir],
        "device_allow": list(NVIDIA_DEVICE_ALLOW) if gpu else [],
        "ip_address_allow": _ip_allow(spec),
    }


def template(name: str = TEMPLATE) -> jinja2.Template:
    """A unit template from ``systemd/``."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template(name)


def render_unit(spec: Spec, layout: Layout = layouts.VM) -> str:
    """The unit file's text for ``UNIT_FILE``."""
    return template().render(**unit_context(spec, layout))
