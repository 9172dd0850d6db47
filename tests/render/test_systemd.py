"""The vLLM systemd unit and its environment files, for every checked-in stack.

Every stack is rendered with the VM layout, local and prod included: the unit must be valid
for any spec, whatever target the stack normally runs on.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from checkers import find_tool

from serving.render import systemd_unit as su
from serving.render import vllm_args
from serving.stack import layout, stackfile
from serving.stack.layout import API_KEY_ENV, SERVICE_USER
from serving.stack.spec import OWNED_FLAGS, Spec

STACKS = stackfile.stack_names()
MAX_EXPOSURE = 4.5

# Argv items that exercise every quoting rule: quotes, backslashes, specifiers, variables,
# a lone ';' (a command separator when unquoted), an empty item, control characters,
# non-ASCII text and a leading '#'.
ODD_ARGS = [
    "--chat-template=a b\"c'd\\e", "100%", "%n", "$HOME", "${X}", "$$", ";", "\\;", "",
    "é\n\tz\x01", "#x", '--x={"a": [1, 2]}', "trailing\\",
]


def _values(stack: str) -> dict:
    document = yaml.safe_load(stackfile.stack_path(stack).read_text())["config"]
    ns = stackfile.namespace() + ":"
    return {key[len(ns):]: value for key, value in document.items()}


def odd_spec() -> Spec:
    # The spec refuses control characters in vllmExtraArgs; the quoting must hold anyway, so
    # the odd items are put in past the spec's checks.
    spec = stackfile.from_values(_values("dev"), stack="odd")
    return spec.model_copy(update={"vllm": spec.vllm.model_copy(
        update={"extra_args": tuple(ODD_ARGS)})})


def keyless_spec() -> Spec:
    values = {k: v for k, v in _values("dev").items() if k != "apiKeyRef"}
    return stackfile.from_values({**values, "runtimeLoraUpdating": False}, stack="keyless")


SPECS = {name: stackfile.load(name) for name in STACKS}


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, continuation lines joined as systemd does."""
    out: list[tuple[str, str, str]] = []
    section, pending = "", ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(text: str, key: str, section: str | None = None) -> list[str]:
    return [v for s, k, v in directives(text) if k == key and section in (None, s)]


def shell_env(path: Path) -> dict[str, str]:
    """What a POSIX shell reads from an environment file (systemd's rules for our quoting)."""
    script = 'set -a; . "$1"; env -0'
    out = subprocess.run(
        ["env", "-i", "bash", "--norc", "--noprofile", "-c", script, "_", str(path)],
        check=True, capture_output=True,
    ).stdout.decode()
    pairs = (item.partition("=") for item in out.split("\0") if item)
    return {k: v for k, _, v in pairs if k not in ("PWD", "SHLVL", "_")}


# --- tier 1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_exec_start_round_trips_to_the_vllm_command(stack: str) -> None:
    spec = SPECS[stack]
    unit = su.render_unit(spec)
    [exec_start] = values(unit, "ExecStart", "Service")
    words = [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(exec_start)]
    assert words == vllm_args.command(spec, layout.VM)


@pytest.mark.parametrize("stack", STACKS)
def test_runs_as_the_static_service_user(stack: str) -> None:
    unit = su.render_unit(SPECS[stack])
    assert values(unit, "User", "Service") == [SERVICE_USER]
    assert values(unit, "Group", "Service") == [SERVICE_USER]
    assert not values(unit, "DynamicUser")


@pytest.mark.parametrize("stack", STACKS)
def test_devices_are_closed_and_gpus_opened_only_for_gpu_specs(stack: str) -> None:
    spec = SPECS[stack]
    unit = su.render_unit(spec)
    assert values(unit, "DevicePolicy", "Service") == ["closed"]
    allowed = values(unit, "DeviceAllow", "Service")
    if spec.vllm.cpu:
        assert allowed == []
        assert not values(unit, "ExecStartPre")
    else:
        assert "char-nvidia-uvm rw" in allowed
        assert "char-nvidia-frontend rw" in allowed
        assert not any("caps" in device for device in allowed)


