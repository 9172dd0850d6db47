"""Tier 2: the AKS objects and the fetch script through real third-party checkers, and the
script itself run against a stand-in ``az`` on local folders."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import crd_schema
import jsonschema
import pytest
import yaml
from checkers import find_tool

from k8s import fetch, objects
from serving.render import artifacts
from serving.stack import digest, stackfile
from serving.stack.spec import Spec

pytestmark = pytest.mark.tools

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
TOOLS_BIN = ROOT / ".venv-tools" / "bin"
SCRIPT = fetch.SCRIPT_PATH
_CHECKER_TIMEOUT_SECONDS = 300
_SCRIPT_TIMEOUT_SECONDS = 60


def _specs() -> dict[str, Spec]:
    specs = {
        name: stackfile.load(name)
        for name in stackfile.stack_names()
        if stackfile.load(name).target == "aks"
    }
    assert specs, "no checked-in stack targets aks"
    dev = stackfile.load("dev")
    specs["dev-as-aks"] = dev.model_copy(update={"target": "aks"})
    # Autoscaling on and off: the KEDA objects are rendered only with it.
    specs["dev-as-aks-scaled"] = dev.model_copy(update={
        "target": "aks",
        "scale": dev.scale.model_copy(update={"enabled": True, "gpu_nodes_max": 2,
                                              "replicas_max": 2}),
    })
    return specs


def _all_objects(spec: Spec) -> list[dict[str, Any]]:
    """What ``render`` writes (every object Pulumi applies, the add-ons' included), and the
    API key Secret that only Pulumi creates."""
    files = artifacts.artifacts(spec, stackfile.ROOT)
    docs = [yaml.safe_load(text) for rel, text in sorted(files.items())
            if rel.startswith("k8s/")]
    return [*docs, objects.api_key_secret(spec, "not-a-real-key")]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One YAML file per object and stack, as `render` writes them."""
    out = tmp_path_factory.mktemp("k8s")
    for name, spec in _specs().items():
        for i, obj in enumerate(_all_objects(spec)):
            path = out / f"{name}-{i:02d}-{obj['kind'].lower()}.yaml"
            path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return out


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=_CHECKER_TIMEOUT_SECONDS, **kwargs
    )


def _checkov(folder: Path) -> subprocess.CompletedProcess[str]:
    checkov = find_tool("checkov", TOOLS_BIN)
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    argv = [checkov, "-d", str(folder), "--framework", "kubernetes", "--compact", "--quiet"]
    return _run(argv, env=env)


def test_objects_pass_kubernetes_validate_strict(rendered: Path) -> None:
    """Kubernetes' own kinds by kubernetes-validate; the add-ons' kinds (which it skips with a
    warning and exit 0) by the project's schemas of their documented APIs."""
    validate = find_tool("kubernetes-validate", VENV_BIN)
    files = sorted(rendered.glob("*.yaml"))
    assert len(files) >= 9
    custom = []
    for path in files:
        obj = yaml.safe_load(path.read_text())
        if crd_schema.is_custom(obj):
            custom.append(obj["kind"])
            assert crd_schema.errors(obj) == [], path.name
            continue
        result = _run([validate, "--strict", str(path)])
        assert result.returncode == 0, f"{path.name}:\n{result.stdout}{result.stderr}"
        assert "Couldn't find schema" not in result.stdout + result.stderr, path.name
    assert {"PodMonitor", "ScaledObject", "TriggerAuthentication"} <= set(custom)


def test_kubernetes_validate_cannot_judge_the_add_ons_kinds(rendered: Path) -> None:
    """Why the add-ons' schemas are needed: kubernetes-validate passes a custom kind unread."""
    validate = find_tool("kubernetes-validate", VENV_BIN)
    path = next(rendered.glob("*-scaledobject.yaml"))
    result = _run([validate, "--strict", str(path)])
    assert result.returncode == 0
    assert "Couldn't find schema" in result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["PodMonitor", "ScaledObject", "TriggerAuthentication"])
def test_crd_schemas_do_catch_a_bad_object(kind: str) -> None:
    """The add-ons' check can fail: an unknown field, and a value of the wrong type."""
    spec = _specs()["dev-as-aks-scaled"]
    obj = next(o for o in _all_objects(spec) if o["kind"] == kind)
    assert crd_schema.errors(obj) == []
    typo = {**obj, "spec": {**obj["spec"], "minReplicas": 1}}
    assert any("minReplicas" in e for e in crd_schema.errors(typo))
    wrong = {**obj, "spec": {**obj["spec"], next(iter(obj["spec"])): 7}}
    assert crd_schema.errors(wrong)


