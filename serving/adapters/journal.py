"""What an operation has done so far, so that a cut or failed one can say what it left.

An operation writes its intent (``serving.adapters.record.Intent``) before it changes
anything, watches every load and unload it sends, and on the way out decides:

- it ended verified, or was refused before changing anything: the intent is removed;
- a load failed (or loaded weights that then failed their check): the server is checked for
  collateral damage first (``AdapterOps._after_failed_load``);
- it was cut (connection lost, timeout, Ctrl-C, SIGTERM, a crash) after it changed something:
  the intent stays, and the message says what the record holds and what to run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from serving.adapters.client import VllmError


class Terminated(KeyboardInterrupt):
    """SIGTERM during an operation (the CLI turns the signal into this exception)."""


class WatchedClient:
    """A vLLM client that notes the loads and unloads sent through it."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.loads_sent = 0  # attempts, failed ones included
        self.changed = False  # a load or unload that vLLM accepted

    def load(self, name: str, path: str, *, inplace: bool = False) -> None:
        self.loads_sent += 1
        with self._outcome_unknown_when_cut():
            self.inner.load(name, path, inplace=inplace)
        self.changed = True

    def unload(self, name: str) -> None:
        with self._outcome_unknown_when_cut():
            self.inner.unload(name)
        self.changed = True

    @contextlib.contextmanager
    def _outcome_unknown_when_cut(self) -> Iterator[None]:
        """A call cut before its answer (timeout, reset) may have happened on the server."""
        try:
            yield
        except VllmError as exc:
            if is_cut(exc):
                self.changed = True
            raise
        except BaseException:
            self.changed = True
            raise

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


def cut_reason(exc: BaseException) -> str:
    """Why an operation stopped, in the operator's words."""
    if isinstance(exc, Terminated):
        return "stopped by SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(exc, VllmError):
        return exc.message
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def is_cut(exc: BaseException) -> bool:
    """An interruption rather than an answer: the server (or the operator) went away."""
    if isinstance(exc, VllmError):
        return exc.kind in ("unreachable", "protocol")
    return True