@pytest.mark.parametrize("stack", STACKS)
def test_sandbox_settings(stack: str) -> None:
    spec = SPECS[stack]
    unit = su.render_unit(spec)
    service = {k: v for s, k, v in directives(unit) if s == "Service"}
    assert service["ProtectSystem"] == "strict"
    assert values(unit, "ReadWritePaths") == [layout.VM.cache_dir]
    assert service["CapabilityBoundingSet"] == ""
    assert service["NoNewPrivileges"] == "yes"
    assert service["UMask"] == "0077"
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) >= 60
    unit_section = {k: v for s, k, v in directives(unit) if s == "Unit"}
    # A model load takes minutes: the limit window must span several attempts.
    assert int(unit_section["StartLimitIntervalSec"]) >= 10 * 60
    assert int(unit_section["StartLimitBurst"]) >= 2
    # Omitted on purpose: they break the NVIDIA devices, the JIT compilers or psutil.
    for key in ("MemoryDenyWriteExecute", "PrivateDevices", "ProcSubset"):
        assert not values(unit, key)
    allowed = values(unit, "IPAddressAllow")
    assert values(unit, "IPAddressDeny") == ["any"]
    if spec.on.api_proxy:
        # Clients reach the API proxy; vLLM answers loopback only (its admin routes too).
        assert allowed == ["localhost"]
    else:
        assert {"localhost", spec.network.vnet_cidr, *spec.network.api_cidrs} == set(allowed)


@pytest.mark.parametrize("stack", STACKS)
def test_environment_files_and_no_key_in_any_rendering(stack: str) -> None:
    spec = SPECS[stack]
    unit, env = su.render_unit(spec), su.render_env(spec)
    assert values(unit, "EnvironmentFile") == [su.ENV_FILE, su.SECRET_ENV_FILE]
    for text in (unit, env):
        assert API_KEY_ENV not in text
        assert "--api-key" not in text
    assert not any(k.startswith("Environment") and k != "EnvironmentFile"
                   for _, k, _ in directives(unit))


def test_no_secret_file_without_a_key() -> None:
    unit = su.render_unit(keyless_spec())
    assert values(unit, "EnvironmentFile") == [su.ENV_FILE]


@pytest.mark.parametrize("stack", STACKS)
def test_env_file_holds_exactly_the_vllm_environment(stack: str, tmp_path: Path) -> None:
    spec = SPECS[stack]
    path = tmp_path / "vllm.env"
    path.write_text(su.render_env(spec))
    assert shell_env(path) == vllm_args.environment(spec, layout.VM)


@pytest.mark.parametrize("key", [
    "plain-Key_123", "a\"b", "back\\slash", "$HOME", "${HOME}", "`id`", "it's", "# not a comment",
    " spaced  out ", "%n", "ключ",
])
def test_secret_env_escapes_odd_characters(key: str, tmp_path: Path) -> None:
    path = tmp_path / "secret.env"
    path.write_text(su.render_secret_env(key))
    assert shell_env(path) == {API_KEY_ENV: key}


@pytest.mark.parametrize("key", ["", "key\n", "a\0b", "tab\tkey"])
def test_secret_env_refuses_empty_or_control_characters(key: str) -> None:
    with pytest.raises(ValueError) as err:
        su.render_secret_env(key)
    if key:
        assert key not in str(err.value)


def test_exec_words_are_quoted_for_systemd() -> None:
    assert su.quote_exec_word("--port") == "--port"
    assert su.quote_exec_word("") == '""'
    assert su.quote_exec_word(";") == '";"'
    assert su.quote_exec_word('{"a":"%$"}') == '"{\\"a\\":\\"%%$$\\"}"'
    with pytest.raises(ValueError):
        su.quote_exec_word("a\0b")
    with pytest.raises(ValueError):
        su.exec_line(["python3", "-m", "vllm"])


def test_template_restates_no_vllm_flag() -> None:
    template = (su.TEMPLATE_DIR / su.TEMPLATE).read_text()
    for flag in OWNED_FLAGS:
        assert flag not in template
    for name in vllm_args.environment(SPECS[STACKS[0]], layout.VM):
        assert name not in template


def test_file_paths() -> None:
    unit = Path(su.UNIT_FILE)
    assert unit.parent == Path("/etc/systemd/system")
    assert unit.name == f"{layout.SERVICE_NAME}.service"
    for path in (su.ENV_FILE, su.SECRET_ENV_FILE):
        assert Path(path).parent == Path(layout.VM.config_dir)
    assert su.ENV_FILE != su.SECRET_ENV_FILE


# --- tier 2: systemd-analyze ------------------------------------------------------------------


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    return find_tool("systemd-analyze")