def test_crd_schemas_are_valid_and_catch_a_bad_enum() -> None:
    """Each schema is itself well formed; a documented enum (KEDA's metricType) is enforced."""
    for schema in crd_schema.SCHEMAS.values():
        jsonschema.Draft7Validator.check_schema(schema)
    spec = _specs()["dev-as-aks-scaled"]
    obj = next(o for o in _all_objects(spec) if o["kind"] == "ScaledObject")
    trigger = {**obj["spec"]["triggers"][0], "metricType": "Average"}
    bad = {**obj, "spec": {**obj["spec"], "triggers": [trigger]}}
    assert any("metricType" in e or "Average" in e for e in crd_schema.errors(bad))


def test_objects_pass_checkov(rendered: Path) -> None:
    result = _checkov(rendered)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Failed checks: 0" in result.stdout


def test_checkov_does_catch_a_weakened_pod(tmp_path: Path) -> None:
    """The checker run above can fail: the same Deployment, loosened, does not pass."""
    deployment = objects.deployment(_specs()["dev-as-aks"], storage_account="acct")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = {"privileged": True, "allowPrivilegeEscalation": True}
    (tmp_path / "weak.yaml").write_text(yaml.safe_dump(deployment))
    result = _checkov(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "CKV_K8S_16" in result.stdout  # privileged


def test_fetch_script_passes_shellcheck() -> None:
    shellcheck = find_tool("shellcheck")
    result = _run([shellcheck, "--shell=bash", "--severity=style", str(SCRIPT)])
    assert result.returncode == 0, result.stdout + result.stderr


# -- the script's folder digest against the definition --------------------------------------


def reference_digest(folder: Path) -> str:
    """The folder digest as defined: ``<sha256>  <relative path>\\n`` per regular file, sorted
    by path bytes, then the sha256 of the text."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    rows = sorted(
        (p.relative_to(folder).as_posix().encode(), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in files
    )
    text = b"".join(digest.encode() + b"  " + rel + b"\n" for rel, digest in rows)
    return hashlib.sha256(text).hexdigest()


def _script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True,
        timeout=_SCRIPT_TIMEOUT_SECONDS, env=env,
    )


def _make_adapter(folder: Path, salt: str) -> Path:
    """Names chosen where byte order differs from other orders: "B" < "a", "a-b" < "a.x" <
    "a/b" (0x2d < 0x2e < 0x2f), hidden files and nesting."""
    files = {
        "adapter_config.json": '{"r": 16}',
        "adapter_model.safetensors": "weights" + salt,
        "B.txt": "upper",
        "a-b": "dash",
        "a.x": "dot",
        "a/b": "slash",
        ".hidden": "h",
        "sub dir/tokenizer.json": "spaces in names",
    }
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def test_script_digest_matches_the_definition_and_serving_digest(tmp_path: Path) -> None:
    folder = _make_adapter(tmp_path / "adapter", "1")
    result = _script("digest", str(folder))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == reference_digest(folder) == digest.folder_digest(folder)
    (folder / "a-b").write_text("changed")
    assert _script("digest", str(folder)).stdout.strip() == digest.folder_digest(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _script("digest", str(empty)).stdout.strip() == digest.folder_digest(empty)


@pytest.mark.parametrize("bad", ["symlink", "backslash"])
def test_script_refuses_what_serving_digest_refuses(tmp_path: Path, bad: str) -> None:
    folder = _make_adapter(tmp_path / "adapter", "1")
    if bad == "symlink":
        (folder / "link").symlink_to(folder / "a.x")
    else:
        (folder / "a\\b").write_text("x")
    with pytest.raises(digest.DigestError):
        digest.folder_digest(folder)
    result = _script("digest", str(folder))
    assert result.returncode != 0
    assert result.stdout == "", "no digest of a partial listing"


# -- the whole fetch against a stand-in az -----------------------------------------------------

FAKE_AZ = r"""#!/usr/bin/env bash
# Stand-in for az: records each call, accepts a federated login, and serves
# "storage blob download-batch" from $FAKE_BLOBS/<container>/<blob names>.
set -euo pipefail
printf '%s\n' "$*" >> "$FAKE_AZ_LOG"
if [[ $1 == login ]]; then
  [[ " $* " == *" --federated-token $(< "$AZURE_FEDERATED_TOKEN_FILE") "* ]] || exit 3
  exit 0
fi
[[ "$1 $2 $3" == "storage blob download-batch" ]] || exit 4
shift 3
while (($#)); do
  case $1 in
    --source) source=$2; shift 2 ;;
    --pattern) pattern=$2; shift 2 ;;
    --destination) destination=$2; shift 2 ;;
    --account-name) [[ $2 == "$STORAGE_ACCOUNT" ]] || exit 5; shift 2 ;;
    *) shift ;;
  esac
