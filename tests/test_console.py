"""Tier 1: every console of the command-line tools prints user text as written: no markup,
no emoji codes, one line."""

from __future__ import annotations

import importlib

import pytest
from rich.console import Console

from serving.console import literal, marked

CONSOLES = [("serving.cli", "out"), ("serving.plan.cli", "out"), ("serving.bench.cli", "out"),
            ("serving.local.cli", "out"), ("serving.adapters.cli", "out"),
            ("provisioning.tasks.options", "console")]
TEXTS = ["[red]x[/red] [bold]y", "exaone-serving:x: :smile:", "runs/[a]/b]", "ok [/] [link=x]"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(("module", "name"), CONSOLES, ids=[m for m, _ in CONSOLES])
def test_consoles_print_user_text_as_written(module: str, name: str, text: str) -> None:
    console: Console = getattr(importlib.import_module(module), name)
    with console.capture() as captured:
        console.print(text)
    assert captured.get() == text + "\n"


@pytest.mark.parametrize("text", ["a\nok Pulumi.dev.yaml: valid", "x\r[green]ok", "\x1b[2J"])
def test_styled_lines_keep_user_text_on_one_line(text: str) -> None:
    for rendered in (literal(text), marked("ok", "green", text)):
        assert "\n" not in rendered.plain and "\r" not in rendered.plain
        assert "\x1b" not in rendered.plain
