"""Steps `adapters` (fetch + check the set before anything references it) and `record`
(after the health gate: record the set, remove what left it)."""

from __future__ import annotations

from typing import Any

from provisioning.bundle import host_python
from provisioning.remote import RemoteError
from provisioning.steps.converge import Skip, StepError, Target
from provisioning.steps.model import blob_args, stack_file

SYNC_TIMEOUT_SECONDS = 1800


class AdaptersStep:
    name = "adapters"

    def probe(self, t: Target) -> dict[str, str]:
        out = t.host.json(host_python("serving.host.adapters", "probe", "--config",
                                      stack_file(t)), sudo=True)
        return dict(out["adapters"])

    def plan(self, t: Target, state: dict[str, str]) -> list[str] | Skip:
        if not t.spec.adapters:
            return Skip("the stack has no adapters")
        by_key = {a.key: a for a in t.spec.adapters}
        return [f"fetch {key} from {by_key[key].source} ({status}), check sha256 and PEFT"
                for key, status in sorted(state.items()) if status != "present"]

    def apply(self, t: Target, actions: list[str], state: dict[str, str]) -> None:
        args, stdin = blob_args(t)
        try:
            done = t.host.json(host_python("serving.host.adapters", "sync", "--config",
                                           stack_file(t), *args),
                               sudo=True, stdin=stdin, lock=True, timeout_s=SYNC_TIMEOUT_SECONDS)
        except RemoteError as exc:
            raise StepError(self.name, str(exc)) from None
        t.say(f"adapters: installed {', '.join(done.get('installed', [])) or 'nothing'}")
        t.facts["adapters_changed"] = True


class RecordStep:
    name = "record"

    def probe(self, t: Target) -> dict[str, Any]:
        return t.host.json(host_python("serving.host.adapters", "record", "--config",
                                       stack_file(t), "--dry"), sudo=True)

    def plan(self, t: Target, state: dict[str, Any]) -> list[str]:
        return [*state.get("changes", []), *(f"remove {p}" for p in state.get("remove", []))]

    def apply(self, t: Target, actions: list[str], state: dict[str, Any]) -> None:
        t.host.json(host_python("serving.host.adapters", "record", "--config", stack_file(t)),
                    sudo=True, lock=True)
