"""The adapter set on a VM (host side): probe, fetch + check, and record after a rollout.

    python -m serving.host.adapters probe  --config FILE
    python -m serving.host.adapters sync   --config FILE [--account-url URL --client-id ID]
                                           [--secrets-stdin]
    python -m serving.host.adapters record --config FILE [--dry]

``sync`` fetches every adapter of the spec that is not on disk with its pinned digest into a
staging folder, checks the sha256 and runs the spec's PEFT checks on ALL of them, and only
then renames each into ``<adapters>/<name>/<version>``: a bad adapter stops the rollout before
anything references it. ``record`` (after the service serves the new set) records the set as
current in the adapter record, points vLLM's resolver folder at it (serving.adapters.resolver)
and removes folders of names that left the set; versions in a name's history stay, so
``adapters rollback`` keeps working.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from serving.adapters import resolver as lora_resolver
from serving.adapters.checks import base_dims, check_adapter, check_spec_adapter
from serving.adapters.record import Record, RecordError, RecordStore, Served
from serving.host.blobfetch import FetchError, mirror
from serving.host.common import (
    HostError,
    add_blob,
    add_common,
    blob_access,
    publish,
    run,
    secrets,
    spec_of,
)
from serving.stack import layout as layouts
from serving.stack.digest import DigestError, digest_problem, folder_digest
from serving.stack.spec import AdapterSpec, Spec, name_problem, version_problem

STAGING = ".staging"


def adapter_dir(spec: Spec, adapter: AdapterSpec) -> Path:
    return Path(layouts.VM.adapter_path(spec, adapter))


def _state(spec: Spec, adapter: AdapterSpec) -> str:
    path = adapter_dir(spec, adapter)
    if not path.is_dir():
        return "missing"
    try:
        return "present" if folder_digest(path) == adapter.sha256 else "changed"
    except (DigestError, OSError):
        return "changed"


def probe(spec: Spec) -> dict[str, Any]:
    return {"adapters": {a.key: _state(spec, a) for a in spec.adapters}}


def _stage(url: str, name: str, version: str, args: argparse.Namespace,
           secret: dict[str, str]) -> tuple[Path, str]:
    """Mirror ``url`` into the staging folder of ``name``/``version``; (folder, its digest)."""
    stage = Path(layouts.VM.adapters_dir, STAGING, f"{name}--{version}")
    try:
        mirror(url, stage, workers=4, **blob_access(args, secret))
        return stage, folder_digest(stage)
    except (FetchError, DigestError, OSError) as exc:
        raise HostError(f"adapter {name}/{version}: {exc}") from None


def sync(spec: Spec, args: argparse.Namespace) -> dict[str, Any]:
    staging_root = Path(layouts.VM.adapters_dir, STAGING)
    secret = secrets(args)
    todo = [a for a in spec.adapters if _state(spec, a) != "present"]
    model_path = Path(layouts.VM.model_path(spec))
    staged: list[tuple[AdapterSpec, Path]] = []
    problems: list[str] = []
    for adapter in todo:
        if adapter.source_kind != "blob":
            raise HostError(f"adapter {adapter.key}: source {adapter.source!r}; a VM fetches "
                            "adapters from blob://")
        stage, digest = _stage(adapter.source, adapter.name, adapter.version, args, secret)
        if digest != adapter.sha256:
            problems.append(f"adapter {adapter.key} from {adapter.source}: sha256 is {digest}, "
                            f"the stack pins {adapter.sha256}; re-pin it or fix the upload")
            continue
        found = check_spec_adapter(spec, adapter, stage, model_path=model_path)
        problems += [f"adapter {adapter.key}: {p.message}" for p in found]
        staged.append((adapter, stage))
    if problems:
        shutil.rmtree(staging_root, ignore_errors=True)
        raise HostError("; ".join(problems) + " (nothing was installed; the service keeps "
                        "its current adapters)")
    for adapter, stage in staged:
        publish(stage, adapter_dir(spec, adapter))
    # A download cut by an error stays staged above, so the next run resumes it.
    shutil.rmtree(staging_root, ignore_errors=True)
    return {"installed": [a.key for a, _ in staged]}


def _differs(entry: Any, path: str, sha256: str) -> bool:
    """The record does not say that ``path`` with digest ``sha256`` serves under the name."""
    current = entry.current if entry is not None else None
    return current is None or current.path != path or current.sha256 != sha256


def _recorded(spec: Spec, record: Record) -> tuple[Record, list[str]]:
    """``record`` with the stack's set serving and names that left it removed, and what
    changed (empty when the record already says so)."""
    changes = []
    wanted = {a.name for a in spec.adapters}
    for adapter in spec.adapters:
        path = str(adapter_dir(spec, adapter))
        if _differs(record.entry(adapter.name), path, adapter.sha256):
            record = record.set_current(adapter.name, Served(adapter.version, path,
                                                             adapter.sha256), op="deploy")
            changes.append(f"record {adapter.key} as serving")
    for name, entry in sorted(record.entries.items()):
        if name not in wanted and entry.current is not None:
            record = record.remove(name)
            changes.append(f"record {name} as removed")
    return record, changes


def _removals(spec: Spec, record: Record) -> tuple[list[Path], list[Path]]:
    """(folders to remove, folders kept for now): folders of names that left the set, and
    versions no record entry can return to; except any folder vLLM may still read.

    ``record`` is the record before this rollout: a version it has serving may still be
    loaded (an adapter added at runtime stays loaded until a restart), and vLLM before 0.33
    re-reads an adapter loaded in place on every step, so deleting that folder kills the
    engine on the next request (``EngineDeadError``, seen). Such folders are kept; the next
    rollout removes them once the record no longer serves them."""
    wanted = {a.name for a in spec.adapters}
    keep: set[Path] = {adapter_dir(spec, a) for a in spec.adapters}
    live: set[Path] = {Path(s.path) for s in record.serving().values()}
    for name, entry in record.entries.items():
        if name in wanted:
            keep |= {Path(s.path) for s in (*entry.history, entry.current) if s}
    remove: list[Path] = []
    kept: list[Path] = []
    root = Path(layouts.VM.adapters_dir)
    if root.is_dir():
        for name_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name != STAGING):
            versions = [v for v in sorted(name_dir.iterdir()) if v.is_dir()]
            held = [v for v in versions if v in live and v not in keep]
            kept += held
            if name_dir.name not in wanted and not held:
                remove.append(name_dir)
                continue
            remove += [v for v in versions if v not in keep and v not in live]
    return remove, kept


def _resolver_changes(spec: Spec, record: Record, *, dry: bool) -> list[str]:
    """Make vLLM's resolver folder match the record's serving set (serving.adapters.resolver)."""
    folder = layouts.resolver_dir(spec, layouts.VM)
    if folder is None:
        return []
    model = layouts.VM.model_path(spec)
    if dry:
        return lora_resolver.differences(folder, record.serving(), model)
    return lora_resolver.sync(folder, record.serving(), model)


def record(spec: Spec, dry: bool) -> dict[str, Any]:
    try:
        return _record(spec, dry)
    except RecordError as exc:  # a damaged record: nothing written, the message says what to run
        raise HostError(f"{exc} (then deploy again)") from None


def _record(spec: Spec, dry: bool) -> dict[str, Any]:
    store = RecordStore(layouts.VM.state_dir)
    record = store.load()
    recorded, changes = _recorded(spec, record)
    changes += _resolver_changes(spec, recorded, dry=True)
    remove, kept = _removals(spec, record)
    held = [f"kept {p}: vLLM may still read it (the record had it serving); the next "
            "rollout removes it" for p in kept]
    if dry or not (changes or remove):
        return {"changes": changes + held, "remove": [str(p) for p in remove],
                "applied": False}
    with store.locked():
        record, changes = _recorded(spec, store.load())
        if changes:
            store.save(record)
        changes += _resolver_changes(spec, record, dry=False)
    for path in remove:
        shutil.rmtree(path)
    return {"changes": changes + held, "remove": [str(p) for p in remove], "applied": True}


def fetch_one(spec: Spec, args: argparse.Namespace) -> dict[str, Any]:
    """Day two: one version from Blob into ``<adapters>/NAME/VERSION``, checked like ``sync``
    (pinned digest, PEFT checks against the base model) before it is renamed into place."""
    problem = name_problem(args.name) or version_problem(args.version)
    if problem:
        raise HostError(f"adapter name or version {problem}")
    if digest_problem(args.sha256):
        raise HostError(f"--sha256 {digest_problem(args.sha256)}")
    dest = Path(layouts.VM.adapters_dir, args.name, args.version)
    if dest.is_dir() and folder_digest(dest) == args.sha256:
        return {"path": str(dest), "fetched": False}
    stage, digest = _stage(args.source, args.name, args.version, args, secrets(args))
    try:
        if digest != args.sha256:
            raise HostError(f"{args.source}: sha256 is {digest}, expected {args.sha256}")
        problems = check_adapter(stage, dims=base_dims(layouts.VM.model_path(spec)),
                                 base_model_id=spec.model.id, max_lora_rank=spec.max_lora_rank)
        if problems:
            raise HostError("; ".join(f"{p.where}: {p.message}" for p in problems))
        publish(stage, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"path": str(dest), "fetched": True}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.host.adapters", description=__doc__)
    sub = p.add_subparsers(dest="op", required=True)
    add_common(sub.add_parser("probe"))
    q = sub.add_parser("sync")
    add_common(q)
    add_blob(q)
    q = sub.add_parser("record")
    add_common(q)
    q.add_argument("--dry", action="store_true")
    q = sub.add_parser("fetch")
    add_common(q)
    add_blob(q)
    q.add_argument("name")
    q.add_argument("version")
    q.add_argument("--source", required=True, help="blob://container/path")
    q.add_argument("--sha256", required=True)
    args = p.parse_args(argv)
    if args.op == "fetch":
        return run(lambda: fetch_one(spec_of(args), args))
    if args.op == "probe":
        return run(lambda: probe(spec_of(args)))
    if args.op == "sync":
        return run(lambda: sync(spec_of(args), args))
    return run(lambda: record(spec_of(args), args.dry))


if __name__ == "__main__":
    sys.exit(main())
