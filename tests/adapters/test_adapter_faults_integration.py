"""Tier 3: runtime faults against a real vLLM CPU server, where the harm happened.

NaN weights reaching vLLM, failed loads, a version folder deleted while vLLM re-reads it, an
operation stopped by SIGTERM after the record named the new version. One server for the
module (its own folder and port); the NaN test restarts it through the tools' own restart
when it finds the server harmed. Remove after a restart is tested with the restart of
test_adapters_integration.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_server import serve_local_copy
from safetensors.torch import load_file, save_file

from serving.adapters import cli as adapters_cli
from serving.adapters.client import VllmClient, VllmError
from serving.adapters.ops import PROBE_MAX_TOKENS, PROBE_PROMPT, AdapterOps, OperationError
from serving.adapters.record import RecordStore
from serving.local import run as localrun
from serving.local.loramaker import make_adapter
from serving.stack.spec import Spec

pytestmark = pytest.mark.integration


@dataclasses.dataclass
class Env:
    spec: Spec
    server: localrun.LocalServer
    key: str
    root: Path
    ops: AdapterOps

    def version(self, name: str, version: str, seed: int) -> Path:
        return make_adapter(self.root / "incoming" / name / version,
                            base=Path(self.server.layout.model_path(self.spec)), rank=8,
                            seed=seed, base_model_id=self.spec.model.id)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("faults-root")
    with serve_local_copy(root, "ifault") as served:
        client = VllmClient(served.server.endpoint, served.key)
        ops = AdapterOps(served.spec, served.layout, client, RecordStore(served.layout.state_dir))
        env = Env(served.spec, served.server, served.key, root, ops)
        ops.restart = localrun.restarter(served.spec, served.layout, served.key)
        try:
            yield env
        finally:
            client.close()


def _poison(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    for key in tensors:
        if "lora_B" in key:
            tensors[key].view(-1)[0] = math.nan
    save_file(tensors, str(weights))


def _answers(env: Env) -> dict[str, str]:
    names = [env.spec.model.served_name, *sorted(env.ops.client.adapters())]
    return {n: env.ops.probe(n).text for n in names if not n.startswith("_")}


def test_nan_adapter_is_refused_before_vllm_sees_it(env: Env) -> None:
    folder = env.version("ifault-nan", "1", seed=11)
    _poison(folder)
    before = env.ops.client.adapters()
    with pytest.raises(OperationError, match=r"adapter_model\.safetensors: NaN or infinite") as no:
        env.ops.add("ifault-nan", "1", folder)
    assert not no.value.changed and not no.value.rolled_back
    assert env.ops.client.adapters() == before
    assert not env.ops.version_path("ifault-nan", "1").exists()


def test_nan_weights_swapped_in_leave_every_model_answering_as_before(env: Env) -> None:
    """The weights turn to NaN on disk between the check and the in-place swap (what vLLM's
    re-read from disk picks up): the swap fails, the old version comes back, and then the
    base model and the other adapters must answer as before: restarted if they do not."""
    env.ops.add("ifault-hot", "1", env.version("ifault-hot", "1", seed=21))
    before = _answers(env)
    new = env.ops.version_path("ifault-hot", "2")
    with pytest.raises(OperationError) as failed:
        env.ops.hotfix("ifault-hot", "2", env.version("ifault-hot", "2", seed=22),
                       on_staged=lambda: _poison(new))
    assert failed.value.rolled_back and not failed.value.changed, failed.value.message
    assert _answers(env) == before
    record = env.ops.store.load()
    assert record.entries["ifault-hot"].current.version == "1"
    assert all(s.verified for s in record.serving().values())
    assert env.ops.store.pending() is None
    assert not new.exists()  # refused: the number can be used again
    env.ops.hotfix("ifault-hot", "2", env.version("ifault-hot", "2b", seed=23))


def test_nan_loaded_by_hand_is_found_by_reconcile(env: Env) -> None:
    """A key holder loads NaN weights through the API (the tools never would). Seen on vLLM
    CPU 0.32: after a request used them, every model answers that prompt with 400 ("Out of
    range float values are not JSON compliant"), the base model too, until they are
    unloaded. reconcile unloads the unknown name first,
    then finds the base model answering as recorded again (a restart only if it did not)."""
    before = _answers(env)
    folder = env.version("ifault-hand", "1", seed=31)
    _poison(folder)
    env.ops.client.load("ifault-hand", str(folder))
    # The harm starts with a request to them; the same prompt then fails for every model,
    # the base model too (the prefix cache holds what the NaN weights computed, it seems;
    # other prompts answer): the answer check's own prompt is what a client sends here.
    with pytest.raises(VllmError):
        env.ops.client.complete("ifault-hand", PROBE_PROMPT, max_tokens=PROBE_MAX_TOKENS,
                                logprobs=1)
    harmed = _answers_safe(env, before)
    assert harmed != before, "the fault did not reproduce: NaN weights harmed nothing"
    outcome = env.ops.reconcile()
    assert "unloaded ifault-hand (removed in the record)" in outcome.actions
    assert "ifault-hand" not in env.ops.client.adapters()
    assert _answers(env) == before


def _answers_safe(env: Env, like: dict[str, str]) -> dict[str, str]:
    out = {}
    for name in like:
        try:
            out[name] = env.ops.probe(name).text
        except (OperationError, VllmError) as exc:
            out[name] = f"error: {exc}"
    return out


def test_deleted_folder_of_an_unsettled_version_does_not_kill_vllm(env: Env) -> None:
    env.ops.add("ifault-gone", "1", env.version("ifault-gone", "1", seed=41))
    source = env.version("ifault-gone", "2", seed=42)
    wait = env.ops.settle_wait_s
    env.ops.settle_wait_s = 0  # left unsettled: vLLM 0.32 re-reads it on every step
    try:
        env.ops.hotfix("ifault-gone", "2", source)
    finally:
        env.ops.settle_wait_s = wait
    assert not env.ops.store.load().entries["ifault-gone"].current.settled
    folder = env.ops.version_path("ifault-gone", "2")
    shutil.rmtree(folder)  # by hand
    with pytest.raises(OperationError, match=r"its folder .* is missing"):
        env.ops.reconcile()
    assert env.ops.client.health()
    assert env.ops.probe(env.spec.model.served_name).text  # the engine lives
    with pytest.raises(VllmError) as gone:
        env.ops.client.complete("ifault-gone", "Hello!", max_tokens=1)
    assert gone.value.kind == "unknown_adapter"
    shutil.copytree(source, folder)
    env.ops.reconcile()
    assert env.ops.client.adapters()["ifault-gone"] == str(folder)


def test_sigterm_after_the_record_changed_says_what_is_recorded_and_what_to_run(
        env: Env) -> None:
    """The attack run's kill after the record was saved: a real SIGTERM to this process,
    through the CLI's own handler, while the hotfix waits to settle (the record already
    names version 2). The CLI maps the OperationError(changed) to exit 4."""
    env.ops.add("ifault-cut", "1", env.version("ifault-cut", "1", seed=51))
    source = env.version("ifault-cut", "2", seed=52)
    stop = threading.Event()

    def busy() -> None:  # keeps the settle waiting for a pause
        with VllmClient(env.server.endpoint, env.key) as client:
            while not stop.is_set():
                try:
                    client.complete("ifault-cut", "Hello!", max_tokens=16, ignore_eos=True)
                except VllmError:
                    time.sleep(0.05)

    def kill_when_recorded() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not stop.is_set():
            current = env.ops.store.load().entries["ifault-cut"].current
            if current is not None and current.version == "2":
                time.sleep(1.0)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.2)

    threads = [threading.Thread(target=busy, daemon=True),
               threading.Thread(target=kill_when_recorded, daemon=True)]
    wait = env.ops.settle_wait_s
    env.ops.settle_wait_s = 120.0
    try:
        with adapters_cli._sigterm_interrupts(), pytest.raises(OperationError) as cut:
            for thread in threads:
                thread.start()
            env.ops.hotfix("ifault-cut", "2", source)
    finally:
        env.ops.settle_wait_s = wait
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    message = cut.value.message
    assert cut.value.changed, message
    assert "stopped by SIGTERM" in message
    assert "the record says ifault-cut serves version 2 (loaded in place, not settled)" in message
    assert "run `adapters reconcile`" in message
    with pytest.raises(OperationError, match="an earlier `adapters hotfix ifault-cut 2`"):
        env.ops.rollback("ifault-cut")
    env.ops.reconcile()
    assert env.ops.store.pending() is None
    assert env.ops.store.load().entries["ifault-cut"].current.settled
