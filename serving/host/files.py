"""Small files on a VM (host side): digests to compare, and atomic writes from stdin.

    python -m serving.host.files probe PATH...          {"PATH": "<sha256>" | null, ...}
    python -m serving.host.files put PATH --mode 600    content from stdin, written atomically

Secrets (the API key, the unit's secret environment) arrive over stdin, so they are never in
argv or in a world-readable temporary file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from serving.atomic import write_file


def digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def put(path: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` to ``path`` (root-owned, ``mode``) unless it is already there."""
    if digest(path) == hashlib.sha256(data).hexdigest() and (path.stat().st_mode & 0o777) == mode:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, data, mode)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.host.files", description=__doc__)
    sub = p.add_subparsers(dest="op", required=True)
    q = sub.add_parser("probe")
    q.add_argument("paths", nargs="+")
    q = sub.add_parser("put")
    q.add_argument("path")
    q.add_argument("--mode", default="644")
    args = p.parse_args(argv)
    if args.op == "probe":
        print(json.dumps({p: digest(Path(p)) for p in args.paths}))
        return 0
    changed = put(Path(args.path), sys.stdin.buffer.read(), int(args.mode, 8))
    print(json.dumps({"changed": changed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
