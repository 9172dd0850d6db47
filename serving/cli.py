"""``python -m serving``: validate, render, check adapters, digest, demo.

Exit 0 on success. On bad input: one line per problem on stderr, naming the key or file
and what is allowed, exit 2, and nothing written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from serving.console import console, literal, marked
from serving.stack import stackfile
from serving.stack.catalog import ALLOWED_LORA_RANKS, lora_rank_problem
from serving.stack.digest import digest_problem
from serving.stack.errors import Problem, SpecError, one_line
from serving.stack.spec import Spec

out = console()


def _spec(args: argparse.Namespace) -> Spec:
    if args.config:
        return stackfile.load(config=Path(args.config))
    return stackfile.load(stack=args.stack)


def _stack_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--stack", help="a checked-in stack: Pulumi.<STACK>.yaml")
    group.add_argument("--config", help="a config file of the same shape")


def summary_table(specs: list[Spec], title: str) -> Table:
    table = Table(title=title)
    for column in (
        "stack",
        "target",
        "GPU size x count",
        "model @ revision",
        "vLLM",
        "adapters",
        "max-lora-rank",
        "API key",
    ):
        table.add_column(column)
    for spec in specs:
        size = f"{spec.vm.size} x {spec.vm.count}" if spec.on.cloud else "this CPU"
        rev = spec.model.revision[:12] if spec.model.revision else "(local)"
        table.add_row(
            spec.stack,
            spec.target,
            size,
            f"{spec.model.id} @ {rev}",
            f"{spec.vllm.package} {spec.vllm.version}",
            ", ".join(f"{a.name}:{a.version}" for a in spec.adapters) or "-",
            str(spec.max_lora_rank),
            str(spec.api_key),
        )
    return table


def _where(args: argparse.Namespace, spec: Spec) -> str:
    return str(args.config) if args.config else f"Pulumi.{spec.stack}.yaml"


def cmd_validate(args: argparse.Namespace) -> int:
    from serving.plan import gate

    spec = _spec(args)
    # The same gate as `pulumi up` and `fab deploy`: a stack that cannot fit its GPUs, or a
    # cloud stack with example values, is refused here before anything pays for VMs.
    gate.require(spec, where=_where(args, spec), allow_examples=args.allow_examples)
    note = " (shape only: example values allowed)" if args.allow_examples else ""
    out.print(summary_table([spec], f"{spec.stack}: valid{note}"))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from serving.render import artifacts as render

    spec = _spec(args)
    files = render.artifacts(spec, stackfile.ROOT)
    written = render.write(files, Path(args.out))
    for path in written:
        out.print(literal(f"wrote {path}"))
    return 0


def _base_model_id(model: str) -> str:
    """The id adapters must name: a catalog id as is, a model folder's recorded _name_or_path."""
    config = Path(model) / "config.json"
    if config.is_file():
        return str(json.loads(config.read_text()).get("_name_or_path") or model)
    return model


def cmd_check_adapter(args: argparse.Namespace) -> int:
    from serving.adapters import checks as adapter_check
    from serving.stack import layout
    from serving.stack.catalog import EXAONE_MODELS

    if args.sha256 is not None and digest_problem(args.sha256):
        raise SpecError([Problem("--sha256", digest_problem(args.sha256))])
    spec = _spec(args) if (args.stack or args.config) else None
    if args.base_model:
        dims = adapter_check.base_dims(args.base_model)
        base_id = _base_model_id(args.base_model)
    elif spec:
        known = spec.model.id in EXAONE_MODELS
        place = layout.for_target(spec, stackfile.ROOT)
        dims = adapter_check.base_dims(spec.model.id if known else place.model_path(spec))
        base_id = spec.model.id
    else:
        raise SpecError(
            [
                Problem(
                    "--base-model",
                    "is required without --stack/--config; allowed: "
                    "an EXAONE 3.5 repo id or a local model folder",
                )
            ]
        )
    max_rank = args.max_lora_rank or (spec.max_lora_rank if spec else max(ALLOWED_LORA_RANKS))
    rank_problem = lora_rank_problem(max_rank)
    if rank_problem:
        raise SpecError([Problem("--max-lora-rank", rank_problem)])
    problems: list[Problem] = []
    for path in args.paths:
        found = adapter_check.check_adapter(
            Path(path),
            dims=dims,
            base_model_id=base_id,
            max_lora_rank=max_rank,
            sha256=args.sha256,
        )
        problems += found
        if not found:
            out.print(marked("ok", "green", path))
    if problems:
        raise SpecError(problems)
    return 0


