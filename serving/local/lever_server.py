"""The servers the LoRA lever and front-end benchmarks (``serving.bench.levers``) measure:
vLLM started the way the project starts it (``vllm_args`` through ``serving.local.run``) once
per lever, and stopped after. Here, not in ``serving.bench``: only the CLI, the demo and the
tests reach the local target."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from serving.bench.levers import Lever, Serve, Target
from serving.local import run as localrun
from serving.stack import stackfile


def spec_server(values: dict[str, Any], layout: Any, api_key: str, *, stack: str,
                extra_env: dict[str, str] | None = None,
                deadline_s: float | None = None) -> Serve:
    """A ``Serve`` that starts vLLM the way the project does (``vllm_args`` through
    ``serving.local.run``) for the stack ``values`` (un-namespaced config keys) plus the
    lever, on ``layout``, and stops it after."""
    @contextmanager
    def serve(lever: Lever) -> Iterator[Target]:
        merged = {**values, **lever.overrides}
        if lever.extra_args:
            merged["vllmExtraArgs"] = [*values.get("vllmExtraArgs", []), *lever.extra_args]
        spec = stackfile.from_values(merged, stack=stack)
        server = localrun.LocalServer(spec, layout)
        # A lever is a fresh server: one this layout started earlier (an interrupted run's,
        # still answering) has other settings, and ``start`` would hand it back as running.
        localrun.stop(server)
        started = time.monotonic()
        kwargs = {} if deadline_s is None else {"deadline_s": deadline_s}
        localrun.start(server, api_key, extra_env={**(extra_env or {}), **lever.env}, **kwargs)
        try:
            yield Target(server.endpoint, api_key, spec.model.served_name,
                         tuple(a.name for a in spec.adapters), time.monotonic() - started)
        finally:
            localrun.stop(server)

    return serve
