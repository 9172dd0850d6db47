"""Tier 1 (and one tier 3 check against vLLM's own parser): vllmExtraArgs may reach no flag
the spec owns, in any spelling vLLM's parser accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from serving.render import vllm_args
from serving.stack import layout, stackfile, vllm_flags, vllm_options
from serving.stack.errors import SpecError
from tests.local_server import VLLM_PYTHON
from tests.stack.test_spec import GOOD_VM

# Each reaches an owned flag in vLLM 0.32's parser (underscores, prefixes, '=' forms,
# aliases, BooleanOptionalAction twins, dotted JSON keys, a flags file).
DISGUISED: list[list[str]] = [
    ["--api-key", "k"],
    ["--api_key=k"],
    ["--api_key", "k"],
    ["--api-k=k"],
    ["--api_k", "k"],
    ["--max_lora_rank=512"],
    ["--max-lora-r", "512"],
    ["--lora_modules", "evil=/anywhere"],
    ["--lora-mod", "evil=/anywhere"],
    ["--default_mm_loras", '{"image": "/anywhere"}'],
    ["--hos=10.9.9.9"],
    ["--ho", "10.9.9.9"],
    ["--por=1"],
    ["--served_model_name", "x"],
    ["--serv", "x"],
    ["-tp", "2"],
    ["-tp=2"],
    ["--tensor_parallel_size=2"],
    ["--device-memory-utilization", "0.5"],
    ["--no-enable-lora"],
    ["--no_trust_remote_code"],
    ["--no-trust-rem"],
    ["--max-cpu-l", "9"],
    ["--max_loras", "9"],
    ["--revision", "main"],
    ["--code_revision=main"],
    ["--tokenizer-rev", "main"],
    ["--uds", "/tmp/x.sock"],
    ["--grpc-port", "9000"],
    ["--hf_token=hf_x"],
    ["--model", "other"],
    ["--mode=other"],
    ["--dtype=float16"],
    ["--max_model_len=99"],
    ["--max-num-s", "9"],
]
# Flags the spec leaves to the operator; each must pass.
ALLOWED: list[list[str]] = [
    ["--kv-cache-dtype", "fp8"],
    ["--kv_cache_dtype=fp8"],
    ["--tokenizer", "/opt/tok"],
    ["--fully-sharded-loras"],
    ["--max-num-batched-tokens", "8192"],
    ["--enable-prefix-caching"],
    ["--lora-dtype", "bfloat16"],
    ["--max-lora-cls-labels", "3"],
    ["--enforce-eager"],
    ["-O3"],
    ["-O=2"],
    ["--block-size=32"],
    ["--enable-prefix-cach"],  # argparse completes an unambiguous prefix
    ["--max_num_batched_tok=4096"],
    ["--speculative-config.num_speculative_tokens=2"],
    ["--seed", "-1"],  # a negative number is a value
]
# Flags vLLM's parser does not know (typos, other tools' flags, ambiguous prefixes): vLLM would
# not start on the host; each is refused when the stack is validated.
UNKNOWN: list[list[str]] = [
    ["--no-such-flag"],
    ["--enable-prefix-cachingg"],
    ["--enable_prefix_cachin_x"],
    ["--kv-cache-type=fp8"],
    ["--max-num-batched-tokens-x=1"],
    ["--enable-p"],  # ambiguous: several --enable-p... flags
    ["-xyz"],
    ["--gpu-mem-util=0.9"],
]


def problems(items: list[str]) -> list[str]:
    with pytest.raises(SpecError) as caught:
        stackfile.from_values({**GOOD_VM, "vllmExtraArgs": items}, stack="t",
                              where="Pulumi.t.yaml")
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize("items", DISGUISED, ids=[" ".join(v) for v in DISGUISED])
def test_owned_flag_in_disguise_is_refused(items: list[str]) -> None:
    lines = problems(items)
    assert len(lines) == 1, lines
    assert "exaone-serving:vllmExtraArgs[0]:" in lines[0]
    assert "rendered from the spec" in lines[0]


@pytest.mark.parametrize("items", ALLOWED, ids=[" ".join(v) for v in ALLOWED])
def test_flags_the_spec_leaves_alone_pass(items: list[str]) -> None:
    assert vllm_flags.extra_arg_problems(items) == []
    spec = stackfile.from_values({**GOOD_VM, "vllmExtraArgs": items}, stack="t")
    assert vllm_args.args(spec, layout.VM)[-len(items):] == items


@pytest.mark.parametrize("items", UNKNOWN, ids=[" ".join(v) for v in UNKNOWN])
def test_a_flag_vllm_does_not_know_is_refused(items: list[str]) -> None:
    lines = problems(items)
    assert len(lines) == 1, lines
    assert lines[0].startswith("Pulumi.t.yaml: exaone-serving:vllmExtraArgs[0]:"), lines[0]
    assert "is not a flag of vLLM" in lines[0] or "abbreviates several vLLM flags" in lines[0]


def test_an_unknown_flag_exits_2_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(stackfile.stack_path("local").read_text().replace(
        "exaone-serving:adapters:", "exaone-serving:vllmExtraArgs: [--enable-prefix-cachingg]\n"
        "  exaone-serving:adapters:", 1))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "serving", "render", "--config", str(config),
                           "--out", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=stackfile.ROOT, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "vllmExtraArgs[0]" in lines[0] and \
        "'--enable-prefix-cachingg' is not a flag of vLLM" in lines[0], lines
    assert not out.exists()


def test_the_checked_in_options_hold_every_owned_and_allowed_flag() -> None:
    """The list the unknown-flag check reads holds every flag the spec renders and every
    flag above that the spec leaves to the operator (the integration test below compares it
    with the real parser)."""
    assert set(vllm_flags.OWNED_OPTIONS) <= vllm_options.OPTIONS
    for items in ALLOWED:
        key = vllm_flags.option_key(items[0])
        assert key is not None and len(vllm_flags.known_reached(key)) == 1, items


@pytest.mark.parametrize("item", ["--api_key=sk-live-123", "--api-key sk-live-123",
                                  "--hf_token=hf_live_123", "--api-k=sk-live-123"])
def test_a_refused_flag_never_shows_its_value(item: str) -> None:
    text = "\n".join(problems([item]))
    assert "live" not in text, text


@pytest.mark.parametrize("item", ["--max-num-batched-tokens 8192", "--enforce-eager fp8"])
def test_a_flag_and_value_in_one_item_is_refused(item: str) -> None:
    assert "holds a space" in problems([item])[0]


def test_a_flags_file_is_refused_in_every_spelling() -> None:
    for items in (["--config", "x.yaml"], ["--config=x.yaml"], ["--confi", "x.yaml"]):
        assert problems(items), items


def test_the_rendered_argv_uses_only_owned_flags() -> None:
    for name in stackfile.stack_names():
        spec = stackfile.load(stack=name)
        place = layout.for_target(spec, stackfile.ROOT)
        flags = {w for w in vllm_args.args(spec, place) if w.startswith("-")}
        assert flags <= set(vllm_flags.OWNED_OPTIONS) | set(spec.vllm.extra_args)


def test_plan_reads_extra_flags_in_any_spelling() -> None:
    items = ("--kv_cache_dtype=fp8", "--block-size", "32")
    assert vllm_flags.value_of(items, "--kv-cache-dtype") == "fp8"
    assert vllm_flags.value_of(items, "--block-size") == "32"
    assert vllm_flags.value_of(("--kv-cache-dtype.x=1",), "--kv-cache-dtype") == "1"


@pytest.mark.integration
def test_the_rules_agree_with_vllms_own_parser(tmp_path: Path) -> None:
    """vLLM's parser (in the vLLM venv) decides, for every variant above, whether an owned
    dest is reached; the spec must refuse exactly those (and vLLM's errors)."""
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"{VLLM_PYTHON} is missing: `python -m serving local setup --stack local`")
    flags_file = tmp_path / "flags.yaml"
    flags_file.write_text("api-key: from-a-file\n")  # what the spec does not set itself
    variants = [*DISGUISED, *ALLOWED, *UNKNOWN, ["--config", str(flags_file)]]
    # Appended to the argv the spec renders, as in the unit and the pod: every variant that
    # reaches an owned flag changes a value the spec set.
    base = vllm_args.args(stackfile.load(stack="dev"), layout.VM)
    done = subprocess.run(
        [str(VLLM_PYTHON), str(Path(__file__).with_name("vllm_parser_probe.py"))],
        input=json.dumps({"base": base, "variants": variants}), capture_output=True, text=True,
        timeout=300, check=True, env={"VLLM_TARGET_DEVICE": "cpu", "PATH": "/usr/bin:/bin"},
    )
    real: dict[str, Any] = json.loads(done.stdout)
    owned = set(vllm_flags.OWNED)
    # Every spelling of an owned dest is listed, and nothing else is listed as owned.
    real_owned = {o for d, opts in real["options"].items() if d in owned for o in opts}
    assert real_owned == set(vllm_flags.OWNED_OPTIONS)
    every = {o for opts in real["options"].values() for o in opts}
    # The checked-in list is this parser's, exactly: a vLLM upgrade that adds, renames or
    # drops a flag shows here.
    assert every == vllm_options.OPTIONS, (sorted(every - vllm_options.OPTIONS),
                                           sorted(vllm_options.OPTIONS - every))
    prefixes = {o for o in every - real_owned
                if any(own != o and own.startswith(o) for own in real_owned)}
    assert prefixes == set(vllm_flags.EXACT_NOT_OWNED)
    for variant, dests in zip(variants, real["results"], strict=True):
        reaches = "<error>" in dests or bool(owned & set(dests))
        refused = bool(vllm_flags.extra_arg_problems(variant))
        assert refused == reaches, (variant, dests)


@pytest.mark.parametrize("items", [["--chat-template", "x\n[Service]"], ["--enforce-eager\n"],
                                   ["--served-model-name\r"], ["--seed", "1\x1b[2J"]])
def test_a_line_break_in_an_argument_is_refused(items: list[str]) -> None:
    lines = problems(items)
    assert any("line break or control character" in line for line in lines), lines
