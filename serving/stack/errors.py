"""Problems found in user input, reported one per line, naming where they are."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TextIO

# Bad input: one line per problem on stderr, nothing changed.
EXIT_BAD_INPUT = 2

# Line breaks and other control characters (C0, DEL, C1, Unicode line/paragraph separators).
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` as one printable line: control characters (a newline in a file name, an
    escape sequence) are written as escapes, so user text cannot start a line of its own."""
    return _CONTROL_RE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where (a config key or a file) and what is allowed."""

    where: str
    message: str

    def __str__(self) -> str:
        return one_line(f"{self.where}: {self.message}")


class SpecError(Exception):
    """Raised with every problem found, before anything is written or created."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def report(self, stream: TextIO | None = None) -> int:
        """Print one line per problem, as given (never as markup); the exit code to use."""
        out = stream or sys.stderr
        for problem in self.problems:
            print(problem, file=out)
        return EXIT_BAD_INPUT
