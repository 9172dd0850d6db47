"""Target local: set up and run the spec's vLLM server on this machine's CPU.

``setup`` makes the tiny model, the sample adapters, the API key file and the vLLM venv;
``start`` runs exactly ``vllm_args.command``/``environment`` (plus the key in VLLM_API_KEY)
in the background with a log and a pid file and waits for /health; ``stop`` ends it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.adapters.client import VllmClient
from serving.adapters.ops import OperationError
from serving.render import vllm_args
from serving.stack.catalog import CPU_TORCH_VERSION
from serving.stack.errors import Problem, SpecError
from serving.stack.layout import API_KEY_ENV, Layout, vllm_port
from serving.stack.spec import Spec

INSTALL_SCRIPT = Path(__file__).resolve().parent / "scripts" / "install-vllm-cpu.sh"
START_DEADLINE_SECONDS = 240.0  # ~35-60 s on 2 cores; the first start also compiles
STOP_DEADLINE_SECONDS = 30.0
INSTALL_DEADLINE_SECONDS = 1800.0
ADAPTER_SEED_BASE = 101  # sample adapter i gets seed 101 + i: each answers differently
# The module vllm_args starts: the API server, or vLLM's CLI for several API servers.
ENTRYPOINT_MARKS = ("vllm.entrypoints.openai.api_server", "vllm.entrypoints.cli.main")
# Passed through from the caller's environment; everything else vLLM sees comes from the spec.
_PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER")
# "INFO 12-02 10:21:07 [api_server.py:1234] " and "(APIServer pid=123) " before a log message.
_LOG_PREFIX = re.compile(r"^(\(\w+ pid=\d+\)\s*)?([A-Z]+ \d\d-\d\d [\d:]+ \[[^\]]*\]\s*)?")


@dataclass(frozen=True)
class LocalServer:
    spec: Spec
    layout: Layout

    @property
    def endpoint(self) -> str:
        return f"http://{self.layout.host}:{vllm_port(self.spec)}"

    @property
    def pid_file(self) -> Path:
        return Path(self.layout.state_dir, "vllm.pid")

    @property
    def log_file(self) -> Path:
        return Path(self.layout.state_dir, "vllm.log")

    def pid(self) -> int | None:
        """The pid of our running server, or None (a stale pid file is ignored)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return None
        # A recycled pid belongs to someone else: only a vLLM server started from here counts.
        return pid if any(mark in cmdline for mark in ENTRYPOINT_MARKS) else None

    def client(self, api_key: str | None) -> VllmClient:
        return VllmClient(self.endpoint, api_key)


def setup_files(spec: Spec, layout: Layout, *, root: Path) -> list[str]:
    """The tiny model, the spec's sample adapters and the API key file; returns what was done."""
    from serving.local.loramaker import make_adapter
    from serving.local.tinymodel import make_tiny_model

    done: list[str] = []
    model = Path(layout.model_path(spec))
    make_tiny_model(model, model_id=spec.model.id)
    done.append(f"model {model}")
    for i, adapter in enumerate(spec.adapters):
        if adapter.source_kind != "path":
            raise SpecError([Problem(f"adapters[{i}].source",
                                     "target local makes sample adapters in local folders only")])
        dest = Path(layout.adapter_path(spec, adapter))
        make_adapter(dest, base=model, rank=adapter.rank, seed=ADAPTER_SEED_BASE + i,
                     base_model_id=spec.model.id)
        done.append(f"adapter {adapter.key} {dest}")
    if spec.api_key.kind == "file":
        key_file = Path(spec.api_key.name)
        key_file = key_file if key_file.is_absolute() else root / key_file
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32) + "\n")
            done.append(f"API key {key_file} (0600)")
    return done


# What `local reset` keeps: the model, the stack's sample adapters, the API key, the compile
# cache; the vLLM venv lives outside .local and is never touched.
_RUNTIME_STATE = ("adapters.json", "adapters.lock", "lora-resolver", "incoming", "demo",
                  "vllm.pid", "vllm.log", "base-observer")


def reset(server: LocalServer) -> list[str]:
    """The local target back to what `local setup` made, without reinstalling anything: stop
    the server this checkout started (a server it did not start is left alone), then remove
    the adapter record, the resolver folder, the demo's state, the log, and every adapter
    version that is not one of the stack's own. Returns what was done."""
    done = ["stopped the vLLM this checkout started"] if stop(server) else []
    state = Path(server.layout.state_dir)
    keep = {Path(server.layout.adapter_path(server.spec, a)) for a in server.spec.adapters}
    adapters = Path(server.layout.adapters_dir)
    for version in sorted(adapters.glob("*/*")):
        if version.is_dir() and version.resolve() not in {k.resolve() for k in keep}:
            shutil.rmtree(version)
            done.append(f"removed adapter {version.parent.name}/{version.name}")
    for name_dir in sorted(adapters.glob("*")):
        if name_dir.is_dir() and not any(name_dir.iterdir()):
            name_dir.rmdir()
    for name in _RUNTIME_STATE:
        path = state / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        done.append(f"removed {path}")
    return done


