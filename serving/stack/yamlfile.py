"""Read a small YAML file that a person wrote, with bounds, before trusting any of it.

A stack file is a few kilobytes. What is read is bounded before it is parsed in full: its
size (read no further than the limit), its encoding (UTF-8 only), its nesting depth, the
nodes it would expand to through aliases (an alias bomb is a few lines that expand to
billions of nodes), and the length of its integers. Keys that appear twice in one mapping
are an error: YAML loaders silently keep the last one, so ``production: true`` followed by
``production: false`` would lose the protection without a word. Every refusal is a
``YamlFileError`` with one line of text that names no value from the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 256 * 1024
MAX_DEPTH = 12
# Nodes after expanding every alias: a stack with 100 adapters is about 1,000.
MAX_NODES = 20_000
# Digits of an integer scalar; Python refuses to parse more than 4,300 and no setting
# needs more than a few.
MAX_INT_DIGITS = 18

# The C parser when PyYAML was built with libyaml (it is on the supported platforms).
_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlFileError(ValueError):
    """One line: what is wrong with the file and what is allowed."""


class _StrictLoader(_Loader):  # type: ignore[misc, valid-type]
    """SafeLoader that refuses duplicate keys and overlong integers."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlFileError(
                    f"uses a merge key '<<' (line {key_node.start_mark.line + 1}); "
                    "allowed: plain keys"
                )
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: let the constructor say so
                break
            if duplicate:
                raise YamlFileError(
                    f"key {_short(key)} appears twice in one mapping (line "
                    f"{key_node.start_mark.line + 1}); YAML keeps only the last: allowed: "
                    "each key once"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = str(node.value)
        digits = sum(ch.isdigit() for ch in text)
        if len(text) > MAX_INT_DIGITS + 2:
            raise YamlFileError(
                f"an integer of {digits} digits (line {node.start_mark.line + 1}); "
                f"allowed: at most {MAX_INT_DIGITS} digits"
            )
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text, 10)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)

# Plain scalars resolve as YAML 1.2's core schema does, as Pulumi reads the same file: only
# true/false are booleans (`yes`, `on` are text), integers are decimal, 0o or 0x (`19:00` is
# text, not the base-60 number 1140; `010` is ten), and dates are text.
_YAML11_ONLY = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                "tag:yaml.org,2002:timestamp")
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11_ONLY]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def _short(key: object) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_events(text: str) -> None:
    """Walk the parser's events once: nesting depth and the node count with every alias
    expanded, refused before anything is built."""
    depth = 0
    # One counter per open collection; the size of each anchored node once it is closed.
    open_sizes: list[tuple[int, str | None]] = []
    anchored: dict[str, int] = {}
    total = 0

    def add(count: int) -> None:
        nonlocal total
        total += count
        if open_sizes:
            size, anchor = open_sizes[-1]
            open_sizes[-1] = (size + count, anchor)
        if total > MAX_NODES:
            raise YamlFileError(
                f"expands to more than {MAX_NODES} nodes (aliases included); allowed: a "
                "stack's few settings"
            )

    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise YamlFileError(
                    f"nests deeper than {MAX_DEPTH} levels (line "
                    f"{event.start_mark.line + 1}); allowed: the shape of Pulumi.<stack>.yaml"
                )
            open_sizes.append((1, event.anchor))
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            size, anchor = open_sizes.pop()
            if anchor is not None:
                anchored[anchor] = size
            add(size)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                anchored[event.anchor] = 1
            add(1)
        elif isinstance(event, yaml.AliasEvent):
            add(anchored.get(event.anchor, 1))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # str(exc) quotes the offending line, which may hold a secret: name the place only.
    problem = getattr(exc, "problem", None) or type(exc).__name__
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"is not valid YAML: {problem}{where}"


def parse(text: str) -> Any:
    """The document in ``text``, within the bounds above."""
    if len(text) > MAX_BYTES:
        raise YamlFileError(f"is larger than {MAX_BYTES // 1024} KiB; allowed: a stack file")
    try:
        _check_events(text)
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise YamlFileError(_yaml_problem(exc)) from None
    except RecursionError:
        raise YamlFileError(f"nests too deeply; allowed: at most {MAX_DEPTH} levels") from None


def read(path: Path) -> Any:
    """The document in the file at ``path``: read no further than ``MAX_BYTES`` (a 50 MB
    file is refused after reading 256 KiB), decoded as UTF-8, then ``parse``d."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise YamlFileError(f"cannot be read: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise YamlFileError(f"is larger than {MAX_BYTES // 1024} KiB; allowed: a stack file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise YamlFileError(
            f"is not UTF-8 text (byte {exc.start}); allowed: a UTF-8 YAML file"
        ) from None
    return parse(text)
