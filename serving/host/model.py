"""The base model on a VM: probe it, or fetch it at its pinned revision (host side).

    python -m serving.host.model probe --config FILE
    python -m serving.host.model fetch --config FILE [--account-url URL --client-id ID]
                                       [--secrets-stdin]

The model lands in ``<models>/<org>--<name>/<revision>`` (``Layout.model_path``): downloaded
into ``<that>.partial`` (kept between runs, so a cut download resumes), checked, given a
marker listing its files and sizes, then renamed into place in one step. vLLM only ever sees
a complete folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

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
from serving.stack.spec import Spec

MARKER = ".exaone-model.json"
ORIG_SUFFIX = ".orig"  # the EXAONE patch keeps the original remote code beside it


def model_dir(spec: Spec) -> Path:
    return Path(layouts.VM.model_path(spec))


def _files(folder: Path) -> dict[str, int]:
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != MARKER and not rel.startswith(".cache/"):
            out[rel] = path.stat().st_size
    return out


def probe(spec: Spec) -> dict[str, Any]:
    folder = model_dir(spec)
    marker = folder / MARKER
    want = {"source": spec.model.source, "revision": spec.model.revision}
    if not marker.is_file():
        partial = folder.with_name(folder.name + ".partial")
        return {"state": "missing", "path": str(folder), "partial": partial.is_dir()}
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {"state": "stale", "path": str(folder), "detail": f"marker unreadable: {exc}"}
    if {k: recorded.get(k) for k in want} != want:
        return {"state": "stale", "path": str(folder), "detail": "another source or revision"}
    for rel, size in recorded.get("files", {}).items():
        path = folder / rel
        orig = path.with_name(path.name + ORIG_SUFFIX)
        check = orig if orig.is_file() else path  # a patched file: its original must match
        if not check.is_file() or check.stat().st_size != size:
            return {"state": "stale", "path": str(folder), "detail": f"{rel} missing or changed"}
    return {"state": "present", "path": str(folder), "files": len(recorded.get("files", {}))}


def _verify(folder: Path) -> None:
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HostError(f"{config}: the model has no readable config.json ({exc})") from None
    if data.get("model_type") != "exaone":
        raise HostError(f"{config}: model_type is {data.get('model_type')!r}; allowed: exaone")
    if not any(folder.glob("*.safetensors")):
        raise HostError(f"{folder}: no *.safetensors weights")


def fetch_model(spec: Spec, args: argparse.Namespace) -> dict[str, Any]:
    folder = model_dir(spec)
    partial = folder.with_name(folder.name + ".partial")
    secret = secrets(args)
    started = time.monotonic()
    if spec.model.source_kind == "blob":
        try:
            counts = mirror(spec.model.source, partial, **blob_access(args, secret))
        except FetchError as exc:
            raise HostError(str(exc)) from None
    elif spec.model.source_kind == "hf":
        from huggingface_hub import snapshot_download

        # Resumable too: snapshot_download skips files already complete in local_dir.
        snapshot_download(spec.model.id, revision=spec.model.revision, local_dir=partial,
                          token=secret.get("hf_token") or None)
        shutil.rmtree(partial / ".cache", ignore_errors=True)
        counts = {"files": len(_files(partial))}
    else:
        raise HostError(f"modelSource {spec.model.source!r}: a VM fetches from hf or blob://")
    _verify(partial)
    marker = {"source": spec.model.source, "revision": spec.model.revision,
              "files": _files(partial)}
    (partial / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    publish(partial, folder)
    return {**counts, "path": str(folder), "seconds": round(time.monotonic() - started, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.host.model", description=__doc__)
    sub = p.add_subparsers(dest="op", required=True)
    add_common(sub.add_parser("probe"))
    q = sub.add_parser("fetch")
    add_common(q)
    add_blob(q)
    args = p.parse_args(argv)
    if args.op == "probe":
        return run(lambda: probe(spec_of(args)))
    return run(lambda: fetch_model(spec_of(args), args))


if __name__ == "__main__":
    sys.exit(main())
