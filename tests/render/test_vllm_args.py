"""Tier 1: the vLLM command line and environment, rendered from the spec only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.render import vllm_args
from serving.stack import layout, stackfile
from serving.stack.spec import OWNED_FLAGS

STACKS = stackfile.stack_names()


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("name", STACKS)
def test_api_key_never_in_argv(name: str) -> None:
    spec = stackfile.load(stack=name)
    argv = vllm_args.command(spec, layout.for_target(spec, stackfile.ROOT))
    assert "--api-key" not in " ".join(argv)
    assert layout.API_KEY_ENV not in vllm_args.environment(spec, layout.VM)


@pytest.mark.parametrize("name", STACKS)
def test_lora_modules_are_separate_json_items(name: str) -> None:
    spec = stackfile.load(stack=name)
    place = layout.for_target(spec, stackfile.ROOT)
    argv = vllm_args.command(spec, place)
    start = argv.index("--lora-modules") + 1
    items = [json.loads(a) for a in argv[start : start + len(spec.adapters)]]
    assert [i["name"] for i in items] == [a.name for a in spec.adapters]
    assert {i["base_model_name"] for i in items} == {spec.model.served_name}
    for item, adapter in zip(items, spec.adapters, strict=True):
        assert item["path"] == place.adapter_path(spec, adapter)
        assert Path(item["path"]).is_absolute()


def test_revision_and_code_revision_pinned() -> None:
    spec = stackfile.load(stack="dev")
    argv = vllm_args.args(spec, layout.VM)
    assert "--trust-remote-code" in argv
    assert flag_value(argv, "--revision") == spec.model.revision
    assert flag_value(argv, "--code-revision") == spec.model.revision
    assert flag_value(argv, "--max-lora-rank") == "32"  # ranks 16 and 32 in the set
    assert spec.model.revision in flag_value(argv, "--model")


def test_vm_and_pod_get_identical_arguments() -> None:
    spec = stackfile.load(stack="prod")
    assert vllm_args.args(spec, layout.VM) == vllm_args.args(spec, layout.POD)
    assert vllm_args.command(spec, layout.POD)[0] == "python3"
    assert vllm_args.command(spec, layout.VM)[0] == f"{layout.VM.venv_dir}/bin/python"


def test_only_set_flags_are_emitted() -> None:
    local = stackfile.load(stack="local")
    argv = vllm_args.args(local, layout.for_target(local, stackfile.ROOT))
    assert "--gpu-memory-utilization" not in argv  # no GPU on the CPU build
    assert "--tensor-parallel-size" not in argv
    assert "--max-num-seqs" not in argv
    assert "--revision" not in argv  # a local folder has no commit
    assert flag_value(argv, "--host") == "127.0.0.1"
    dev = stackfile.load(stack="dev")
    assert flag_value(vllm_args.args(dev, layout.VM), "--gpu-memory-utilization") == "0.9"


def test_extra_args_come_last_and_do_not_restate_owned_flags() -> None:
    spec = stackfile.load(stack="prod")
    argv = vllm_args.args(spec, layout.POD)
    assert argv[-len(spec.vllm.extra_args) :] == list(spec.vllm.extra_args)
    flags = [a for a in argv if a.startswith("--")]
    assert len(flags) == len(set(flags)), "a flag appears twice"
    assert set(flags) - set(spec.vllm.extra_args) <= OWNED_FLAGS


def test_environment_per_build() -> None:
    local = stackfile.load(stack="local")
    env = vllm_args.environment(local, layout.for_target(local, stackfile.ROOT))
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    dev = stackfile.load(stack="dev")
    env = vllm_args.environment(dev, layout.VM)
    assert "VLLM_TARGET_DEVICE" not in env
    assert env["HF_HUB_OFFLINE"] == "1"
    # Every folder vLLM may write to is a cache; the resolver folder it only reads.
    assert all(
        v.startswith(layout.VM.cache_dir)
        for k, v in env.items()
        if k.endswith(("_HOME", "_DIR", "_ROOT")) and k != "VLLM_LORA_RESOLVER_CACHE_DIR"
    )


def test_resolver_folder_where_adapters_change_at_runtime() -> None:
    """The VM and the local target run the adapter tools beside vLLM: vLLM's filesystem
    resolver covers the moment a settle reloads a name. The pod changes adapters by rollout."""
    for stack, place in (("dev", layout.VM), ("local", layout.local(stackfile.ROOT))):
        env = vllm_args.environment(stackfile.load(stack=stack), place)
        assert env["VLLM_LORA_RESOLVER_CACHE_DIR"] == place.resolver_dir
        assert not place.resolver_dir.startswith(place.adapters_dir + "/")
    prod = stackfile.load(stack="prod")
    prod = prod.model_copy(update={
        "vllm": prod.vllm.model_copy(update={"runtime_lora_updating": True})})
    assert prod.target == "aks"
    env = vllm_args.environment(prod, layout.POD)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" not in env


def test_runtime_script_creates_the_layout_folders() -> None:
    """scripts/runtime.sh lists the VM's folders by hand; vLLM fails to start without them."""
    script = (stackfile.ROOT / "provisioning/steps/scripts/runtime.sh").read_text()
    listed = script.split("state_dirs=(", 1)[1].split(")", 1)[0].split()
    vm = layout.VM
    assert {vm.state_dir, vm.models_dir, vm.adapters_dir, vm.resolver_dir,
            vm.config_dir} <= set(listed)


