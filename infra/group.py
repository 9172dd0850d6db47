"""The stack's resource group, locked against deletion in production."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_azure_native import authorization, resources


@dataclass(frozen=True)
class ResourceGroupArgs:
    group_name: str
    location: str
    production: bool
    tags: dict[str, str]


class ResourceGroup(pulumi.ComponentResource):
    """One resource group per stack; production adds a CanNotDelete lock on it."""

    def __init__(self, name: str, args: ResourceGroupArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("exaone:infra:ResourceGroup", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.group = resources.ResourceGroup(
            f"{name}-rg",
            resource_group_name=args.group_name,
            location=args.location,
            tags=args.tags,
            opts=child,
        )
        self.name: pulumi.Output[str] = self.group.name
        self.lock: authorization.ManagementLockAtResourceGroupLevel | None = None
        if args.production:
            # A CanNotDelete lock also blocks deleting any resource inside the group, so a
            # production `pulumi destroy` stops until the lock is removed on purpose.
            self.lock = authorization.ManagementLockAtResourceGroupLevel(
                f"{name}-lock",
                lock_name="exaone-production",
                level=authorization.LockLevel.CAN_NOT_DELETE,
                notes="Production serving stack: remove this lock on purpose before deleting.",
                resource_group_name=self.group.name,
                opts=child,
            )
        self.register_outputs({"name": self.name})