def cmd_digest(args: argparse.Namespace) -> int:
    from serving.stack.digest import folder_digest

    for path in args.paths:
        try:
            print(f"{folder_digest(Path(path))}  {one_line(path)}")
        except (OSError, ValueError) as exc:
            raise SpecError([Problem(path, str(exc))]) from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on this machine: every example stack validated and rendered, then the
    local stack served on the CPU through the whole adapter life cycle."""
    import tempfile

    from serving.local import demo
    from serving.render import artifacts as render
    from serving.stack import examples

    specs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in stackfile.stack_names():
            spec = stackfile.load(stack=name)
            files = render.artifacts(spec, stackfile.ROOT)
            render.write(files, Path(tmp, name))
            specs.append(spec)
            todo = len(examples.problems(spec, f"Pulumi.{name}.yaml"))
            note = (f" (an example: {todo} value(s) to replace before `pulumi up`, see "
                    f"`validate --stack {name}`)" if todo else "")
            out.print(marked("✓", "green", f"{name}: valid{note}, {len(files)} artifacts rendered"))
    out.print(summary_table(specs, "Example stacks"))
    if args.render_only:
        return 0
    return demo.run(stackfile.ROOT)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description="EXAONE 3.5 with LoRA adapters on vLLM: validate and render a stack, check "
                    "adapters, plan capacity, benchmark, change adapters at runtime, and serve "
                    "the local stack on this CPU.",
        epilog="Start here: `python -m serving demo` (or `make demo`); then `python -m serving "
               "validate --stack dev`. Bad input exits 2 with one line per problem.")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a stack's config as `pulumi up` and `fab "
                       "deploy` will; prints a summary")
    _stack_args(v)
    v.add_argument("--allow-examples", action="store_true",
                   help="accept example values (the checked-in stacks' SSH key, documentation "
                        "CIDRs, example digests): check the shape alone")
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("render", help="write the stack's artifacts (unit, env, k8s, monitoring)")
    _stack_args(r)
    r.add_argument("--out", required=True, help="folder to write into")
    r.set_defaults(func=cmd_render)

    c = sub.add_parser("check-adapter", help="check PEFT adapter folders before deploying")
    c.add_argument("paths", nargs="+", metavar="PATH")
    c.add_argument("--max-lora-rank", type=int, default=0, help="default: the stack's, else 512")
    c.add_argument("--base-model", help="EXAONE repo id or local model folder")
    c.add_argument("--sha256", help="expected folder digest (see `digest`)")
    c.add_argument("--stack", help="take base model and max rank from this stack")
    c.add_argument("--config", help="as --stack, from a config file")
    c.set_defaults(func=cmd_check_adapter)

    d = sub.add_parser("digest", help="print the folder digest an adapter's sha256 must match")
    d.add_argument("paths", nargs="+", metavar="PATH")
    d.set_defaults(func=cmd_digest)

    from serving.adapters import cli as adapters_cli
    from serving.bench import cli as bench_cli
    from serving.cloud import cli as cloud_cli
    from serving.local import cli as local_cli
    from serving.local import run as localrun
    from serving.plan import cli as plan_cli

    plan_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    adapters_cli.add_parser(sub, restart_local=localrun.restarter)
    local_cli.add_parser(sub)
    cloud_cli.add_parser(sub)

    demo = sub.add_parser("demo", help="the main job on this machine", description=(
        "Validate and render every example stack, then serve the local stack on this CPU "
        "(its own vLLM on a free port, its own state in .local/demo) through add, hotfix, "
        "rollback and remove, each verified by the answers. Runs any number of times; "
        "`local reset --stack local` clears the local target without reinstalling."))
    demo.add_argument("--render-only", action="store_true",
                      help="validate and render the example stacks, do not serve")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SpecError as exc:
        return exc.report()