done
prefix=${pattern%/\*}
[[ -d $FAKE_BLOBS/$source/$prefix ]] || exit 0
mkdir -p "$destination/$prefix"
cp -R "$FAKE_BLOBS/$source/$prefix/." "$destination/$prefix/"
"""


@pytest.fixture
def blob_world(tmp_path: Path) -> dict[str, Any]:
    blobs = tmp_path / "blobs"
    _make_adapter(blobs / "adapters" / "support-ko" / "3", "support")
    _make_adapter(blobs / "adapters" / "legal" / "1", "legal")
    model = blobs / "models" / "exaone"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "exaone"}')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "az").write_text(FAKE_AZ)
    (bin_dir / "az").chmod(0o755)
    token = tmp_path / "token"
    token.write_text("federated-jwt")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_BLOBS": str(blobs),
        "FAKE_AZ_LOG": str(tmp_path / "az.log"),
        "STORAGE_ACCOUNT": "acct",
        "AZURE_CLIENT_ID": "client",
        "AZURE_TENANT_ID": "tenant",
        "AZURE_FEDERATED_TOKEN_FILE": str(token),
    }
    state = tmp_path / "state"
    rows = [
        ("model", "blob://models/exaone", str(state / "models/org--exaone/rev"), "-"),
        ("adapter", "blob://adapters/support-ko/3", str(state / "adapters/support-ko/3"),
         reference_digest(blobs / "adapters/support-ko/3")),
        ("adapter", "blob://adapters/legal/1/", str(state / "adapters/legal/1"),
         reference_digest(blobs / "adapters/legal/1")),
    ]
    return {"env": env, "rows": rows, "blobs": blobs, "log": tmp_path / "az.log",
            "manifest": tmp_path / "manifest.tsv"}


def _write_manifest(world: dict[str, Any], rows: list[tuple[str, ...]]) -> str:
    world["manifest"].write_text("".join("\t".join(r) + "\n" for r in rows))
    return str(world["manifest"])


def test_script_fetches_and_verifies_everything(blob_world: dict[str, Any]) -> None:
    manifest = _write_manifest(blob_world, blob_world["rows"])
    result = _script(manifest, env=blob_world["env"])
    assert result.returncode == 0, result.stderr
    for _kind, source, destination, sha256 in blob_world["rows"]:
        prefix = source.removeprefix("blob://").rstrip("/")
        assert reference_digest(Path(destination)) == reference_digest(blob_world["blobs"] / prefix)
        if sha256 != "-":
            assert reference_digest(Path(destination)) == sha256
        assert not list(Path(destination).parent.glob(".staging.*")), "staging left behind"
    calls = blob_world["log"].read_text().splitlines()
    assert sum(c.startswith("login ") for c in calls) == 1
    assert sum("download-batch" in c for c in calls) == 3

    # Run again in the same pod (init container restarted): nothing is fetched twice.
    blob_world["log"].write_text("")
    result = _script(manifest, env=blob_world["env"])
    assert result.returncode == 0, result.stderr
    assert blob_world["log"].read_text() == ""


def test_script_fails_the_pod_on_a_digest_mismatch(blob_world: dict[str, Any]) -> None:
    kind, source, destination, _ = blob_world["rows"][1]
    manifest = _write_manifest(blob_world, [(kind, source, destination, "0" * 64)])
    result = _script(manifest, env=blob_world["env"])
    assert result.returncode != 0
    assert "digest mismatch" in result.stderr


def test_script_fails_when_a_source_is_empty(blob_world: dict[str, Any]) -> None:
    destination = str(Path(blob_world["rows"][1][2]).with_name("9"))
    rows = [("adapter", "blob://adapters/support-ko/9", destination, "0" * 64)]
    result = _script(_write_manifest(blob_world, rows), env=blob_world["env"])
    assert result.returncode != 0
    assert "no blobs under blob://adapters/support-ko/9" in result.stderr


def test_script_refuses_to_run_without_workload_identity(blob_world: dict[str, Any]) -> None:
    env = {k: v for k, v in blob_world["env"].items() if k != "AZURE_CLIENT_ID"}
    result = _script(_write_manifest(blob_world, blob_world["rows"]), env=env)
    assert result.returncode != 0
    assert "AZURE_CLIENT_ID" in result.stderr
