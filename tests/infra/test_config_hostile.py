"""Tier 1, under Pulumi's mocks: hostile stack input is refused by `pulumi up` exactly as by
`python -m serving validate`, before any resource or invoke."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi
import pytest
from pulumi_mocks import PROJECT, run_program_capture, stack_values

from serving.stack import stackfile
from serving.stack.errors import SpecError

API_KEY_ENV = {"EXAONE_API_KEY": "test-api-key-not-real"}

HOSTILE: dict[str, tuple[str, dict[str, Any], str]] = {
    "ssh-ipv4-halves": ("dev", {"sshCidrs": ["0.0.0.0/1", "128.0.0.0/1"]}, "sshCidrs"),
    "api-ipv6-halves": ("prod", {"apiCidrs": ["::/1", "8000::/1"]}, "apiCidrs"),
    "api-ipv4-mapped": ("dev", {"apiCidrs": ["::ffff:0:0/96"]}, "apiCidrs"),
    "api-6to4": ("prod", {"apiCidrs": ["2002::/16"]}, "apiCidrs"),
    "vnet-everything": ("dev", {"vnetCidr": "0.0.0.0/0"}, "vnetCidr"),
    "vnet-public": ("prod", {"vnetCidr": "8.8.0.0/16"}, "vnetCidr"),
    "api-key-underscored": ("dev", {"vllmExtraArgs": ["--api_key=x"]}, "vllmExtraArgs[0]"),
    "host-abbreviated": ("prod", {"vllmExtraArgs": ["--hos=1.2.3.4"]}, "vllmExtraArgs[0]"),
    "flags-file": ("dev", {"vllmExtraArgs": ["--config", "f.yaml"]}, "vllmExtraArgs[0]"),
    "admin-root": ("dev", {"adminUser": "root"}, "adminUser"),
    "not-exaone": ("prod", {"modelId": "meta-llama/Llama-3.1-8B-Instruct"}, "modelId"),
    "revision-newline": ("dev", {"modelRevision": "e949c91dec92095908d34e6b560af77dd0c993f8\n"},
                         "modelRevision"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_values_are_refused_before_any_resource(case: str) -> None:
    stack, override, key = HOSTILE[case]
    run, error = run_program_capture(stack, {**stack_values(stack), **override}, env=API_KEY_ENV)
    assert isinstance(error, SpecError), f"{case}: expected a SpecError, got {error!r}"
    assert any(p.where == f"Pulumi.{stack}.yaml: exaone-serving:{key}"
               for p in error.problems), str(error)
    assert run.resources == [] and run.calls == []


@pytest.mark.parametrize("stack", ["dev_1", "Dev", "x" * 40])
def test_a_stack_name_that_cannot_name_hosts_is_refused(stack: str) -> None:
    run, error = run_program_capture(stack, stack_values("dev"), env=API_KEY_ENV)
    assert isinstance(error, SpecError), repr(error)
    assert str(error.problems[0]).startswith(f"Pulumi.{stack}.yaml: the stack name")
    assert run.resources == []


def test_a_duplicate_key_in_the_stack_file_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine hands the program one of the two values; the file says there were two.
    text = stackfile.stack_path("dev").read_text() + "  exaone-serving:production: false\n"
    text = text.replace("config:\n", "config:\n  exaone-serving:production: true\n", 1)
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(text)
    monkeypatch.setattr(stackfile, "stack_path", lambda stack: path)
    run, error = run_program_capture("dev", stack_values("dev"), env=API_KEY_ENV)
    assert isinstance(error, SpecError), repr(error)
    assert "'exaone-serving:production' appears twice" in str(error)
    assert run.resources == []


@pytest.mark.parametrize("key", ["exaone-servng:production", "exaone:production", "aws:region"])
def test_config_outside_the_namespace_is_refused(key: str) -> None:
    from infra import config as infra_config

    pulumi.runtime.set_all_config({f"{PROJECT}:target": "vm", key: "true",
                                   "azure-native:location": "swedencentral"})
    problems = infra_config.file_checks("t", "Pulumi.t.yaml")
    assert [str(p) for p in problems] == [
        f"Pulumi.t.yaml: {key!r}: is outside the project's namespace; allowed: "
        f"{PROJECT}:KEY (or provider settings azure-native:KEY, kubernetes:KEY, pulumi:KEY)"]


@pytest.mark.parametrize("raw", ["[" * 100_000 + "]" * 100_000, "9" * 5000, "[1, 2"])
def test_a_config_value_the_engine_cannot_decode_is_refused(raw: str) -> None:
    run, error = run_program_capture("dev", {**stack_values("dev"), "vllmExtraArgs": raw},
                                     env=API_KEY_ENV)
    assert isinstance(error, SpecError), repr(error)
    assert [str(p) for p in error.problems] == [
        "Pulumi.dev.yaml: exaone-serving:vllmExtraArgs: is a string; allowed: a list"]
    assert run.resources == []


@pytest.mark.parametrize(("line", "key"), [("exaone-serving:production: 'true'", "production"),
                                           ('exaone-serving:osDiskGb: "256"', "osDiskGb")])
def test_a_quoted_scalar_in_the_stack_file_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, key: str) -> None:
    # The engine hands "true" and true alike to the program; the file tells them apart.
    text = stackfile.stack_path("dev").read_text()
    text = text.replace("config:\n", f"config:\n  {line}\n", 1)
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(text)
    monkeypatch.setattr(stackfile, "stack_path", lambda stack: path)
    run, error = run_program_capture("dev", stack_values("dev"), env=API_KEY_ENV)
    assert isinstance(error, SpecError), repr(error)
    assert [p.where for p in error.problems] == [f"Pulumi.dev.yaml: exaone-serving:{key}"]
    assert run.resources == []
