"""The terminal output of the command-line tools: user text is printed as written.

Rich reads ``[...]`` as markup and ``:name:`` as an emoji code: a path such as
``runs/[red]x`` would be restyled or lost, ``exaone-serving:x:`` would become an emoji, and a
path holding a newline could print a line that looks like ``ok``. So these consoles parse
no markup, no emoji and no highlighting; a style is given as data (``marked``), never by
formatting user text into markup.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.text import Text

from serving.stack.errors import one_line


def console() -> Console:
    # Wide enough for the summary tables when the output is a file or a CI log.
    return Console(
        width=None if sys.stdout.isatty() else 160, markup=False, emoji=False, highlight=False
    )


def literal(text: object) -> Text:
    """User text as one literal line (control characters escaped)."""
    return Text(one_line(str(text)))


def marked(mark: str, style: str, text: object) -> Text:
    """``mark`` in ``style``, then ``text`` literally: ``✓ path``."""
    return Text.assemble((mark, style), " ", one_line(str(text)))
