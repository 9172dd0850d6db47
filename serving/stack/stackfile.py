"""Read a stack's config (``Pulumi.<stack>.yaml`` or any file of that shape) into a Spec.

Defaults come from the config schema in ``Pulumi.yaml`` and nowhere else. Every problem
is collected and raised together as a SpecError, each naming its config key and file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from serving.stack import yamlfile
from serving.stack.errors import Problem, SpecError
from serving.stack.spec import AdapterSpec, SecretRef, Spec, cross_checks, stack_name_problem

ROOT = Path(__file__).resolve().parents[2]
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
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


# Top-level keys of a Pulumi stack file besides ``config``.
STACK_FILE_KEYS = ("config", "secretsprovider", "encryptedkey", "encryptionsalt", "environment")
# Config namespaces other than the project's that a stack may set: the providers the Pulumi
# program uses. Anything else is a misspelling (``exaone-servng:production``) that Pulumi
# would accept and the program would never read.
PROVIDER_NAMESPACES = ("azure-native", "kubernetes", "pulumi")
_SHAPE = "a 'config:' mapping of exaone-serving:KEY values, like Pulumi.dev.yaml"


def stack_name_of(path: Path) -> str:
    """The stack a file configures: ``Pulumi.<stack>.yaml`` (any other file: its stem)."""
    name = path.name.removeprefix("Pulumi.")
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return name


def load(stack: str | None = None, config: Path | None = None) -> Spec:
    """The spec of a checked-in stack (by name) or of a config file of the same shape."""
    path = Path(config) if config else stack_path(str(stack))
    name = stack or stack_name_of(path)
    where = path.name if not config else str(path)
    problem = stack_name_problem(name)
    if problem:
        raise SpecError([Problem(where, problem)])
    if not path.is_file():
        known = ", ".join(stack_names()) or "none"
        raise SpecError([Problem(where, f"no such stack file; checked-in stacks: {known}")])
    return from_values(read_config(path, where), stack=name, where=where)


def read_config(path: Path, where: str) -> dict[str, Any]:
    """The un-namespaced project values of a stack file, after the file's own checks: bounded
    and strict YAML (``yamlfile``), the stack-file shape, every config key in the project's
    namespace (or a provider's) and none twice."""
    try:
        document = yamlfile.read(path)
    except yamlfile.YamlFileError as exc:
        raise SpecError([Problem(where, str(exc))]) from None
    return config_values(document, where)


def config_values(document: object, where: str) -> dict[str, Any]:
    """The project's values in a parsed stack file, un-namespaced; the shape and namespace
    checks of ``read_config``."""
    if document is None:
        raise SpecError([Problem(where, f"is empty; allowed: {_SHAPE}")])
    if not isinstance(document, dict):
        raise SpecError([Problem(where, f"is not a mapping; allowed: {_SHAPE}")])
    problems: list[Problem] = []
    if "config" not in document:
        found = ", ".join(repr(k) for k in list(document)[:5])
        raise SpecError([Problem(where, f"has no 'config:' mapping (found {found}); "
                                        f"allowed: {_SHAPE}")])
    for top in document:
        if top not in STACK_FILE_KEYS:
            problems.append(Problem(f"{where}: {top!r}", (
                f"is not a stack file key; allowed: {', '.join(STACK_FILE_KEYS)}")))
    config = document["config"]
    if config is None:
        config = {}
    if not isinstance(config, dict):
        problems.append(Problem(f"{where}: config", f"is not a mapping; allowed: {_SHAPE}"))
        raise SpecError(problems)
    ns = namespace()
    values: dict[str, Any] = {}
    for full, value in config.items():
        text = str(full)
        space, sep, key = text.partition(":")
        if space == ns and sep and key:
            values[key] = value
        elif space in PROVIDER_NAMESPACES and sep and key:
            continue
        else:
            problems.append(Problem(f"{where}: {text!r}", (
                f"is outside the project's namespace; allowed: {ns}:KEY (or provider "
                f"settings {', '.join(p + ':KEY' for p in PROVIDER_NAMESPACES)})")))
    if problems:
        raise SpecError(problems)
    if not values:
        # Every default alone is no stack (target local needs its model folder): say what is
        # missing rather than list the defaults that do not fit together.
        raise SpecError([Problem(where, f"sets no {ns}:KEY under 'config:'; allowed: {_SHAPE}")])
    return values


def from_values(values: Mapping[str, Any], *, stack: str, where: str = "config") -> Spec:
    """Build and validate the spec from un-namespaced config values (defaults filled in).

    ``values["apiKey"]`` may be a Pulumi ``{secure: ...}`` object or ``SECRET_PRESENT``; a
    plain string there means the key sits in clear in a file and is refused.
    """
    ns = namespace()

    def key(alias: str) -> str:
        return f"{where}: {ns}:{alias}"

    problems: list[Problem] = []
    name_problem = stack_name_problem(stack)
    if name_problem:
        problems.append(Problem(where, name_problem))
    known = known_keys()
    for unknown in sorted(set(values) - set(known), key=str):
        problems.append(
            Problem(key(str(unknown)), "is not a known key; see the config schema in Pulumi.yaml")
        )
    wrong = type_problems(values, where)
    problems += wrong
    refused = {p.where for p in wrong}
    typed = {k: v for k, v in values.items() if k in known and key(k) not in refused}
    merged = {**defaults(), **typed}

    api_key = _secret_ref(merged, key, problems)
    raw = _nest(merged, stack)
    raw["api_key"] = api_key
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        problems.extend(
            Problem(key(_alias(err["loc"])), _message(err))
            for err in exc.errors()
            if err["loc"][:1] != ("stack",)  # reported above, naming the file
        )
        raise SpecError(problems) from None
    if problems:  # a refused type or name with an otherwise valid spec
        raise SpecError(problems)
    problems.extend(Problem(p.where, p.message) for p in cross_checks(spec, key))
    if problems:
        raise SpecError(problems)
    return spec


# What each type of the config schema (Pulumi.yaml) accepts, as Pulumi itself does: an
# integer is not "1", true or 1.0, a boolean is not "true" or 1.
_SCHEMA_TYPES: dict[str, tuple[str, Any]] = {
    "integer": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "boolean": ("true or false", lambda v: isinstance(v, bool)),
    "string": ("a string", lambda v: isinstance(v, str)),
    "array": ("a list", lambda v: isinstance(v, list | tuple)),
}


def type_problems(values: Mapping[str, Any], where: str) -> list[Problem]:
    """Values of the wrong YAML type for their key's declared type (``_SCHEMA_TYPES``)."""
    known = schema()
    found = []
    for name, value in values.items():
        problem = _type_problem(value, known[name]) if name in known else None
        if problem:
            found.append(Problem(f"{where}: {namespace()}:{name}", problem))
    return found


def _type_problem(value: Any, decl: Mapping[str, Any]) -> str | None:
    kind = decl.get("type")
    if kind not in _SCHEMA_TYPES or decl.get("secret") or value is SECRET_PRESENT:
        return None
    allowed, accepts = _SCHEMA_TYPES[kind]
    if accepts(value):
        return None
    if kind == "string" and isinstance(value, int | float) and not isinstance(value, bool):
        return None  # a number where text is declared (gpuMemoryUtilization: 0.9): the field judges
    got = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
           list: "a list", dict: "a mapping", type(None): "empty"}.get(type(value), "a value")
    unquoted = isinstance(value, str) and kind in ("integer", "boolean")
    return f"is {got}; allowed: {allowed}" + (" (unquoted)" if unquoted else "")


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
    if (
        scheme not in ("env", "file")
        or not name
        or (scheme == "env" and not ENV_NAME_RE.fullmatch(name))
        or (scheme == "file" and CONTROL_RE.search(name))
    ):
        # Never echoed: a malformed reference is most often the key itself.
        problems.append(
            Problem(key("apiKeyRef"), "is malformed (value not shown); allowed: env:NAME or "
                    "file:PATH, the key itself via `pulumi config set --secret apiKey`")
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
