"""Run inside the vLLM venv (not the project's): how vLLM's own parser reads argv variants.

stdin: JSON ``{"base": [the project's argv], "variants": [[item, ...], ...]}``. stdout: JSON
with the option strings of each dest of the real parser, and for each variant appended to the
base the dests it sets away from the base's values (``["<error>"]`` when the parser refuses
it).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser


def parser() -> FlexibleArgumentParser:
    return make_arg_parser(FlexibleArgumentParser(description="probe"))


def parsed(argv: list[str]) -> dict[str, object] | None:
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return vars(parser().parse_args(argv))
        except (SystemExit, Exception):
            return None


def main() -> None:
    request = json.load(sys.stdin)
    options: dict[str, list[str]] = {}
    for action in parser()._actions:
        for option in action.option_strings:
            options.setdefault(action.dest, []).append(option)
    base_argv = request["base"]
    base = parsed(base_argv)
    if base is None:
        raise SystemExit("vLLM's parser refuses the base argv")
    results = []
    for variant in request["variants"]:
        got = parsed(base_argv + variant)
        if got is None:
            results.append(["<error>"])
            continue
        results.append(sorted(k for k in got if repr(got[k]) != repr(base.get(k))))
    json.dump({"options": options, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
