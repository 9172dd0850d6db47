"""Read a stack's config (``Pulumi.<stack>.yaml`` or any file of that shape) into a Spec.

Defaults come from the config schema in ``Pulumi.yaml`` and nowhere else. Every problem
is collected and raised together as a SpecError, each naming its config key and file.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from serving.stack.errors import Problem, SpecError
from serving.stack.spec import AdapterSpec, SecretRef, Spec, cross_checks

ROOT = Path(__file__).resolve().parents[2]
# Keys that name secrets or files on the operator's machine: never written to a host's copy
# of the stack (the host reads its API key from a root-only file instead).
OPERATOR_ONLY_KEYS = ("apiKey", "apiKeyRef", "sshPrivateKeyPath", "hfTokenRef")
PROJECT_FILE = ROOT / "Pulumi.yaml"
# Keys a stack may set that Pulumi.yaml does not declare: the CLI refuses a declared secret key
# that a stack leaves unset (its default is plain text) and reports a declared key without a
# default as missing from every stack that does not set it. So a secret key stays undeclared:
# encrypted (`secure:`) in the stacks that set it, absent from the others.
SECRET_KEYS = ("apiKey",)


@lru_cache(maxsize=1)
def project() -> dict[str, Any]:
    return yaml.safe_load(PROJECT_FILE.read_text())


def namespace() -> str:
    return str(project()["name"])


def schema() -> dict[str, dict[str, Any]]:
    return dict(project()["config"])


def known_keys() -> dict[str, dict[str, Any]]:
    """Every key a stack may set: the declared schema, and the undeclared secret keys."""
    return {**schema(), **{key: {"type": "string", "secret": True} for key in SECRET_KEYS}}


def defaults() -> dict[str, Any]:
    return {key: decl.get("default") for key, decl in schema().items()}


def stack_path(stack: str) -> Path:
    return ROOT / f"Pulumi.{stack}.yaml"


def stack_names() -> list[str]:
    """Checked-in example stacks, in file-name order."""
    return sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in ROOT.glob("Pulumi.*.yaml"))


def load(stack: str | None = None, config: Path | None = None) -> Spec:
    """The spec of a checked-in stack (by name) or of a config file of the same shape."""
    path = Path(config) if config else stack_path(str(stack))
    name = stack or path.name.removeprefix("Pulumi.").removesuffix(".yaml")
    where = path.name if not config else str(path)
    if not path.is_file():
        known = ", ".join(stack_names()) or "none"
        raise SpecError([Problem(where, f"no such stack file; checked-in stacks: {known}")])
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpecError([Problem(where, f"is not valid YAML: {exc}")]) from None
    if not isinstance(document, dict) or not isinstance(document.get("config", {}), dict):
        raise SpecError(
            [Problem(where, "must be a mapping with a 'config:' mapping, like Pulumi.<stack>.yaml")]
        )
    ns = namespace() + ":"
    values = {
        k[len(ns) :]: v for k, v in (document.get("config") or {}).items() if str(k).startswith(ns)
    }
    return from_values(values, stack=name, where=where)


def from_values(values: Mapping[str, Any], *, stack: str, where: str = "config") -> Spec:
    """Build and validate the spec from un-namespaced config values (defaults filled in).

    ``values["apiKey"]`` may be a Pulumi ``{secure: ...}`` object or ``SECRET_PRESENT``; a
    plain string there means the key sits in clear in a file and is refused.
    """
    ns = namespace()

    def key(alias: str) -> str:
        return f"{where}: {ns}:{alias}"

    problems: list[Problem] = []
    known = known_keys()
    for unknown in sorted(set(values) - set(known)):
        problems.append(
            Problem(key(unknown), "is not a known key; see the config schema in Pulumi.yaml")
        )
    merged = {**defaults(), **{k: v for k, v in values.items() if k in known}}

    api_key = _secret_ref(merged, key, problems)
    raw = _nest(merged, stack)
    raw["api_key"] = api_key
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        problems.extend(Problem(key(_alias(err["loc"])), _message(err)) for err in exc.errors())
        raise SpecError(problems) from None
    problems.extend(Problem(p.where, p.message) for p in cross_checks(spec, key))
    if problems:
        raise SpecError(problems)
    return spec


class _Present:
    """Marks a secret that is set (e.g. under Pulumi) without carrying its value."""


SECRET_PRESENT = _Present()


def _secret_ref(merged: dict[str, Any], key, problems: list[Problem]) -> SecretRef:
    value, ref = merged.get("apiKey"), merged.get("apiKeyRef") or ""
    if isinstance(value, _Present) or (isinstance(value, dict) and "secure" in value):
        return SecretRef(kind="pulumi", name="apiKey")
    if value:
        problems.append(
            Problem(
                key("apiKey"),
                "is in clear text; allowed: `pulumi config set --secret "
                "apiKey`, or apiKeyRef env:NAME / file:PATH",
            )
        )
        return SecretRef(kind="none")
    if not ref:
        return SecretRef(kind="none")
    scheme, _, name = str(ref).partition(":")
    if scheme not in ("env", "file") or not name:
        problems.append(
            Problem(key("apiKeyRef"), f"{ref!r} is malformed; allowed: env:NAME or file:PATH")
        )
        return SecretRef(kind="none")
    return SecretRef(kind=scheme, name=name)


def _section_aliases(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _nest(flat: dict[str, Any], stack: str) -> dict[str, Any]:
    """Flat config keys -> the nested shape of Spec, guided by the models' aliases."""
    raw: dict[str, Any] = {"stack": stack}
    for field_name, field in Spec.model_fields.items():
        annotation = field.annotation
        if (
            isinstance(annotation, type)
            and issubclass(annotation, BaseModel)
            and annotation is not SecretRef
        ):
            raw[field_name] = {a: flat[a] for a in _section_aliases(annotation) if a in flat}
        elif field_name in flat:
            raw[field_name] = flat[field_name]
    raw["adapters"] = flat.get("adapters") or []
    return raw


def to_values(spec: Spec) -> dict[str, Any]:
    """The un-namespaced config values ``from_values`` turns into ``spec`` (every default
    resolved, every value as validated): the inverse of ``_nest``. The API key reference is
    left out; callers that need one add it."""
    flat: dict[str, Any] = {}
    for field_name, field in Spec.model_fields.items():
        annotation = field.annotation
        value = getattr(spec, field_name)
        if field_name in ("stack", "api_key", "adapters"):
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            flat.update(value.model_dump(by_alias=True, mode="json"))
        else:
            flat[field.alias or field_name] = value
    flat["adapters"] = [a.model_dump(by_alias=True, mode="json", exclude_none=True)
                        for a in spec.adapters]
    return flat


def _alias(loc: tuple[Any, ...]) -> str:
    """pydantic's error location -> the config key: ('network','sshCidrs',0) -> sshCidrs[0]."""
    parts = list(loc)
    if parts and parts[0] in Spec.model_fields and parts[0] not in ("adapters",) and len(parts) > 1:
        parts = parts[1:]
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def _message(err: dict[str, Any]) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        return "is required"
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_section_aliases(AdapterSpec))
        return f"is not a known field; allowed: {allowed}"
    return msg
