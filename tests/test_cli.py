"""Tier 1: the CLI's contract: exit 0 on success; exit 2, one line per problem, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from k8s import autoscale
from k8s import objects as k8s_objects
from serving.cli import main
from serving.local.loramaker import make_adapter
from serving.local.tinymodel import DEFAULT_MODEL_ID
from serving.render import artifacts as render
from serving.render import monitoring, systemd_unit, vllm_args
from serving.stack import layout, stackfile
from serving.stack.digest import folder_digest
from serving.stack.errors import EXIT_BAD_INPUT

BAD_STACK = """\
config:
  exaone-serving:target: vm
  exaone-serving:sshCidrs: ["0.0.0.0/0"]
  exaone-serving:vmSize: Standard_D4s_v5
  exaone-serving:vllmVersion: 0.21.0
  exaone-serving:apiKey: hunter2
"""


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_STACK)
    return path


@pytest.mark.parametrize("name", stackfile.stack_names())
def test_validate_each_stack(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--stack", name, "--allow-examples"]) == 0
    assert f"{name}: valid" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_validate_refuses_cloud_stacks_with_example_values(name: str, capsys) -> None:
    """The checked-in cloud stacks are examples: validate says what to replace, each key."""
    assert main(["validate", "--stack", name]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    keys = {line.split(": ")[1] for line in err.strip().splitlines()}
    assert {"exaone-serving:sshCidrs", "exaone-serving:apiCidrs",
            "exaone-serving:adapters[0].sha256"} <= keys, err
    assert ("exaone-serving:sshPublicKey" in keys) == (name == "dev"), err
    assert all("replace" in line for line in err.strip().splitlines()), err


def test_validate_bad_config_lists_every_problem(bad_config: Path, capsys) -> None:
    assert main(["validate", "--config", str(bad_config)]) == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    keys = sorted(line.split(": ")[1] for line in lines)
    assert keys == [
        "exaone-serving:apiKey",
        "exaone-serving:sshCidrs[0]",
        "exaone-serving:vllmVersion",
        "exaone-serving:vmSize",
    ], lines
    assert all(line.startswith(f"{bad_config}: ") for line in lines)
    assert "hunter2" not in "\n".join(lines), "a secret must never be echoed"


def test_render_bad_input_writes_nothing(bad_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["render", "--config", str(bad_config), "--out", str(out)]) == EXIT_BAD_INPUT
    assert not out.exists()


@pytest.mark.parametrize("name", stackfile.stack_names())
def test_render_writes_what_the_builders_produce(name: str, tmp_path: Path) -> None:
    assert main(["render", "--stack", name, "--out", str(tmp_path)]) == 0
    spec = stackfile.load(stack=name)
    place = layout.for_target(spec, stackfile.ROOT)
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert json.loads((tmp_path / "vllm/command.json").read_text()) == vllm_args.command(
        spec, place
    )
    rules = yaml.safe_load((tmp_path / "monitoring/alert-rules.yaml").read_text())
    assert rules == monitoring.alert_rules(spec)
    if spec.target == "vm":
        unit = (tmp_path / "systemd" / systemd_unit.UNIT_NAME).read_text()
        assert unit == systemd_unit.render_unit(spec, layout.VM)
        assert "VLLM_API_KEY" not in (tmp_path / "systemd" / systemd_unit.ENV_NAME).read_text()
    if spec.target == "aks":
        kinds = [
            d["kind"]
            for p in sorted(tmp_path.glob("k8s/*.yaml"))
            for d in yaml.safe_load_all(p.read_text())
        ]
        built = [
            o["kind"] for o in [*k8s_objects.device_plugin(spec), *k8s_objects.vllm_objects(spec),
                                *autoscale.autoscale_objects(spec, port_name=k8s_objects.PORT_NAME)]
        ]
        assert sorted(kinds) == sorted(built)
        # The add-ons' objects are rendered too, so the checkers see what Pulumi applies.
        assert "PodMonitor" in kinds
        assert ("ScaledObject" in kinds) == spec.scale.enabled
        assert "Secret" not in kinds, "rendered files must not carry the API key"
    else:
        assert not any(w.startswith("k8s/") for w in written)


def test_render_is_all_or_nothing(monkeypatch, tmp_path: Path) -> None:
    def broken(*_a, **_k):
        raise RuntimeError("builder failed")

    monkeypatch.setattr(monitoring, "scrape_config", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        render.write(render.artifacts(stackfile.load(stack="dev"), stackfile.ROOT), out)
    assert not out.exists()


def test_check_adapter_verdicts(
    tiny_model: Path, good_adapters: dict[str, Path], tmp_path: Path, capsys
) -> None:
    paths = [str(p) for p in good_adapters.values()]
    assert main(["check-adapter", *paths, "--base-model", str(tiny_model)]) == 0
    assert capsys.readouterr().out.count("ok ") == len(paths)

    too_big = make_adapter(
        tmp_path / "rank64", base=tiny_model, rank=64, seed=9, base_model_id=DEFAULT_MODEL_ID
    )
    code = main(
        ["check-adapter", str(too_big), "--base-model", str(tiny_model), "--max-lora-rank", "16"]
    )
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "adapter_config.json" in err and "64" in err

    wrong_base = make_adapter(
        tmp_path / "other-base", base=tiny_model, rank=8, seed=9, base_model_id="someone/else"
    )
    assert main(["check-adapter", str(wrong_base), "--base-model", str(tiny_model)]) == 2
    assert "someone/else" in capsys.readouterr().err


def test_check_adapter_sha256_and_bad_arguments(
    good_adapters: dict[str, Path], tiny_model: Path, capsys
) -> None:
    path = good_adapters["all-modules"]
    good = folder_digest(path)
    base = ["--base-model", str(tiny_model)]
    assert main(["check-adapter", str(path), *base, "--sha256", good]) == 0
    assert main(["check-adapter", str(path), *base, "--sha256", "0" * 64]) == 2
    assert "folder digest" in capsys.readouterr().err
    for not_a_digest in ("deadbeef", good.upper(), good + "0", f"sha256:{good}", ""):
        assert main(["check-adapter", str(path), *base, "--sha256", not_a_digest]) == 2
        err = capsys.readouterr().err
        assert err.startswith("--sha256: ") and "64 lowercase hex" in err, err
    assert main(["check-adapter", str(path)]) == 2
    assert "--base-model" in capsys.readouterr().err
    assert main(["check-adapter", str(path), *base, "--max-lora-rank", "24"]) == 2
    assert "--max-lora-rank" in capsys.readouterr().err
    assert main(["check-adapter", str(path), "--base-model", "nobody/nothing"]) == 2
    assert "nobody/nothing" in capsys.readouterr().err


def test_digest_prints_the_folder_digest(good_adapters: dict[str, Path], capsys) -> None:
    path = good_adapters["attention-only"]
    assert main(["digest", str(path)]) == 0
    assert capsys.readouterr().out.split() == [folder_digest(path), str(path)]


def test_module_entry_point_exit_codes(bad_config: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "serving", "validate", "--stack", "local"],
        capture_output=True,
        text=True,
        cwd=stackfile.ROOT,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "serving", "validate", "--config", str(bad_config)],
        capture_output=True,
        text=True,
        cwd=stackfile.ROOT,
        check=False,
    )
    assert bad.returncode == EXIT_BAD_INPUT
    assert len(bad.stderr.strip().splitlines()) == 4


@pytest.mark.parametrize(("extra", "key"), [
    ({"vmImage": "ubuntu-2204"}, "vmImage"),
    ({"vmMetrics": False, "grafana": True}, "grafana"),
])
def test_validate_refuses_metrics_the_stack_cannot_run(extra: dict, key: str, tmp_path: Path,
                                                       capsys) -> None:
    """VM metrics need ubuntu-2404's prometheus; Grafana needs a workspace: one line, exit 2."""
    document = yaml.safe_load(stackfile.stack_path("dev").read_text())
    document["config"].update({f"exaone-serving:{k}": v for k, v in extra.items()})
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["validate", "--config", str(path), "--allow-examples"]) == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"exaone-serving:{key}:" in lines[0], lines
