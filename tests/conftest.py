"""Session fixtures: the tiny EXAONE-architecture model and good PEFT adapters, built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub; PEFT and transformers must stay on local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The run's deselected GPU tests, kept on the run's config rather than in this module.
_GPU_DESELECTED = pytest.StashKey[list[str]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tier 4 (marker ``gpu``) runs only when asked for (``-m gpu``): it needs a CUDA GPU and
    CUDA vLLM, which CPU CI does not have. Deselected, never skipped silently: the count and
    the reason are printed at the end of the run."""
    if "gpu" in (config.getoption("markexpr") or ""):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.stash[_GPU_DESELECTED] = [item.nodeid for item in gpu]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    deselected = config.stash.get(_GPU_DESELECTED, [])
    if deselected:
        terminalreporter.write_line(
            f"GPU tier: {len(deselected)} tests marked `gpu` were deselected (they need a "
            "CUDA GPU and CUDA vLLM; run `pytest -m gpu` on a GPU host, see README)")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from serving.local.tinymodel import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "exaone-3.5-tiny", seed=0)


@pytest.fixture(scope="session")
def good_adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters vLLM would serve on the tiny model: all 7 modules, attention only, rank_pattern."""
    from serving.local.loramaker import make_adapter
    from serving.local.tinymodel import DEFAULT_MODEL_ID
    from serving.stack.catalog import EXAONE_ATTN_MODULES

    root = tmp_path_factory.mktemp("adapters")
    common = {"base": tiny_model, "base_model_id": DEFAULT_MODEL_ID}
    return {
        "all-modules": make_adapter(root / "all-modules", rank=8, seed=1, **common),
        "attention-only": make_adapter(root / "attention-only", rank=16, seed=2,
                                       targets=EXAONE_ATTN_MODULES, **common),
        "rank-pattern": make_adapter(root / "rank-pattern", rank=8, seed=3,
                                     rank_pattern={"q_proj": 16, "c_proj": 4}, **common),
    }


@pytest.fixture(scope="session", autouse=True)
def peft_verdict_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PEFT's verdicts on adapter configs are cached per file (serving.adapters.peftparse):
    the run keeps its own cache, so no verdict of another run or of this machine's user
    decides a test (subprocesses inherit it)."""
    from serving.adapters.peftparse import CACHE_ENV

    folder = tmp_path_factory.mktemp("peft-verdicts")
    os.environ[CACHE_ENV] = str(folder)
    return folder
