"""The health gate, run on the VM against its own vLLM (host side).

    python -m serving.host.health --config FILE [--timeout-s SECONDS]

Passes when, within the deadline: ``/health`` answers 200; ``/v1/models`` lists exactly the
served base model and the stack's adapter set (each from its versioned folder); and one
greedy completion per model answers, each adapter's differently from the base model's (vLLM
has been seen to report an adapter loaded while the base model answers for it); and the API
proxy on the API port answers /health and refuses the LoRA admin routes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from serving.adapters.client import VllmClient, VllmError
from serving.adapters.ops import OperationError, probe_answer
from serving.host.common import HostError, add_common, run, spec_of
from serving.stack import layout as layouts
from serving.stack import secretref
from serving.stack.balancer import OUT_OF_ROTATION_FILE
from serving.stack.spec import Spec
from serving.stack.stackfile import ROOT

POLL_SECONDS = 2.0
DEFAULT_TIMEOUT_SECONDS = 900
JOURNAL_LINES = 25


def _unit() -> dict[str, str]:
    done = subprocess.run(["systemctl", "show", f"{layouts.SERVICE_NAME}.service", "-p",
                           "ActiveState", "-p", "NRestarts"], capture_output=True, text=True,
                          check=False, timeout=30)
    out = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return {"ActiveState": out.get("ActiveState", ""), "NRestarts": out.get("NRestarts", "")}


def _journal_tail(lines: int = JOURNAL_LINES) -> str:
    done = subprocess.run(["journalctl", "-u", f"{layouts.SERVICE_NAME}.service", "-n",
                           str(lines), "--no-pager", "-o", "cat"], capture_output=True,
                          text=True, check=False, timeout=30)
    return done.stdout.strip() or done.stderr.strip()


# A name no stack can hold (names are lowercase): were the route open, nothing would change.
_ADMIN_PROBE_NAME = "Health-Gate-Probe"


def check_proxy(spec: Spec, key: str | None) -> str:
    """Through the API proxy, as a client with the key: /health answers 200 and vLLM's LoRA
    admin route is refused with 403 (``serving.render.proxy``)."""
    if not spec.on.api_proxy:
        return "no proxy on this target"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"http://127.0.0.1:{spec.vllm.port}"
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            health = client.get("/health").status_code
            admin = client.post("/v1/unload_lora_adapter",
                                json={"lora_name": _ADMIN_PROBE_NAME}).status_code
    except httpx.HTTPError as exc:
        raise HostError(f"the API proxy on port {spec.vllm.port} does not answer ({exc}); see "
                        f"`journalctl -u {layouts.PROXY_SERVICE_NAME}` on the host") from None
    # While the rollout holds the host out of the load balancer's rotation the proxy answers
    # the probe 503 on purpose (serving.stack.balancer); the rollout checks 200 as it puts the
    # host back.
    out = Path(OUT_OF_ROTATION_FILE).exists()
    if health != (503 if out else 200):
        raise HostError(f"/health through the API proxy answered {health}, not "
                        f"{'503 (out of rotation)' if out else '200'}")
    if admin != 403:
        raise HostError(f"the API port lets clients reach vLLM's adapter admin routes "
                        f"(/v1/unload_lora_adapter answered {admin}, not 403)")
    return "inference routes only" + (" (out of rotation)" if out else "")


def check(spec: Spec, timeout_s: float) -> dict[str, Any]:
    key = secretref.resolve(spec.api_key, root=ROOT) if spec.api_key.kind != "none" else None
    started = time.monotonic()
    deadline = started + timeout_s
    restarts = _unit()["NRestarts"]
    with VllmClient(f"http://127.0.0.1:{layouts.vllm_port(spec)}", key) as client:
        while not client.health():
            unit = _unit()
            # Fail at the first crash instead of waiting out the deadline: each restart loads
            # the model again, and the start limit ends in `failed` minutes later.
            if unit["ActiveState"] == "failed" or unit["NRestarts"] != restarts:
                raise HostError(f"{layouts.SERVICE_NAME} crashed while starting "
                                f"({unit['ActiveState']}, {unit['NRestarts']} restarts); its "
                                f"journal ends:\n{_journal_tail()}")
            if time.monotonic() > deadline:
                raise HostError(f"/health did not answer 200 within {timeout_s:.0f} s; see "
                                f"`journalctl -u {layouts.SERVICE_NAME}` on the host")
            time.sleep(POLL_SECONDS)
        ready_s = time.monotonic() - started
        try:
            cards = client.models()
            base = spec.model.served_name
            found = {c.id: c.root for c in cards if c.is_adapter}
            want = {a.name: layouts.VM.adapter_path(spec, a) for a in spec.adapters}
            bases = [c.id for c in cards if not c.is_adapter]
            problems = []
            if bases != [base]:
                problems.append(f"base models {bases}, expected [{base!r}]")
            for name in sorted(set(want) - set(found)):
                problems.append(f"{name} is not loaded")
            for name in sorted(set(found) - set(want)):
                problems.append(f"{name} is loaded but not in the stack (remove it with "
                                "`fab adapters.remove`, or add it to the stack)")
            for name in sorted(set(want) & set(found)):
                if found[name] != want[name]:
                    problems.append(f"{name} serves {found[name]}, the stack wants {want[name]}")
            if problems:
                raise HostError("/v1/models: " + "; ".join(problems))
            probes = {model: probe_answer(client, model) for model in [base, *sorted(want)]}
            answers = {model: probe.text for model, probe in probes.items()}
            same = [n for n in want if probes[n].same(probes[base])]
            if same:
                raise HostError(f"{', '.join(sorted(same))} answer(s) like the base model: the "
                                "adapter weights are not what serves")
        except VllmError as exc:
            raise HostError(exc.message) from None
        except OperationError as exc:
            raise HostError(exc.message) from None
    proxied = check_proxy(spec, key)
    return {"ready_s": round(ready_s, 1), "answers": answers, "proxy": proxied,
            "seconds": round(time.monotonic() - started, 1)}


def status(spec: Spec) -> dict[str, Any]:
    """Read-only: does it answer, and which models does it serve (for `fab status`)."""
    key = secretref.resolve(spec.api_key, root=ROOT) if spec.api_key.kind != "none" else None
    with VllmClient(f"http://127.0.0.1:{layouts.vllm_port(spec)}", key) as client:
        if not client.health():
            return {"health": False, "models": [], "adapters": []}
        try:
            cards = client.models()
        except VllmError as exc:
            return {"health": True, "error": exc.message, "models": [], "adapters": []}
    return {"health": True, "models": [c.id for c in cards if not c.is_adapter],
            "adapters": sorted(c.id for c in cards if c.is_adapter)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.host.health", description=__doc__)
    add_common(p)
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_SECONDS)
    p.add_argument("--status", action="store_true", help="only report, never wait")
    args = p.parse_args(argv)
    if args.status:
        return run(lambda: status(spec_of(args)))
    return run(lambda: check(spec_of(args), args.timeout_s))


if __name__ == "__main__":
    sys.exit(main())
