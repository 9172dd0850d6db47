"""Tier 1: stack input written by a careless or hostile operator. Each is refused before
anything is written: exit 2, one line naming the key or file and what is allowed, no secret
echoed, no traceback, well under a second; the same through the functions and the real CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.render import artifacts, systemd_unit
from serving.stack import layout, spec, stackfile, yamlfile
from serving.stack.errors import EXIT_BAD_INPUT, SpecError
from tests.stack.test_spec import GOOD_VM

SECRET = "sk-live-0123456789abcdef"


def stack_text(**changes: Any) -> str:
    values = {**GOOD_VM, **changes}
    return yaml.safe_dump({"config": {f"exaone-serving:{k}": v for k, v in values.items()}})


def write(tmp_path: Path, text: str | bytes, name: str = "Pulumi.t.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def refused(path: Path) -> list[str]:
    started = time.monotonic()
    with pytest.raises(SpecError) as caught:
        stackfile.load(config=path)
    assert time.monotonic() - started < 1.0
    return [str(p) for p in caught.value.problems]


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serving", *argv], cwd=stackfile.ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def assert_refused_by_cli(path: Path, tmp_path: Path, *, must_name: str) -> None:
    """validate, render and plan: exit 2, one line per problem naming ``must_name``,
    nothing written, no traceback, no secret."""
    out = tmp_path / "rendered"
    for argv in (["validate", "--config", str(path)],
                 ["render", "--config", str(path), "--out", str(out)],
                 ["plan", "--config", str(path)]):
        done = cli(*argv)
        assert done.returncode == EXIT_BAD_INPUT, (argv, done.stderr)
        assert "Traceback" not in done.stderr
        assert SECRET not in done.stderr + done.stdout
        lines = done.stderr.strip().splitlines()
        assert lines and any(must_name in line for line in lines), lines
        assert all(line.startswith(str(path)) for line in lines), lines
    assert not out.exists()


# --- stack files: duplicates, namespaces, shape ---------------------------------------------

DUPLICATES = {
    "production": (
        "config:\n  exaone-serving:production: true\n  exaone-serving:production: false\n"),
    "top-level": "config:\n  exaone-serving:target: vm\nconfig:\n  exaone-serving:target: local\n",
    "in-an-adapter": (
        "config:\n  exaone-serving:adapters:\n    - name: a\n      name: b\n      version: '1'\n"
        "      source: x\n      rank: 8\n"),
    "quoted-twin": "config:\n  exaone-serving:target: vm\n  'exaone-serving:target': local\n",
}


@pytest.mark.parametrize("text", list(DUPLICATES.values()), ids=list(DUPLICATES))
def test_a_key_twice_is_refused(tmp_path: Path, text: str) -> None:
    lines = refused(write(tmp_path, text))
    assert len(lines) == 1 and "appears twice" in lines[0], lines


OUTSIDE = ["exaone-servng:production", "exaone-serving-prod:production", "production",
           "Exaone-Serving:production", "aws:region"]


@pytest.mark.parametrize("key", OUTSIDE)
def test_a_key_outside_the_namespace_is_refused(tmp_path: Path, key: str) -> None:
    lines = refused(write(tmp_path, stack_text() + f"  {key}: true\n"))
    assert len(lines) == 1, lines
    assert repr(key) in lines[0] and "outside the project's namespace" in lines[0]


def test_provider_settings_are_allowed(tmp_path: Path) -> None:
    text = stack_text() + "  azure-native:location: swedencentral\n"
    assert stackfile.load(config=write(tmp_path, text)).stack == "t"


SHAPES = {
    "empty": ("", "is empty"),
    "comment-only": ("# nothing here\n", "is empty"),
    "misspelt-config": ("confg:\n  exaone-serving:target: vm\n", "has no 'config:' mapping"),
    "a-list": ("- exaone-serving:target: vm\n", "is not a mapping"),
    "config-a-list": ("config:\n  - exaone-serving:target\n", "config: is not a mapping"),
    "a-scalar": ("exaone-serving:target\n", "is not a mapping"),
    "config-empty": ("config: {}\n", "sets no exaone-serving:KEY"),
    "config-null": ("config:\n", "sets no exaone-serving:KEY"),
    "only-provider-keys": ("config:\n  azure-native:location: westeurope\n",
                           "sets no exaone-serving:KEY"),
}


@pytest.mark.parametrize(("text", "says"), list(SHAPES.values()), ids=list(SHAPES))
def test_a_file_without_config_says_what_it_lacks(tmp_path: Path, text: str, says: str) -> None:
    lines = refused(write(tmp_path, text))
    assert len(lines) == 1 and says in lines[0], lines
    assert "modelSource" not in lines[0]  # no messages about keys it never set
    assert lines[0].startswith(f"{tmp_path / 'Pulumi.t.yaml'}: ")


def test_a_stray_top_level_key_is_named(tmp_path: Path) -> None:
    lines = refused(write(tmp_path, stack_text() + "secretprovider: x\n"))
    assert lines == [f"{tmp_path / 'Pulumi.t.yaml'}: 'secretprovider': is not a stack file "
                     f"key; allowed: {', '.join(stackfile.STACK_FILE_KEYS)}"]


# --- names and values that reach a unit, an env file, YAML or a shell line -----------------

BAD_STACK_NAMES = ["a\nb", "x\n[Service]\nExecStartPre=+/bin/sh", "dev%n", "x[red]y", "x:x:",
                   "Dev", "dev_1", "dev.1", "-dev", "dev-", "a" * 33, "dev ", "dév"]


@pytest.mark.parametrize("name", BAD_STACK_NAMES)
def test_a_stack_name_that_would_reach_a_unit_is_refused(tmp_path: Path, name: str) -> None:
    if "/" not in name:  # a file name cannot hold it; `pulumi stack` names reach from_values
        path = write(tmp_path, stack_text(), name=f"Pulumi.{name}.yaml")
        lines = refused(path)
        assert len(lines) == 1 and "the stack name" in lines[0], lines
        assert "\n" not in lines[0]
    with pytest.raises(SpecError) as caught:
        stackfile.from_values(GOOD_VM, stack=name, where="Pulumi.t.yaml")
    assert [str(p) for p in caught.value.problems] == [
        f"Pulumi.t.yaml: the stack name {name!r} is not allowed; allowed: "
        f"{spec.STACK_NAME_ALLOWED}".replace("\n", "\\n")]


def test_a_good_stack_name_reaches_the_unit_as_written() -> None:
    spec = stackfile.from_values(GOOD_VM, stack="staging-2")
    unit = systemd_unit.render_unit(spec, layout.VM)
    assert "(stack staging-2)" in unit
    assert unit.count("[Service]") == 1


NEWLINE_VALUES = {
    "modelRevision": "e949c91dec92095908d34e6b560af77dd0c993f8\n",
    "vllmVersion": "0.33.0\n",
    "sshPublicKey": GOOD_VM["sshPublicKey"] + "\nssh-ed25519 AAAAother",
    "vllmImage": "vllm/vllm-openai:v0.33.0\nExecStartPre=+/bin/sh",
    "location": "swedencentral\n",
    "servedModelName": "exaone\n",
    "nvidiaDriverBranch": "570\n",
    "adminUser": "azureuser\n",
    "modelSource": "blob://models/exaone\n",
    "sshPrivateKeyPath": "~/.ssh/id\n[Service]",
}


@pytest.mark.parametrize(("key", "value"), list(NEWLINE_VALUES.items()), ids=list(NEWLINE_VALUES))
def test_a_trailing_newline_or_line_break_is_refused(key: str, value: str) -> None:
    with pytest.raises(SpecError) as caught:
        stackfile.from_values({**GOOD_VM, key: value}, stack="t", where="Pulumi.t.yaml")
    lines = [str(p) for p in caught.value.problems]
    assert any(f"exaone-serving:{key}" in line for line in lines), lines
    assert all("\n" not in line for line in lines)


@pytest.mark.parametrize("field", ["name", "version", "source"])
def test_an_adapter_value_with_a_newline_is_refused(field: str) -> None:
    adapter = {**GOOD_VM["adapters"][0]}
    adapter[field] = adapter[field] + "\n"
    with pytest.raises(SpecError) as caught:
        stackfile.from_values({**GOOD_VM, "adapters": [adapter]}, stack="t")
    assert any("adapters[0]" in p.where for p in caught.value.problems)


# --- loose scalars, reserved names, the model --------------------------------------------

LOOSE = {
    "rank-as-text": ("adapters", [{**GOOD_VM["adapters"][0], "rank": "32"}], "adapters[0].rank"),
    "rank-as-bool": ("adapters", [{**GOOD_VM["adapters"][0], "rank": True}], "adapters[0].rank"),
    "rank-as-float": ("adapters", [{**GOOD_VM["adapters"][0], "rank": 16.0}], "adapters[0].rank"),
    "vmCount-as-text": ("vmCount", "1", "vmCount"),
    "vmCount-as-bool": ("vmCount", True, "vmCount"),
    "vmCount-as-float": ("vmCount", 1.0, "vmCount"),
    "maxLoras-as-text": ("maxLoras", "4", "maxLoras"),
    "vllmPort-as-float": ("vllmPort", 8000.0, "vllmPort"),
    "production-as-text": ("production", "false", "production"),
    "production-as-int": ("production", 1, "production"),
    "runtimeLoraUpdating-as-text": ("runtimeLoraUpdating", "yes", "runtimeLoraUpdating"),
    "sshCidrs-as-text": ("sshCidrs", "203.0.113.0/24", "sshCidrs"),
    "target-as-number": ("target", 1, "target"),
}


@pytest.mark.parametrize(("key", "value", "named"), list(LOOSE.values()), ids=list(LOOSE))
def test_loose_scalars_are_refused(key: str, value: Any, named: str) -> None:
    with pytest.raises(SpecError) as caught:
        stackfile.from_values({**GOOD_VM, key: value}, stack="t", where="Pulumi.t.yaml")
    wheres = [p.where for p in caught.value.problems]
    assert f"Pulumi.t.yaml: exaone-serving:{named}" in wheres, wheres


@pytest.mark.parametrize("user", ["root", "admin", "administrator", "guest", "sys", "daemon",
                                  "nobody", "exaone", "support_388945a0", "test1"])
def test_reserved_admin_users_are_refused(user: str) -> None:
    with pytest.raises(SpecError) as caught:
        stackfile.from_values({**GOOD_VM, "adminUser": user}, stack="t")
    assert [p.where.split(": ")[-1] for p in caught.value.problems] == ["exaone-serving:adminUser"]


@pytest.mark.parametrize("model", ["meta-llama/Llama-3.1-8B-Instruct", "LGAI-EXAONE/EXAONE-4.0-32B",
                                   "lgai-exaone/exaone-3.5-2.4b-instruct"])
def test_a_model_the_cloud_cannot_serve_is_refused_by_validate_and_plan(
        tmp_path: Path, model: str) -> None:
    path = write(tmp_path, stack_text(modelId=model))
    assert_refused_by_cli(path, tmp_path, must_name="exaone-serving:modelId")


# --- crashes and exhaustion ---------------------------------------------------------------

def alias_bomb() -> str:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\nconfig:\n  exaone-serving:vllmExtraArgs: *i\n"


EXHAUSTING: dict[str, tuple[str | bytes, str]] = {
    "latin-1": ("config:\n  exaone-serving:location: s\xe9\n".encode("latin-1"), "not UTF-8"),
    "binary": (b"\xff\xfe\x00\x01", "not UTF-8"),
    "deep-flow": ("config: " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper"),
    "deep-block": ("config:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 40)),
                   "nests deeper"),
    "huge-int": ("config:\n  exaone-serving:vmCount: " + "9" * 5000 + "\n", "digits"),
    "long-int": ("config:\n  exaone-serving:vmCount: 1" + "0" * 30 + "\n", "digits"),
    "alias-bomb": (alias_bomb(), "expands to more than"),
    "merge-key": ("base: &b {x: 1}\nconfig:\n  <<: *b\n", "merge key"),
    "bad-yaml": ("config:\n  exaone-serving:apiKey: [" + SECRET + "\n", "not valid YAML"),
    "tab-indent": ("config:\n\texaone-serving:target: vm\n", "not valid YAML"),
}


@pytest.mark.parametrize(("text", "says"), list(EXHAUSTING.values()), ids=list(EXHAUSTING))
def test_hostile_files_are_refused_quickly(tmp_path: Path, text: str | bytes, says: str) -> None:
    lines = refused(write(tmp_path, text))
    assert len(lines) == 1 and says in lines[0], lines
    assert SECRET not in lines[0]


def test_a_50_mb_file_is_refused_after_reading_its_head(tmp_path: Path) -> None:
    path = tmp_path / "Pulumi.t.yaml"
    with open(path, "w") as handle:
        handle.write(stack_text())
        handle.write(("# " + "x" * 1022 + "\n") * 50 * 1024)
    lines = refused(path)
    limit = yamlfile.MAX_BYTES // 1024
    assert lines == [f"{path}: is larger than {limit} KiB; allowed: a stack file"]


@pytest.mark.parametrize("case", ["alias-bomb", "deep-flow", "huge-int", "latin-1"])
def test_hostile_files_through_the_cli(tmp_path: Path, case: str) -> None:
    path = write(tmp_path, EXHAUSTING[case][0])
    assert_refused_by_cli(path, tmp_path, must_name=EXHAUSTING[case][1])


# --- secrets --------------------------------------------------------------------------------

SECRET_PLACES = {
    "apiKeyRef-is-the-key": {"apiKeyRef": SECRET},
    "apiKeyRef-with-colon": {"apiKeyRef": f"key:{SECRET}"},
    "apiKeyRef-env-of-the-key": {"apiKeyRef": f"env:{SECRET}"},
    "apiKey-in-clear": {"apiKey": SECRET, "apiKeyRef": ""},
    "hfTokenRef-is-the-token": {"hfTokenRef": SECRET},
    "extra-arg": {"vllmExtraArgs": [f"--api_key={SECRET}"]},
    "private-key-for-its-path": {"sshPrivateKeyPath": f"-----BEGIN KEY-----\n{SECRET}\n"},
    "index-url-with-token": {"pipIndexUrl": f"https://user:{SECRET}@pypi.example/simple\n"},
    "extra-index-with-token": {"pipExtraIndexUrls": [f"https://u:{SECRET}@x.example/s x"]},
}


@pytest.mark.parametrize("changes", list(SECRET_PLACES.values()), ids=list(SECRET_PLACES))
def test_no_error_echoes_a_secret(tmp_path: Path, changes: dict[str, Any]) -> None:
    path = write(tmp_path, stack_text(**changes))
    lines = refused(path)
    assert lines and all(SECRET not in line for line in lines), lines
    assert_refused_by_cli(path, tmp_path, must_name="exaone-serving:")


# --- output: one literal line, all or nothing ------------------------------------------------

@pytest.mark.parametrize("name", ["x\nok Pulumi.dev.yaml", "[green]ok[/] x", "exaone-serving:x:"])
def test_a_path_prints_as_written(tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir(parents=True)
    path = write(folder, "confg: {}\n", name="stack.yaml")
    done = cli("validate", "--config", str(path))
    assert done.returncode == EXIT_BAD_INPUT
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(str(path).replace("\n", "\\n"))


def test_render_onto_a_file_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("keep\n")
    done = cli("render", "--stack", "dev", "--out", str(target))
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.startswith("--out: ") and "Traceback" not in done.stderr
    assert target.read_text() == "keep\n"


def test_render_with_a_file_in_the_way_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "monitoring").mkdir(parents=True)
    (out / "vllm").write_text("in the way\n")
    done = cli("render", "--stack", "dev", "--out", str(out))
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert sorted(p.name for p in out.rglob("*")) == ["monitoring", "vllm"]


def test_render_failing_half_way_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    files = artifacts.artifacts(stackfile.load(stack="dev"), stackfile.ROOT)
    real_write_text = Path.write_text
    written: list[Path] = []

    def fail_on_third(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        written.append(self)
        if len(written) == 3:
            raise OSError(28, "No space left on device", str(self))
        return real_write_text(self, data, *args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(Path, "write_text", fail_on_third)
    with pytest.raises(SpecError) as caught:
        artifacts.write(files, out)
    monkeypatch.undo()
    assert "No space left" in str(caught.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone too


def test_render_into_an_existing_folder_replaces_its_files(tmp_path: Path) -> None:
    files = {"a.txt": "new\n", "sub/b.txt": "b\n"}
    (tmp_path / "keep.txt").write_text("mine\n")
    (tmp_path / "a.txt").write_text("old\n")
    written = artifacts.write(files, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == ["a.txt", "sub/b.txt"]
    assert (tmp_path / "a.txt").read_text() == "new\n"
    assert (tmp_path / "keep.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "keep.txt", "sub"]


@pytest.mark.parametrize("name", ["[red]x[/red]", "exaone-serving:x:", "a[b]:smile:"])
def test_rendered_paths_print_as_written(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    done = cli("render", "--stack", "dev", "--out", str(out))
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    assert printed and all(line.startswith(f"wrote {out}/") for line in printed), printed


def test_plan_markdown_onto_a_folder_is_refused(tmp_path: Path) -> None:
    done = cli("plan", "--stack", "dev", "--markdown", str(tmp_path))
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.startswith("--markdown: ") and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_digest_prints_one_line_per_folder(tmp_path: Path) -> None:
    folder = tmp_path / "a\nb0000000000000000000000000000000000000000000000000000000000000000  x"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    done = cli("digest", str(folder))
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "y", "n"])
def test_yaml_1_1_booleans_are_text_as_in_pulumi(tmp_path: Path, word: str) -> None:
    lines = refused(write(tmp_path, stack_text() + f"  exaone-serving:encryptionAtHost: {word}\n"))
    assert lines == [f"{tmp_path / 'Pulumi.t.yaml'}: exaone-serving:encryptionAtHost: is a "
                     "string; allowed: true or false (unquoted)"]


@pytest.mark.parametrize(("text", "value"), [("19:00", "19:00"), ("07:30", "07:30")])
def test_a_time_is_text_not_a_base_60_number(tmp_path: Path, text: str, value: str) -> None:
    body = stack_text().replace("config:\n", "config:\n  exaone-serving:autoShutdownTime: "
                                + text + "\n", 1)
    assert stackfile.load(config=write(tmp_path, body)).vm.auto_shutdown_time == value


CLI_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "ssh-ipv4-halves": ({"sshCidrs": ["0.0.0.0/1", "128.0.0.0/1"]}, "exaone-serving:sshCidrs"),
    "api-ipv6-halves": ({"apiCidrs": ["::/1", "8000::/1"]}, "exaone-serving:apiCidrs"),
    "api-ipv4-mapped": ({"apiCidrs": ["::ffff:0:0/96"]}, "exaone-serving:apiCidrs"),
    "vnet-everything": ({"vnetCidr": "0.0.0.0/0"}, "exaone-serving:vnetCidr"),
    "api-key-underscored": ({"vllmExtraArgs": [f"--api_key={SECRET}"]}, "vllmExtraArgs[0]"),
    "host-abbreviated": ({"vllmExtraArgs": ["--hos=10.0.0.1"]}, "vllmExtraArgs[0]"),
    "flags-file": ({"vllmExtraArgs": ["--config", "/tmp/flags.yaml"]}, "vllmExtraArgs[0]"),
    "rank-as-text": ({"adapters": [{**GOOD_VM["adapters"][0], "rank": "32"}]},
                     "exaone-serving:adapters[0].rank"),
    "vmCount-as-text": ({"vmCount": "1"}, "exaone-serving:vmCount"),
    "admin-root": ({"adminUser": "root"}, "exaone-serving:adminUser"),
}


@pytest.mark.parametrize("case", list(CLI_CASES), ids=list(CLI_CASES))
def test_hostile_values_through_the_cli(tmp_path: Path, case: str) -> None:
    changes, named = CLI_CASES[case]
    assert_refused_by_cli(write(tmp_path, stack_text(**changes)), tmp_path, must_name=named)


@pytest.mark.parametrize("text", [DUPLICATES["production"], SHAPES["misspelt-config"][0],
                                  stack_text() + "  exaone-servng:production: true\n"])
def test_hostile_files_through_validate_render_and_plan(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert_refused_by_cli(path, tmp_path, must_name=str(path))
