"""JSON from files an operator hands the tools (adapter configs, safetensors headers), read
within bounds.

Python's ``json`` accepts ``NaN``, ``Infinity`` and ``1e400`` (which becomes ``inf``), and
fails deep nesting with a ``RecursionError`` (or a stack overflow in other parsers); PEFT and
vLLM read the same files with the same module. So the size and nesting depth are checked
before parsing and non-finite numbers are refused while parsing: every case ends in a
``JsonLimitError`` that says what is allowed, in well under a second.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Strings (with their escapes) are skipped when counting the nesting depth.
_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")


class JsonLimitError(ValueError):
    """The text is not JSON within the limits; the message says which and what is allowed."""


def nesting_depth(data: bytes, limit: int) -> int:
    """The deepest nesting of ``data``, counting stops at ``limit + 1``."""
    brackets = _STRING_RE.sub(b"", data).translate(None, _BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


def _no_constant(name: str) -> Any:
    raise JsonLimitError(f"holds {name}; allowed: finite numbers only")


def _finite(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise JsonLimitError(f"holds the number {value[:40]}, which overflows to infinity; "
                             "allowed: finite numbers only")
    return number


def loads(data: bytes, *, max_bytes: int, max_depth: int) -> Any:
    """``data`` parsed as JSON, or JsonLimitError (too big, too deep, not JSON, not UTF-8,
    NaN/Infinity or numbers that overflow)."""
    if len(data) > max_bytes:
        raise JsonLimitError(f"is {len(data)} bytes; allowed: up to {max_bytes} bytes")
    depth = nesting_depth(data, max_depth)
    if depth > max_depth:
        raise JsonLimitError(f"nests deeper than {max_depth} levels; allowed: up to "
                             f"{max_depth}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonLimitError(f"is not UTF-8 ({exc.reason} at byte {exc.start}); allowed: "
                             "UTF-8 JSON") from None
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except JsonLimitError:
        raise
    except RecursionError:  # the depth count above makes this unreachable; kept as a bound
        raise JsonLimitError(f"nests too deep; allowed: up to {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise JsonLimitError(f"is not valid JSON: {exc}; allowed: JSON") from None
    except ValueError as exc:  # e.g. an integer with more digits than int() accepts
        raise JsonLimitError(f"is not usable JSON: {exc}; allowed: numbers that fit") from None
