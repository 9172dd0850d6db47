"""The Pulumi CLI's own checks of a project's config schema against a stack file, which run
before any program does (and which ``pulumi.runtime.set_mocks`` never applies).

Written from the CLI's documented behaviour (project file reference, "Configuration" concepts)
and its workspace package:

- a stack file's config keys are ``<namespace>:<name>``; anything else does not parse;
- a project key in another namespace (``aws:region``) may give a value but not a type;
- every declared key of the project's namespace that the stack leaves unset takes the
  declared default, as plain text; with no default it is reported missing (all at once);
- then, for every explicitly typed key: a key declared ``secret: true`` must hold an encrypted
  (``secure:``) value, else "must be encrypted as it's secret"; the value must be of its type:
  string, integer (an int or text that parses as one), boolean (true/false or that text), or an
  array whose items are of the items' type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_KEY_RE = re.compile(r"^[^:\s]+:[^:\s]+$")


@dataclass(frozen=True)
class StackValue:
    value: Any
    secure: bool


def _stack_value(raw: Any) -> StackValue:
    if isinstance(raw, dict) and set(raw) == {"secure"}:
        return StackValue(raw["secure"], True)
    return StackValue(raw, False)


def _of_type(type_name: str, items: dict[str, Any] | None, value: Any) -> bool:
    if type_name == "string":
        return isinstance(value, str)
    if type_name == "integer":
        if isinstance(value, bool):
            return False
        if isinstance(value, int):
            return True
        return isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value) is not None
    if type_name == "boolean":
        return isinstance(value, bool) or value in ("true", "false")
    if type_name == "array":
        return isinstance(value, list) and items is not None and all(
            _of_type(items["type"], items.get("items"), v) for v in value)
    return False


def _as_text(value: Any) -> Any:
    """A primitive stack value reaches the check as its text (YAML 1 -> "1", true -> "true");
    lists and maps stay structured."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def config_errors(project: dict[str, Any], stack_name: str, stack: dict[str, Any]) -> list[str]:
    """What ``pulumi up`` / ``preview`` would refuse before running the program; [] if none."""
    name = str(project["name"])
    errors: list[str] = []
    declared: dict[str, dict[str, Any]] = {}
    for key, decl in (project.get("config") or {}).items():
        decl = decl if isinstance(decl, dict) else {"default": decl}
        namespace, _, short = key.rpartition(":")
        if namespace and namespace != name:
            if "type" in decl:
                errors.append(f"Configuration key '{key}' is not namespaced by the project "
                              "and should not define a type")
            continue
        declared[short] = decl
        if "default" in decl and "type" in decl and not _of_type(
                decl["type"], decl.get("items"), decl["default"]):
            errors.append(f"The default value specified for configuration key '{key}' is not "
                          f"of the expected type '{decl['type']}'")

    values: dict[str, StackValue] = {}
    for key, raw in ((stack or {}).get("config") or {}).items():
        if not _KEY_RE.match(str(key)):
            errors.append(f"could not parse {key} as a configuration key (configuration keys "
                          "should be of the form `<namespace>:<name>`)")
            continue
        namespace, _, short = str(key).partition(":")
        if namespace == name:
            values[short] = _stack_value(raw)

    missing = []
    for short, decl in declared.items():
        if short not in values:
            if "default" in decl or "value" in decl:
                values[short] = StackValue(decl.get("default", decl.get("value")), False)
            else:
                missing.append(f"{name}:{short}")
    if missing:
        listed = ", ".join(f"'{m}'" for m in sorted(missing))
        errors.append(f"Stack '{stack_name}' is missing configuration "
                      f"value{'s' if len(missing) > 1 else ''} {listed}")
        return errors

    for short in sorted(declared):
        decl, value = declared[short], values[short]
        if "type" not in decl:
            continue
        if decl.get("secret") and not value.secure:
            errors.append(f"Stack '{stack_name}' with configuration key '{short}' must be "
                          "encrypted as it's secret")
            continue
        if not value.secure and not _of_type(decl["type"], decl.get("items"),
                                             _as_text(value.value)):
            errors.append(f"Stack '{stack_name}' with configuration key '{short}' must be of "
                          f"type '{decl['type']}'")
    return errors
