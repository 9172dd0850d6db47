"""Who is deploying, to which subscription: found the way `pulumi up` finds them, never guessed.

The azure-native provider takes its subscription from ``azure-native:subscriptionId``, then
ARM_SUBSCRIPTION_ID, then the Azure CLI's default account; credentials from ARM_*/AZURE_*
service principal or OIDC variables, a managed identity, or `az login`. Preflight runs only when
one of those is present, so a machine without Azure access (CI, the tests) is never slowed by
credential probes.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

ARM_SCOPE = "https://management.azure.com/.default"
AZ_TIMEOUT_SECONDS = 20
_SP_VARS = (("AZURE_CLIENT_ID", "AZURE_TENANT_ID"), ("ARM_CLIENT_ID", "ARM_TENANT_ID"))


class AzureAccessError(Exception):
    """No credentials or no subscription: nothing can be asked."""


@dataclass(frozen=True)
class Azure:
    """What the management and Blob clients are built from. ``transport`` is azure-core's
    HTTP transport (None: the SDK's default)."""

    credential: Any
    subscription_id: str
    transport: Any = None

    def client_kwargs(self) -> dict[str, Any]:
        return {"transport": self.transport} if self.transport is not None else {}

    def principal_id(self) -> str:
        """The deployer's object id, from the ``oid`` claim of its ARM token."""
        token = self.credential.get_token(ARM_SCOPE).token
        try:
            payload = token.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            return str(claims["oid"])
        except (IndexError, KeyError, ValueError) as exc:
            raise AzureAccessError("the ARM token carries no object id (oid)") from exc


def _az_account() -> dict[str, Any] | None:
    az = shutil.which("az")
    if az is None:
        return None
    try:
        done = subprocess.run([az, "account", "show", "--output", "json"], capture_output=True,
                              text=True, timeout=AZ_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        return json.loads(done.stdout)
    except ValueError:
        return None


def credentials_present(env: dict[str, str] | None = None) -> bool:
    env = dict(os.environ if env is None else env)
    if any(all(env.get(v) for v in pair) for pair in _SP_VARS):
        return True
    if any(env.get(flag, "").lower() == "true" for flag in ("ARM_USE_MSI", "ARM_USE_OIDC")):
        return True
    return _az_account() is not None


def subscription(given: str = "", env: dict[str, str] | None = None) -> str:
    env = dict(os.environ if env is None else env)
    found = given or env.get("ARM_SUBSCRIPTION_ID") or env.get("AZURE_SUBSCRIPTION_ID")
    if not found:
        account = _az_account()
        found = str(account.get("id", "")) if account else ""
    if not found:
        raise AzureAccessError(
            "no subscription: `az login` (and `az account set --subscription ID`), or set "
            "ARM_SUBSCRIPTION_ID")
    return found


def credential() -> Any:
    """The deployer's credential, as `pulumi up` finds it; AzureAccessError if there is none."""
    if not credentials_present():
        raise AzureAccessError(
            "no Azure credentials: `az login`, or ARM_CLIENT_ID/ARM_TENANT_ID (with a secret, "
            "OIDC or ARM_USE_MSI) as for `pulumi up`")
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


def connect(subscription_id: str = "") -> Azure:
    """The deployer's credential and subscription; AzureAccessError if there are none."""
    return Azure(credential=credential(), subscription_id=subscription(subscription_id))
