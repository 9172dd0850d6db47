"""Resolve the spec's API-key reference (``spec.api_key``) to the key itself.

The key never enters the spec or argv: it is read here, when a client or the local server
needs it, from the place the stack names (an environment variable, a file, or Pulumi's
encrypted config).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from serving.stack.errors import Problem, SpecError
from serving.stack.spec import SecretRef

PULUMI_TIMEOUT_SECONDS = 60
# Runs `pulumi config get`; replaced in tests (no pulumi CLI is needed for the other kinds).
Runner = Callable[[list[str]], str]


def _run_pulumi(argv: list[str]) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=PULUMI_TIMEOUT_SECONDS, check=False
    )
    if done.returncode:
        raise RuntimeError(done.stderr.strip() or f"exit {done.returncode}")
    return done.stdout


def resolve(
    ref: SecretRef,
    *,
    root: Path,
    stack: str = "",
    env: Mapping[str, str] | None = None,
    run: Runner | None = None,
) -> str:
    """The key ``ref`` points at; a SpecError naming the reference when it cannot be read.

    File paths are relative to ``root`` (the checkout); a file readable by group or others is
    refused, like ssh refuses a private key.
    """
    env = os.environ if env is None else env
    where = f"apiKeyRef {ref}"
    if ref.kind == "none":
        raise SpecError([Problem("apiKey", "is not set; allowed: apiKey (secret) or apiKeyRef")])
    if ref.kind == "env":
        value = env.get(ref.name, "")
        if not value.strip():
            raise SpecError([Problem(where, f"environment variable {ref.name} is unset or empty")])
        return value.strip()
    if ref.kind == "file":
        path = Path(ref.name) if Path(ref.name).is_absolute() else root / ref.name
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as exc:
            hint = " (`python -m serving local setup` creates it)" if not path.exists() else ""
            raise SpecError([Problem(where, f"cannot read {path}: {exc.strerror}{hint}")]) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SpecError([Problem(where, (
                f"{path} is readable by group or others (mode {stat.S_IMODE(mode):o}); "
                "allowed: 0600 (chmod 600)"
            ))])
        if not text.strip():
            raise SpecError([Problem(where, f"{path} is empty")])
        return text.strip()
    # kind == "pulumi": the encrypted stack config, through the pulumi CLI.
    runner = run or _run_pulumi
    if run is None and not shutil.which("pulumi"):
        raise SpecError([Problem("apiKey", (
            "is a Pulumi secret but no pulumi CLI is on PATH; install it, or point apiKeyRef "
            "at env:NAME / file:PATH"
        ))])
    try:
        value = runner(["pulumi", "config", "get", "apiKey", "--stack", stack])
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        raise SpecError([Problem("apiKey", f"pulumi config get failed: {exc}")]) from None
    if not value.strip():
        raise SpecError([Problem("apiKey", f"is empty in stack {stack!r}")])
    return value.strip()
