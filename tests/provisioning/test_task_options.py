"""Tier 1: what the host-facing Fabric tasks share: option precedence and the per-host loop."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
from invoke import Config
from provisioning_helpers import settings_for

from provisioning.remote import RemoteError
from provisioning.tasks import options


def _c(section: dict[str, Any] | None = None) -> Any:
    return SimpleNamespace(config=Config(overrides={"exaone": section} if section else {}))


@pytest.mark.parametrize("given, section, want", [
    pytest.param({}, None, options.HostOptions(), id="defaults"),
    pytest.param({}, {"stack": "prod", "hosts": "a@h"},
                 options.HostOptions(stack="prod", hosts="a@h"), id="fabric-yaml"),
    pytest.param({"stack": "local"}, {"stack": "prod"}, options.HostOptions(stack="local"),
                 id="argument-wins"),
])
def test_option_precedence_argument_then_config_then_default(
        given: dict[str, Any], section: dict[str, Any] | None,
        want: options.HostOptions) -> None:
    assert options.HostOptions.of(_c(section), **given) == want


class _Host:
    def __init__(self, name: str, log: list[str]):
        self.name, self.log = name, log

    def close(self) -> None:
        self.log.append(f"close {self.name}")


def test_each_host_goes_one_at_a_time_and_stops_at_the_first_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = dataclasses.replace(settings_for(), hosts=("u@10.0.0.1", "u@10.0.0.2", "u@10.0.0.3"))
    log: list[str] = []
    monkeypatch.setattr(options, "connector", lambda _s: lambda name: _Host(name, log))

    def body(t: Any) -> None:
        log.append(f"work {t.host.name}")
        if t.host.name.endswith(".2"):
            raise RemoteError("systemctl restart", 1, "", "boom")

    runs = options.each_host(s, body)
    assert [(r.host, bool(r.error)) for r in runs] == [("u@10.0.0.1", False),
                                                        ("u@10.0.0.2", True)]
    assert log == ["work u@10.0.0.1", "close u@10.0.0.1", "work u@10.0.0.2",
                   "close u@10.0.0.2"]


@pytest.mark.parametrize("given, overrides, want", [
    pytest.param({}, {}, options.HostOptions().connect_timeout, id="built-in"),
    pytest.param({}, {"timeouts": {"connect": 7}}, 7.0, id="fabric-timeouts-connect"),
    pytest.param({}, {"timeouts": {"connect": 7}, "connect_kwargs": {"timeout": 4}}, 4.0,
                 id="fab---connect-timeout"),
    pytest.param({}, {"connect_kwargs": {"timeout": 4}, "exaone": {"connect_timeout": 9}}, 9.0,
                 id="exaone-section"),
    pytest.param({"connect_timeout": 2.5}, {"exaone": {"connect_timeout": 9}}, 2.5,
                 id="argument-wins"),
])
def test_connect_timeout_precedence(given: dict[str, Any], overrides: dict[str, Any],
                                    want: float) -> None:
    c = SimpleNamespace(config=Config(overrides=overrides))
    assert options.HostOptions.of(c, **given).connect_timeout == want