@pytest.fixture(scope="session")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --root for systemd-analyze in which the rendered unit is checked unchanged.

    verify fails a unit whose ExecStart binary is missing, and the real interpreter path
    exists only on a serving host. Rendering with another interpreter would check a
    different file, so instead the unit goes into an alternate root holding a stub at the
    real path, plus a copy of the host's unit directory for the targets it is ordered against.
    """
    root = tmp_path_factory.mktemp("root")
    (root / "etc/systemd/system").mkdir(parents=True)
    for units in {Path("/usr/lib/systemd/system").resolve(), Path("/lib/systemd/system").resolve()}:
        if units.is_dir():
            shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True,
                            dirs_exist_ok=True)
    stub = root / layout.VM.python.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return root


def install(root: Path, text: str) -> str:
    (root / "etc/systemd/system" / su.UNIT_NAME).write_text(text)
    return su.UNIT_NAME


def analyze(tool: str, *args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "debug" if debug else "info"}
    return subprocess.run([tool, *args], capture_output=True, text=True, env=env, timeout=120)


def systemd_argv(line: str) -> list[str]:
    """Words of a 'Command Line:' dump line (systemd's shell-style quoting) as execve gets
    them: with the '$$' that systemd turns into '$' when it starts the command."""
    simple = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
    words: list[str] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] == " ":
            i += 1
            continue
        word, quoted = [], False
        while i < n and (quoted or line[i] != " "):
            c = line[i]
            if c == '"':
                quoted = not quoted
                i += 1
            elif c == "\\" and quoted:
                nxt = line[i + 1]
                if nxt == "x":
                    word.append(chr(int(line[i + 2:i + 4], 16)))
                    i += 4
                elif nxt in "01234567":
                    word.append(chr(int(line[i + 1:i + 4], 8)))
                    i += 4
                else:
                    word.append(simple.get(nxt, nxt))
                    i += 2
            else:
                word.append(c)
                i += 1
        words.append("".join(word).replace("$$", "$"))
    return words


CHECKED = [*STACKS, "odd"]


def checked_spec(name: str) -> Spec:
    return odd_spec() if name == "odd" else SPECS[name]


@pytest.mark.tools
@pytest.mark.parametrize("name", CHECKED)
def test_systemd_analyze_verify(name: str, systemd_analyze: str, unit_root: Path) -> None:
    unit = install(unit_root, su.render_unit(checked_spec(name)))
    # verify exits 0 on unknown keys and bad values; anything on stderr is a finding.
    result = analyze(systemd_analyze, "verify", f"--root={unit_root}", unit)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.tools
def test_systemd_analyze_verify_catches_a_bad_line(systemd_analyze: str, unit_root: Path) -> None:
    text = su.render_unit(SPECS[STACKS[0]]).replace("UMask=0077", "UMask=0077\nProtectSystem=bogus")
    result = analyze(systemd_analyze, "verify", f"--root={unit_root}", install(unit_root, text))
    assert "bogus" in result.stderr


@pytest.mark.tools
@pytest.mark.parametrize("name", CHECKED)
def test_systemd_parses_exec_start_back_to_the_vllm_command(
    name: str, systemd_analyze: str, unit_root: Path
) -> None:
    spec = checked_spec(name)
    unit = install(unit_root, su.render_unit(spec))
    # At debug level verify dumps the loaded unit to stdout, each command as systemd parsed it.
    result = analyze(systemd_analyze, "verify", f"--root={unit_root}", unit, debug=True)
    found = re.search(r"-> ExecStart:\n\s*Command Line: (.*)\n", result.stdout)
    assert found, result.stdout[-2000:]
    argv = systemd_argv(found.group(1))
    assert argv == vllm_args.command(spec, layout.VM)
    if name == "odd":
        assert argv[-len(ODD_ARGS):] == ODD_ARGS


@pytest.mark.tools
@pytest.mark.parametrize("stack", STACKS)
def test_systemd_analyze_security_exposure(
    stack: str, systemd_analyze: str, unit_root: Path
) -> None:
    unit = install(unit_root, su.render_unit(SPECS[stack]))
    result = analyze(systemd_analyze, "security", "--offline=yes", f"--root={unit_root}", unit)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"{stack}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("word", ["abc\n", "--flag\n", "x\r", "a\n[Service]"])
def test_a_trailing_line_break_is_never_a_bare_word(word: str) -> None:
    quoted = su.quote_exec_word(word)
    assert "\n" not in quoted and "\r" not in quoted
    assert quoted.startswith('"')
