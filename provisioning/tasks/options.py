"""What the host-facing tasks share: options, settings, connections, error reporting."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from invoke.exceptions import Exit
from rich.console import Console

from provisioning import settings as settings_mod
from provisioning.remote import Host
from provisioning.settings import DeploySettings
from serving.stack.errors import SpecError

console = Console(highlight=False)

HELP = {
    "stack": "stack name: Pulumi.<STACK>.yaml (hosts from its outputs when pulumi is present)",
    "config": "a stack config file instead of --stack",
    "hosts": "user@address[:port],... (default: the stack's `hosts` output)",
    "blob_url": "Blob account URL (default: from the stack's storageAccount output)",
    "blob_connection_string_env": "environment variable holding a Blob connection string "
    "(instead of the VMs' managed identity; e.g. Azurite)",
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


def load(c: object, *, stack: str, config: str, hosts: str, blob_url: str = "",
         blob_connection_string_env: str = "", **kwargs: object) -> DeploySettings:
    with problems_exit():
        return settings_mod.load(stack=stack if not config else "", config=config,
                                 hosts=fab_hosts(c, hosts), blob_url=blob_url,
                                 blob_connection_string_env=blob_connection_string_env,
                                 **kwargs)


def connector(s: DeploySettings) -> Callable[[str], Host]:
    def connect(text: str) -> Host:
        return Host.connect(text, user=s.spec.vm.admin_user, key_file=s.ssh_key_file)

    return connect
