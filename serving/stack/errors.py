"""Problems found in user input, reported one per line, naming where they are."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

# Bad input: one line per problem on stderr, nothing changed.
EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where (a config key or a file) and what is allowed."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


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
