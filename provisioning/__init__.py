"""Fabric tasks that roll the VMs forward; the root collection only composes namespaces."""

from __future__ import annotations

from pathlib import Path

from invoke import Collection, task

from serving.stack import stackfile
from serving.stack.errors import SpecError


@task(help={"stack": "stack name: Pulumi.<STACK>.yaml",
            "config": "a stack config file instead of --stack"})
def validate(c, stack: str = "dev", config: str = "") -> None:
    """Validate the stack's spec before anything touches a host."""
    from invoke.exceptions import Exit

    from serving.plan.cli import fit_problems

    # The same checks as `python -m serving validate`: the spec, then whether it fits.
    try:
        spec = stackfile.load(config=Path(config)) if config else stackfile.load(stack=stack)
        problems = fit_problems(spec, where=config or None)
        if problems:
            raise SpecError(problems)
    except SpecError as exc:
        raise Exit("\n".join(str(p) for p in exc.problems), code=2) from None
    print(f"{spec.stack}: valid ({spec.target}, {len(spec.adapters)} adapters)")


from provisioning.tasks import adapters as adapter_tasks  # noqa: E402
from provisioning.tasks.bench import bench  # noqa: E402
from provisioning.tasks.deploy import deploy  # noqa: E402
from provisioning.tasks.status import status  # noqa: E402
from provisioning.tasks.teardown import teardown  # noqa: E402

ns = Collection(validate, bench, deploy, status, teardown)
ns.add_collection(adapter_tasks.ns)
