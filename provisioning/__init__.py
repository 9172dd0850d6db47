"""Fabric tasks that roll the VMs forward; the root collection only composes namespaces."""

from __future__ import annotations

from pathlib import Path

from invoke import Collection, task

from serving.stack import stackfile
from serving.stack.errors import SpecError


@task(help={"stack": "stack name: Pulumi.<STACK>.yaml",
            "config": "a stack config file instead of --stack",
            "subscription": "for preflight; default: ARM_SUBSCRIPTION_ID or `az account show`"})
def validate(c, stack: str = "dev", config: str = "", subscription: str = "") -> None:
    """Validate the stack as `fab deploy` and `pulumi up` will (the spec, the capacity plan, no
    example values left), then ask the subscription what `pulumi up` needs (preflight, when
    this machine has Azure credentials), before anything touches a host."""
    from invoke.exceptions import Exit

    from serving.cloud import azure, preflight
    from serving.plan import gate

    try:
        spec = stackfile.load(config=Path(config)) if config else stackfile.load(stack=stack)
        gate.require(spec, where=config or None)
    except SpecError as exc:
        raise Exit("\n".join(str(p) for p in exc.problems), code=2) from None
    print(f"{spec.stack}: valid ({spec.target}, {len(spec.adapters)} adapters)")
    if not spec.on.cloud:
        return
    if not azure.credentials_present():
        print("preflight skipped: no Azure credentials (`az login`, or ARM_* variables)")
        return
    try:
        access = azure.connect(subscription)
    except azure.AzureAccessError as exc:
        raise Exit(f"credentials: {exc}", code=2) from None
    report = preflight.run(spec, access)
    for note in report.notes:
        print(note)
    if report.findings:
        raise Exit("\n".join(str(f) for f in report.findings), code=1)
    print(f"{spec.stack}: preflight found nothing missing")


from provisioning.tasks import adapters as adapter_tasks  # noqa: E402
from provisioning.tasks.bench import bench  # noqa: E402
from provisioning.tasks.deploy import deploy  # noqa: E402
from provisioning.tasks.status import status  # noqa: E402
from provisioning.tasks.teardown import teardown  # noqa: E402

ns = Collection(validate, bench, deploy, status, teardown)
ns.add_collection(adapter_tasks.ns)
