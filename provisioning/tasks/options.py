"""What the host-facing tasks share: options, settings, connections, error reporting."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields
from typing import Any

from invoke.exceptions import Exit
from rich.console import Console

from provisioning import settings as settings_mod
from provisioning.remote import Host, RemoteError
from provisioning.settings import DeploySettings
from provisioning.steps.converge import StepError, StepResult, Target, converge
from serving.stack.errors import Problem, SpecError

# Host names, paths and messages are printed as written: no markup, no emoji codes.
console = Console(highlight=False, markup=False, emoji=False)

HELP = {
    "stack": "stack name: Pulumi.<STACK>.yaml (hosts from its outputs when pulumi is present)",
    "config": "a stack config file instead of --stack",
    "hosts": "user@address[:port],... (default: the stack's `hosts` output)",
    "blob_url": "Blob account URL (default: from the stack's storageAccount output)",
    "blob_connection_string_env": "environment variable holding a Blob connection string "
    "(instead of the VMs' managed identity; e.g. Azurite)",
    "connect_timeout": "seconds to wait for a host's SSH on first contact (default "
    f"{settings_mod.CONNECT_TIMEOUT_SECONDS:g}; a refused connection or unknown name fails at "
    "once)",
}


def fab_hosts(c: object, hosts: str) -> str:
    """--hosts, else the host Fabric was given with -H (one call per host)."""
    if hosts:
        return hosts
    host = getattr(c, "original_host", None) or getattr(c, "host", None)
    if host:
        user, port = getattr(c, "user", None), getattr(c, "port", 22)
        return f"{user}@{host}:{port}" if user else str(host)
    return ""


@contextmanager
def problems_exit() -> Iterator[None]:
    try:
        yield
    except SpecError as exc:
        raise Exit("\n".join(str(p) for p in exc.problems), code=2) from None
    except ValueError as exc:
        raise Exit(f"bad option: {exc}", code=2) from None


@dataclass(frozen=True)
class HostOptions:
    """The options every host-facing task takes, with their one default each. A task
    argument wins over the ``exaone:`` section of fabric.yaml (or any Fabric config file),
    which wins over these defaults."""

    stack: str = "dev"
    config: str = ""
    hosts: str = ""
    blob_url: str = ""
    blob_connection_string_env: str = ""
    connect_timeout: float = settings_mod.CONNECT_TIMEOUT_SECONDS

    @classmethod
    def of(cls, c: object, **given: Any) -> HostOptions:
        section: Any = {}
        config = getattr(c, "config", None)
        if config is not None:
            try:
                section = dict(config.get("exaone") or {})
            except (AttributeError, TypeError, ValueError):
                section = {}
            # Fabric's own `fab --connect-timeout N` (it lands in connect_kwargs.timeout), else
            # its config's timeouts.connect (fabric.yaml).
            fabric_timeout = None
            for path in (("connect_kwargs", "timeout"), ("timeouts", "connect")):
                with suppress(AttributeError, TypeError):
                    fabric_timeout = fabric_timeout or config.get(path[0], {}).get(path[1])
            if fabric_timeout and not section.get("connect_timeout"):
                section["connect_timeout"] = fabric_timeout
        values = {f.name: given.get(f.name) or section.get(f.name) or f.default
                  for f in fields(cls)}
        values["connect_timeout"] = float(values["connect_timeout"])
        return cls(**values)


def load(c: object, *, also: Sequence[Problem] = (), **kwargs: object) -> DeploySettings:
    """The deploy settings of a task's arguments (validated before any host is touched): its
    host options (``HostOptions``, with their precedence) and its own extra settings. ``also``:
    the task's own option problems, reported together with the settings' ones."""
    names = {f.name for f in fields(HostOptions)}
    o = HostOptions.of(c, **{k: v for k, v in kwargs.items() if k in names})
    extra = {k: v for k, v in kwargs.items() if k not in names}
    with problems_exit():
        try:
            s = _load(c, o, extra)
        except SpecError as exc:
            raise SpecError([*also, *exc.problems]) from None
        if also:
            raise SpecError(list(also))
        return s


def _load(c: object, o: HostOptions, extra: dict[str, Any]) -> DeploySettings:
    return settings_mod.load(stack=o.stack if not o.config else "", config=o.config,
                             hosts=fab_hosts(c, o.hosts), blob_url=o.blob_url,
                             blob_connection_string_env=o.blob_connection_string_env,
                             connect_timeout_s=o.connect_timeout, **extra)


def connector(s: DeploySettings, say: Callable[[str], None] | None = None
              ) -> Callable[[str], Host]:
    """Hosts of ``s``; ``say`` hears what a connection waits for (prefixed with the host)."""
    def connect(text: str) -> Host:
        tell = (lambda m: say(f"[{text}] {m}")) if say else (
            lambda m: console.print(f"[{text}] {m}", markup=False))
        return Host.connect(text, user=s.spec.vm.admin_user, key_file=s.ssh_key_file,
                            connect_timeout_s=s.connect_timeout_s, say=tell)

    return connect


@dataclass
class HostRun:
    """What one host's part of a task did: its step results, or the error that stopped it."""

    host: str
    results: list[StepResult]
    error: str = ""


def each_host(s: DeploySettings, body: Callable[[Target], None] | None = None, *,
              steps: tuple[Any, ...] = (), dry: bool = False) -> list[HostRun]:
    """Against the stack's hosts one at a time: converge ``steps``, then run ``body``; each
    host prefixes what it says with its name. The first host that fails stops the rest
    (they are not touched); its run keeps the results of the steps before the failure."""
    connect = connector(s)
    runs: list[HostRun] = []
    for name in s.hosts:
        host = connect(name)
        t = Target(host=host, spec=s.spec, settings=s, dry=dry,
                   say=lambda m, n=name: console.print(f"[{n}] {m}", markup=False))
        run = HostRun(name, [])
        try:
            for step in steps:
                run.results.append(converge(step, t))
            if body is not None:
                body(t)
        except (StepError, RemoteError) as exc:
            run.error = str(exc)
        finally:
            host.close()
        runs.append(run)
        if run.error:
            break
    return runs