def install_venv(spec: Spec, layout: Layout, *,
                 on_phase: Callable[[str], None] | None = None) -> None:
    """The vLLM venv through the install script (a no-op when its marker holds the pins).
    ``on_phase`` hears each phase the script announces (its stdout lines); pip's errors go
    to stderr as they come."""
    proc = subprocess.Popen(
        ["bash", str(INSTALL_SCRIPT), layout.venv_dir, CPU_TORCH_VERSION, spec.vllm.version],
        stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    watchdog = threading.Timer(INSTALL_DEADLINE_SECONDS, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if on_phase is not None and line.strip():
                on_phase(line.strip())
        code = proc.wait()
    finally:
        watchdog.cancel()
    if code:
        raise SpecError([Problem(str(INSTALL_SCRIPT), f"failed with exit {code}")])


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def last_log_line(path: Path, offset: int = 0) -> str:
    """The newest line vLLM logged after ``offset``, without its level/time/file prefix."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(offset, path.stat().st_size - 4096))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        text = _LOG_PREFIX.sub("", line).strip()
        if text and not text.startswith("---"):
            return text
    return ""


def start(server: LocalServer, api_key: str, *,
          deadline_s: float = START_DEADLINE_SECONDS,
          extra_env: dict[str, str] | None = None,
          on_wait: Callable[[str], None] | None = None) -> int:
    """Start vLLM in the background and wait for /health; returns its pid. ``extra_env``
    adds to what vLLM sees (the GPU tier's PYTHONPATH to an offline vLLM install);
    ``on_wait`` hears, about once a second, the newest line of its log while it starts."""
    existing = server.pid()
    with server.client(api_key) as client:
        if existing is not None and client.health():
            return existing
        if existing is None and client.health():
            raise SpecError([Problem(server.endpoint, (
                "something else already answers /health there and it was not started from "
                f"this checkout (no {server.pid_file}); stop it or change vllmPort"
            ))])
    layout, spec = server.layout, server.spec
    if not Path(layout.python).is_file():
        raise SpecError([Problem(layout.python, "is missing; run `local setup` first")])
    for folder in (layout.state_dir, layout.cache_dir, layout.resolver_dir):
        Path(folder).mkdir(parents=True, exist_ok=True)
    env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
    env.update(vllm_args.environment(spec, layout))
    env.update(extra_env or {})
    env[API_KEY_ENV] = api_key
    argv = vllm_args.command(spec, layout)
    with open(server.log_file, "ab") as log:
        log.write(f"\n--- start {time.strftime('%Y-%m-%dT%H:%M:%S')} ---\n".encode())
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=layout.state_dir,
            start_new_session=True,  # its own process group: stop ends vLLM's workers too
        )
    server.pid_file.write_text(f"{proc.pid}\n")
    end = time.monotonic() + deadline_s
    with server.client(api_key) as client:
        while time.monotonic() < end:
            if proc.poll() is not None:
                server.pid_file.unlink(missing_ok=True)
                raise SpecError([Problem(str(server.log_file), (
                    f"vLLM exited with {proc.returncode} while starting; last lines:\n"
                    + _log_tail(server.log_file)
                ))])
            if client.health():
                return proc.pid
            if on_wait is not None:
                on_wait(f"pid {proc.pid}, waiting for /health; log: "
                        f"{last_log_line(server.log_file, offset) or '(nothing yet)'}")
            time.sleep(1.0)
    stop(server)
    raise SpecError([Problem(server.endpoint, (
        f"vLLM did not answer /health within {deadline_s:g} s; stopped it. Last log lines:\n"
        + _log_tail(server.log_file)
    ))])


def stop(server: LocalServer, *, deadline_s: float = STOP_DEADLINE_SECONDS) -> bool:
    """SIGTERM the server's process group, SIGKILL after the deadline; False if none ran."""
    pid = server.pid()
    if pid is None:
        server.pid_file.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and _group_alive(pid):
        time.sleep(0.25)
    if _group_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        kill_end = time.monotonic() + 10
        while time.monotonic() < kill_end and _group_alive(pid):
            time.sleep(0.1)
    server.pid_file.unlink(missing_ok=True)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # The leader may be a zombie of ours: reap it so the group can empty.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return _has_live_member(pgid)


def _has_live_member(pgid: int) -> bool:
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields[0] is the state, fields[2] the process group.
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def restarter(spec: Spec, layout: Layout, api_key: str | None) -> Callable[[], None]:
    """What the adapter tools call to restart this target's server after a failed load left
    its engine answering wrongly: stop and start it, when this checkout started it."""

    def restart() -> None:
        server = LocalServer(spec, layout)
        if server.pid() is None:
            raise OperationError(f"the server at {server.endpoint} was not started from this "
                                 "checkout; restart it by hand", changed=True)
        stop(server)
        start(server, api_key or "")

    return restart
