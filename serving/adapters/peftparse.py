"""PEFT's own reading of an ``adapter_config.json``, once per distinct file.

Importing PEFT imports torch and transformers: 5-9 s on 2 cores, most of what a day-two
``adapters add`` took. PEFT's verdict on a config is a function of the file's bytes and of
PEFT's version, so it is kept in a small cache keyed by both (one file per verdict, written
atomically). A folder that `check-adapter`, a deploy's fetch or an earlier operation checked on
this machine is not parsed again; a new config still goes through PEFT, once. Every other check
of the config reads its JSON (``serving.adapters.checks``) and needs no PEFT.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

from serving.atomic import write_file

CACHE_ENV = "EXAONE_PEFT_CACHE_DIR"
CONFIG_FILE = "adapter_config.json"


def cache_dir() -> Path:
    """``$EXAONE_PEFT_CACHE_DIR``, else ``$XDG_CACHE_HOME`` (or ~/.cache)/exaone-serving/peft."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "exaone-serving", "peft")


def peft_version() -> str:
    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:
        return ""


def parse(data: bytes) -> str:
    """PEFT's verdict on a config file's bytes: empty when it reads a LoraConfig, else why not."""
    with tempfile.TemporaryDirectory(prefix="peft-config-") as folder:
        Path(folder, CONFIG_FILE).write_bytes(data)
        try:
            from peft import LoraConfig, PeftConfig

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = PeftConfig.from_pretrained(folder)
        except Exception as exc:
            return f"PEFT cannot read it: {type(exc).__name__}: {exc}"
    if not isinstance(config, LoraConfig):
        return f"PEFT reads it as {type(config).__name__}; allowed: LoraConfig"
    return ""


def verdict(config_path: Path) -> str:
    """``parse`` of the file at ``config_path``, from the cache when this PEFT saw these bytes."""
    data = config_path.read_bytes()
    version = peft_version()
    if not version:
        return "PEFT is not installed here; allowed: a Python environment with peft"
    entry = cache_dir() / f"{hashlib.sha256(data).hexdigest()}-peft-{version}.json"
    try:
        return str(json.loads(entry.read_text())["problem"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = parse(data)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_file(entry, json.dumps({"peft": version, "problem": found}).encode(), 0o644)
    except OSError:
        pass  # a read-only home: the verdict is simply not kept
    return found
