"""Tier 1: `local reset` brings the local target back to what setup made, keeping the model,
the sample adapters, the key and the venv, and leaves a server it did not start alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from serving.local import run as localrun
from serving.stack import layout as layouts
from serving.stack import stackfile


def test_reset_forgets_runtime_state_and_keeps_what_setup_made(tmp_path: Path) -> None:
    spec = stackfile.load(stack="local")
    layout = layouts.local(tmp_path)
    server = localrun.LocalServer(spec, layout)
    state = Path(layout.state_dir)
    samples = [Path(layout.adapter_path(spec, a)) for a in spec.adapters]
    for folder in samples:
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
    added = Path(layout.adapters_dir, "summarise", "1")
    added.mkdir(parents=True)
    for name in ("adapters.json", "vllm.log", "api-key"):
        (state / name).write_text("x")
    for name in ("lora-resolver/summarise", "demo/adapters", "models/m", "cache/c"):
        (state / name).mkdir(parents=True)
    # A vLLM-looking process that this checkout did not start: no pid file names it.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              localrun.ENTRYPOINT_MARKS[0]])
    try:
        done = localrun.reset(server)
        assert other.poll() is None, "reset stopped a server it did not start"
    finally:
        other.kill()
        other.wait()
    assert all(folder.is_dir() for folder in samples)
    assert not added.exists() and not added.parent.exists()
    for gone in ("adapters.json", "vllm.log", "lora-resolver", "demo"):
        assert not (state / gone).exists(), gone
    for kept in ("api-key", "models/m", "cache/c"):
        assert (state / kept).exists(), kept
    assert "removed adapter summarise/1" in done
    assert localrun.reset(server) == []
