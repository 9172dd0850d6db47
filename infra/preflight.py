"""Preflight before anything is created, when the machine running `pulumi up` has Azure
credentials (``serving.cloud.preflight``): what would fail half-way stops the run at the start,
every gap at once. Without credentials (CI, previews elsewhere) it says so and the run goes on.
"""

from __future__ import annotations

import pulumi

from serving.cloud import azure
from serving.cloud import preflight as checks
from serving.stack.errors import Problem, SpecError
from serving.stack.spec import Spec


def before_up(spec: Spec) -> None:
    if not azure.credentials_present():
        pulumi.log.info("preflight skipped: no Azure credentials on this machine "
                        "(`python -m serving preflight` runs it on its own)")
        return
    subscription = pulumi.Config("azure-native").get("subscriptionId") or ""
    try:
        access = azure.connect(subscription)
    except azure.AzureAccessError as exc:
        raise SpecError([Problem("preflight", str(exc))]) from None
    report = checks.run(spec, access)
    for finding in report.findings:
        if not finding.blocks_up:
            pulumi.log.warn(f"preflight: {finding}")
    if report.blocking:
        raise SpecError([Problem(f"preflight: {f.check}", f"{f.message}; fix: {f.fix}")
                         for f in report.blocking])