def test_local_paths_resolve_against_the_checkout() -> None:
    spec = stackfile.load(stack="local")
    place = layout.local(Path("/srv/checkout"))
    argv = vllm_args.args(spec, place)
    assert flag_value(argv, "--model") == "/srv/checkout/.local/models/exaone-3.5-tiny"


# --- apiServerCount: vLLM's --api-server-count --------------------------------------------


def _dev(**overrides: object):
    document = stackfile.stack_path("dev").read_text()
    import yaml

    config = yaml.safe_load(document)["config"]
    values = {k.split(":", 1)[1]: v for k, v in config.items()}
    return stackfile.from_values({**values, **overrides}, stack="asc")


def test_one_api_server_keeps_the_api_server_module_and_no_flag() -> None:
    spec = _dev()
    argv = vllm_args.command(spec, layout.VM)
    assert spec.vllm.api_server_count == 1
    assert "--api-server-count" not in argv
    assert tuple(argv[1:3]) == vllm_args.ENTRYPOINT


def test_several_api_servers_go_through_vllm_serve() -> None:
    spec = _dev(apiServerCount=4, runtimeLoraUpdating=False)
    argv = vllm_args.command(spec, layout.VM)
    assert flag_value(argv, "--api-server-count") == "4"
    assert tuple(argv[1:3]) == vllm_args.SERVE_ENTRYPOINT
    # The launcher is one valid Python statement list, and the unit keeps it one word.
    compile(argv[2], "<launcher>", "exec")
    import shlex

    from serving.render import systemd_unit as su

    words = [w.replace("%%", "%").replace("$$", "$")
             for w in shlex.split(su.exec_line(argv).replace("\\\n", " "))]
    assert words == argv


@pytest.mark.parametrize(("overrides", "message"), [
    ({"apiServerCount": 2}, "runtimeLoraUpdating is on"),
    ({"apiServerCount": 0, "runtimeLoraUpdating": False}, "greater than or equal to 1"),
    ({"apiServerCount": 17, "runtimeLoraUpdating": False}, "less than or equal to 16"),
    ({"vllmExtraArgs": ["--api-server-count", "2"]}, "set apiServerCount instead"),
], ids=["with-runtime-lora", "zero", "too-many", "extra-args"])
def test_api_server_count_is_validated(overrides: dict, message: str) -> None:
    from serving.stack.errors import SpecError

    with pytest.raises(SpecError) as caught:
        _dev(**overrides)
    assert message in str(caught.value)
    assert "apiServerCount" in str(caught.value) or "vllmExtraArgs" in str(caught.value)
