"""The workload's user-assigned identity: it reads Blob in one account and nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
from pulumi_azure_native import authorization, managedidentity

from serving.stack.catalog import AZURE_ROLES

# Built-in role "Storage Blob Data Reader": read and list blobs, nothing else.
STORAGE_BLOB_DATA_READER = AZURE_ROLES["Storage Blob Data Reader"]


def role_definition_id(subscription_id: str, role: str) -> str:
    return (f"/subscriptions/{subscription_id}/providers/Microsoft.Authorization/"
            f"roleDefinitions/{role}")


@dataclass(frozen=True)
class WorkloadIdentityArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    subscription_id: pulumi.Input[str]
    # The storage account's resource id: the only scope the identity gets a role on.
    storage_account_id: pulumi.Input[str]
    tags: dict[str, str]


class WorkloadIdentity(pulumi.ComponentResource):
    """A user-assigned identity with Storage Blob Data Reader on the stack's account."""

    def __init__(self, name: str, args: WorkloadIdentityArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("exaone:infra:WorkloadIdentity", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.identity = managedidentity.UserAssignedIdentity(
            f"{name}-id",
            resource_group_name=args.resource_group_name,
            location=args.location,
            tags=args.tags,
            opts=child,
        )
        self.reader = authorization.RoleAssignment(
            f"{name}-blob-reader",
            principal_id=self.identity.principal_id,
            # Without the type, a fresh identity can fail the assignment while Entra ID
            # replicates it ("PrincipalNotFound").
            principal_type=authorization.PrincipalType.SERVICE_PRINCIPAL,
            role_definition_id=pulumi.Output.from_input(args.subscription_id).apply(
                lambda sub: role_definition_id(sub, STORAGE_BLOB_DATA_READER)),
            scope=args.storage_account_id,
            opts=child,
        )
        self.id: pulumi.Output[str] = self.identity.id
        self.name: pulumi.Output[str] = self.identity.name
        self.client_id: pulumi.Output[str] = self.identity.client_id
        self.principal_id: pulumi.Output[str] = self.identity.principal_id
        self.register_outputs({"client_id": self.client_id, "principal_id": self.principal_id})
