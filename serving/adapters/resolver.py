"""The folder vLLM's filesystem LoRA resolver reads: one entry per serving adapter name.

Why it exists: after an in-place reload (``load_inplace``) vLLM 0.32 keeps the flag on the
stored request, and its worker then reloads the adapter from disk on every engine step
(about -25% tokens/s on that adapter, upstream #41482/#36373). The only way to clear the flag
is to unload the name and load it again, which leaves a moment in which the name is not
loaded. With ``VLLM_LORA_RESOLVER_CACHE_DIR`` set, a request arriving in that moment makes
vLLM look for ``<dir>/<name>`` and load it from there instead of answering 404; this module
keeps ``<dir>/<name>`` pointing at the version the record says serves under ``name``.

vLLM's resolver accepts a folder only when its ``adapter_config.json`` names exactly the
model vLLM was started with (``--model``, a path here), while PEFT adapters name their Hub
base model. So an entry is its own small folder: ``adapter_config.json`` with that one field
rewritten, and symlinks to every other file of the version's folder (the weights are not
copied). ``<dir>/<name>`` is a symlink to the entry, swapped with one rename.

    <dir>/<name>                      -> .entries/<name>/<version>
    <dir>/.entries/<name>/<version>/  adapter_config.json (rewritten), adapter_model.* -> ...

After a restart the same folder serves one more purpose: a request for an adapter that was
added at runtime loads it on first use, before ``adapters reconcile`` has run.

vLLM joins the requested model name to the folder as given, so any API-key holder can make
it look at other paths; it loads only folders whose config names the served model's path,
and only these entries carry that name. Each reload takes a new adapter id in vLLM; the old
one leaves the CPU adapter cache (``--max-cpu-loras``) by LRU.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from serving.adapters.record import Served
from serving.atomic import replace_folder

ENTRIES = ".entries"
CONFIG = "adapter_config.json"


class ResolverError(RuntimeError):
    """An entry could not be written (unreadable adapter config, file system error)."""


def link(resolver_dir: Path | str, name: str) -> Path:
    return Path(resolver_dir, name)


def _entry(resolver_dir: Path, name: str, version: str) -> Path:
    return resolver_dir / ENTRIES / name / version


def published(resolver_dir: Path | str, name: str) -> str | None:
    """The version ``<dir>/<name>`` points at, or None when there is no entry."""
    target = link(resolver_dir, name)
    if not target.is_symlink():
        return None
    parts = Path(os.readlink(target)).parts
    return parts[-1] if len(parts) == 3 and parts[0] == ENTRIES and parts[1] == name else None


def _fill(entry: Path, version_dir: Path, base_model: str) -> None:
    try:
        config = json.loads((version_dir / CONFIG).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ResolverError(f"{version_dir / CONFIG}: {getattr(exc, 'strerror', None) or exc}"
                            ) from None
    if not isinstance(config, dict):
        raise ResolverError(f"{version_dir / CONFIG}: not a JSON object")
    config["base_model_name_or_path"] = base_model
    try:
        for item in sorted(version_dir.iterdir()):
            if item.name != CONFIG:
                (entry / item.name).symlink_to(item.resolve())
    except OSError as exc:
        raise ResolverError(f"{version_dir}: {exc.strerror or exc}") from None
    (entry / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (entry / CONFIG).chmod(0o644)


def _fresh(root: Path, name: str, version: str, source: Path, base_model: str) -> bool:
    """The entry of ``name``/``version`` exists, names ``base_model`` and has every file."""
    entry = _entry(root, name, version)
    config = entry / CONFIG
    try:
        files = [i.name for i in source.iterdir()]
    except OSError:
        return False
    return (config.is_file() and _config_base(config) == base_model
            and all((entry / f).exists() for f in files))


def _config_base(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def publish(resolver_dir: Path | str, name: str, version: str, version_dir: Path | str,
            base_model: str) -> bool:
    """Point ``<dir>/<name>`` at ``version``; True when anything changed."""
    root, source = Path(resolver_dir), Path(version_dir)
    changed = False
    if not _fresh(root, name, version, source, base_model):
        entry = _entry(root, name, version)
        try:
            for folder in (root, root / ENTRIES, entry.parent):
                folder.mkdir(parents=True, exist_ok=True)
                folder.chmod(0o755)  # vLLM runs as the service user; the tools as root
            replace_folder(entry, lambda staging: _fill(staging, source, base_model))
        except OSError as exc:
            raise ResolverError(f"{entry}: {exc}") from None
        changed = True
    if published(root, name) != version:
        tmp = root / f".{name}.link"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path(ENTRIES, name, version))
        os.replace(tmp, link(root, name))  # one rename: readers see the old or the new entry
        changed = True
    return changed


def withdraw(resolver_dir: Path | str, name: str) -> bool:
    """No entry for ``name`` any more; True when there was one."""
    root = Path(resolver_dir)
    target = link(root, name)
    existed = target.is_symlink() or target.exists() or (root / ENTRIES / name).exists()
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():  # not one of ours (entries are symlinks): still no entry
        shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(root / ENTRIES / name, ignore_errors=True)
    return existed


def _names(root: Path) -> set[str]:
    names = {p.name for p in root.iterdir() if not p.name.startswith(".")} if root.is_dir() \
        else set()
    entries = root / ENTRIES
    return names | ({p.name for p in entries.iterdir()} if entries.is_dir() else set())


def differences(resolver_dir: Path | str, serving: Mapping[str, Served],
                base_model: str) -> list[str]:
    """What ``sync`` would change, in words; empty when the folder already matches."""
    root = Path(resolver_dir)
    out = [] if root.is_dir() else [f"create {root}"]
    for name, served in sorted(serving.items()):
        if published(root, name) != served.version or \
                not _fresh(root, name, served.version, Path(served.path), base_model):
            out.append(f"resolver entry {name} -> {served.version}")
    out += [f"resolver entry {n} withdrawn" for n in sorted(_names(root) - set(serving))]
    return out


def sync(resolver_dir: Path | str, serving: Mapping[str, Served],
         base_model: str) -> list[str]:
    """Entries for exactly ``serving`` (the record's serving set); what changed, in words."""
    root = Path(resolver_dir)
    changes = differences(root, serving, base_model)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    broken: set[str] = set()
    for name, served in sorted(serving.items()):
        try:
            publish(root, name, served.version, served.path, base_model)
        except ResolverError as exc:
            # No entry beats a broken one: vLLM would try to load it on the next request.
            withdraw(root, name)
            broken.add(name)
            changes = [c for c in changes if not c.startswith(f"resolver entry {name} ")]
            changes.append(f"resolver entry {name} withdrawn: its version cannot be read "
                           f"({exc})")
            continue
        # A name keeps the entry of its current version only.
        for old in (root / ENTRIES / name).iterdir():
            if old.name != served.version:
                shutil.rmtree(old, ignore_errors=True)
    for name in sorted(_names(root) - set(serving) - broken):
        withdraw(root, name)
    return changes
