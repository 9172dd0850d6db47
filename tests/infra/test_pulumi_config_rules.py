"""Tier 1: the Pulumi CLI's config rules (``pulumi_cli_config``) on Pulumi.yaml and every
checked-in stack file, so that no stack is refused by the CLI before the program runs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from pulumi_cli_config import config_errors

from serving.stack import stackfile

STACKS = stackfile.stack_names()


def _project() -> dict[str, Any]:
    return copy.deepcopy(stackfile.project())


def _stack(name: str) -> dict[str, Any]:
    return yaml.safe_load(stackfile.stack_path(name).read_text()) or {}


@pytest.mark.parametrize("stack", STACKS)
def test_every_checked_in_stack_passes_the_cli_config_check(stack: str) -> None:
    assert config_errors(_project(), stack, _stack(stack)) == []


@pytest.mark.parametrize("stack", STACKS)
def test_every_stack_key_is_namespaced_by_the_project(stack: str) -> None:
    prefix = stackfile.namespace() + ":"
    assert [k for k in _stack(stack).get("config") or {} if not str(k).startswith(prefix)] == []


def test_no_declared_secret_key_has_a_plain_default() -> None:
    """A secret key either is undeclared (stackfile.SECRET_KEYS) or has no default."""
    schema = stackfile.schema()
    assert [k for k, d in schema.items() if d.get("secret") and "default" in d] == []
    assert [k for k in stackfile.SECRET_KEYS if k in schema] == []


def test_the_former_api_key_declaration_is_refused_for_every_stack() -> None:
    """Finding 1: `apiKey` declared `secret: true` with the default "" fails every stack that
    leaves it unset, before the program runs."""
    project = _project()
    project["config"]["apiKey"] = {"type": "string", "secret": True, "default": ""}
    for stack in STACKS:
        assert config_errors(project, stack, _stack(stack)) == [
            f"Stack '{stack}' with configuration key 'apiKey' must be encrypted as it's secret"]


def test_a_declared_secret_passes_only_encrypted() -> None:
    project = _project()
    project["config"]["apiKey"] = {"type": "string", "secret": True}
    stack = _stack("prod")
    assert config_errors(project, "prod", stack) == [
        "Stack 'prod' is missing configuration value 'exaone-serving:apiKey'"]
    stack["config"]["exaone-serving:apiKey"] = "clear-text"
    assert "must be encrypted" in config_errors(project, "prod", stack)[0]
    stack["config"]["exaone-serving:apiKey"] = {"secure": "v1:AAAA"}
    assert config_errors(project, "prod", stack) == []


def test_types_and_namespaces_are_checked() -> None:
    project = _project()
    stack = _stack("dev")
    stack["config"]["exaone-serving:vmCount"] = "two"
    stack["config"]["exaone-serving:sshCidrs"] = "203.0.113.0/24"
    stack["config"]["vmImage"] = "ubuntu-2404"
    errors = config_errors(project, "dev", stack)
    assert "Stack 'dev' with configuration key 'vmCount' must be of type 'integer'" in errors
    assert "Stack 'dev' with configuration key 'sshCidrs' must be of type 'array'" in errors
    assert any("could not parse vmImage" in e for e in errors)
    project["config"]["azure-native:location"] = {"type": "string", "value": "swedencentral"}
    project["config"]["replicas"]["default"] = "one"
    errors = config_errors(project, "dev", _stack("dev"))
    assert any("'azure-native:location' is not namespaced" in e for e in errors)
    assert any("'replicas' is not of the expected type 'integer'" in e for e in errors)


def test_a_stack_that_sets_a_secret_key_reads_it_as_set() -> None:
    """The undeclared secret key still reaches the spec when a stack sets it encrypted."""
    values = {**{k.partition(":")[2]: v for k, v in _stack("prod")["config"].items()},
              "apiKey": {"secure": "v1:AAAA"}, "apiKeyRef": ""}
    spec = stackfile.from_values(values, stack="prod")
    assert spec.api_key.kind == "pulumi"
