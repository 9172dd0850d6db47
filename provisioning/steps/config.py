"""Step `config`: the stack file and API key the host-side tools read, in /etc/exaone.

The stack file carries no secret (its apiKeyRef points at the root-only key file); the key
travels over stdin and is written with mode 0600.
"""

from __future__ import annotations

import hashlib

from provisioning.bundle import host_python
from provisioning.steps.converge import Target
from serving.stack import layout as layouts


def wanted(t: Target) -> dict[str, tuple[str, str]]:
    """path -> (content, octal mode)."""
    return {
        layouts.vm_stack_file(t.spec.stack): (t.settings.host_stack_document(), "644"),
        layouts.VM_API_KEY_FILE: (t.settings.api_key + "\n", "600"),
    }


def put(t: Target, path: str, content: str, mode: str) -> None:
    t.host.json(host_python("serving.host.files", "put", path, "--mode", mode), sudo=True,
                stdin=content)


def digests(t: Target, paths: list[str]) -> dict[str, str | None]:
    return t.host.json(host_python("serving.host.files", "probe", *paths), sudo=True)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ConfigStep:
    name = "config"

    def probe(self, t: Target) -> dict[str, str | None]:
        return digests(t, list(wanted(t)))

    def plan(self, t: Target, state: dict[str, str | None]) -> list[str]:
        return [f"write {path}" for path, (content, _) in wanted(t).items()
                if state.get(path) != sha(content)]

    def apply(self, t: Target, actions: list[str], state: dict[str, str | None]) -> None:
        for path, (content, mode) in wanted(t).items():
            if f"write {path}" in actions:
                put(t, path, content, mode)
