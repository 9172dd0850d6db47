"""``python -m serving upload`` and ``python -m serving preflight``: the stack's Azure side
from the operator's machine.

    upload    --stack dev [--model DIR] [--adapter NAME=VERSION:DIR ...]
              (--account NAME | --subscription ID | --connection-string-env VAR)
    preflight --stack dev [--subscription ID]

Exit codes: 0 done / nothing missing; 1 Azure answered with a failure, or preflight found
missing prerequisites (one line each, with what fixes it); 2 bad input (one line per problem,
nothing uploaded or asked).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.cloud import blobstore
from serving.cloud.azure import AzureAccessError
from serving.stack import layout, stackfile
from serving.stack.digest import DigestError, folder_digest
from serving.stack.errors import Problem, SpecError
from serving.stack.spec import Spec

EXIT_FAILED = 1


def _spec(args: argparse.Namespace) -> Spec:
    if args.config:
        return stackfile.load(config=Path(args.config))
    return stackfile.load(stack=args.stack)


def _stack_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--stack", help="a checked-in stack: Pulumi.<STACK>.yaml")
    group.add_argument("--config", help="a config file of the same shape")


@dataclass(frozen=True)
class Item:
    label: str  # what the line says: the model, or NAME:VERSION
    folder: Path
    target: blobstore.BlobFolder
    immutable: bool


def _folder_problem(where: str, folder: Path) -> Problem | None:
    if not folder.is_dir():
        return Problem(where, f"{folder} is not a folder")
    return None


def plan(spec: Spec, model: str | None, adapters: list[str]) -> list[Item]:
    """What to upload where, every problem at once (SpecError) before anything is sent."""
    problems: list[Problem] = []
    items: list[Item] = []
    where = f"Pulumi.{spec.stack}.yaml"
    if not model and not adapters:
        problems.append(Problem("--model/--adapter", "nothing to upload; allowed: --model DIR "
                                "and/or --adapter NAME=VERSION:DIR"))
    if model:
        folder = Path(model)
        if spec.model.source_kind != "blob":
            problems.append(Problem("--model", f"{where} reads the model from "
                                    f"{spec.model.source!r}; allowed: a blob:// modelSource"))
        elif (bad := _folder_problem("--model", folder)) is not None:
            problems.append(bad)
        else:
            items.append(Item(f"model {spec.model.id}", folder,
                              blobstore.BlobFolder.parse(spec.model.source), immutable=False))
    for text in adapters:
        name, eq, rest = text.partition("=")
        version, colon, path = rest.partition(":")
        if not (eq and colon and name and version and path):
            problems.append(Problem("--adapter", f"{text!r} is malformed; allowed: "
                                    "NAME=VERSION:DIR"))
            continue
        try:
            adapter = spec.adapter(name)
        except KeyError:
            known = ", ".join(a.name for a in spec.adapters) or "none"
            problems.append(Problem("--adapter", f"{name!r} is not in {where}; allowed: {known}"))
            continue
        index = spec.adapters.index(adapter)
        if adapter.version != version:
            problems.append(Problem("--adapter", f"{name} is at version {adapter.version} in "
                                    f"{where}, not {version}; set adapters[{index}].version "
                                    "first"))
            continue
        if adapter.source_kind != "blob":
            problems.append(Problem("--adapter", f"{name} reads from {adapter.source!r}; "
                                    "allowed: a blob:// source"))
            continue
        folder = Path(path)
        if (bad := _folder_problem("--adapter", folder)) is not None:
            problems.append(bad)
            continue
        try:
            digest = folder_digest(folder)
        except (OSError, DigestError) as exc:
            problems.append(Problem("--adapter", str(exc)))
            continue
        if adapter.sha256 and digest != adapter.sha256:
            problems.append(Problem(
                f"{where}: adapters[{index}].sha256",
                f"is {adapter.sha256}, but {folder} has digest {digest}; allowed: the folder "
                "the stack pins, or pin this digest"))
            continue
        items.append(Item(f"adapter {name}:{version}", folder,
                          blobstore.BlobFolder.parse(adapter.source), immutable=True))
    if problems:
        raise SpecError(problems)
    return items


def _blob_service(spec: Spec, args: argparse.Namespace) -> Any:
    from azure.storage.blob import BlobServiceClient

    if args.connection_string_env:
        value = os.environ.get(args.connection_string_env, "")
        if not value:
            raise SpecError([Problem("--connection-string-env",
                                     f"${args.connection_string_env} is not set")])
        return BlobServiceClient.from_connection_string(value)
    from serving.cloud import azure

    if args.account:
        account, credential = args.account, azure.credential()
    else:
        access = azure.connect(args.subscription or "")
        account, credential = (layout.storage_account_name(spec.stack, access.subscription_id),
                               access.credential)
    return BlobServiceClient(layout.blob_account_url(account), credential=credential)


def cmd_upload(args: argparse.Namespace) -> int:
    from azure.core.exceptions import AzureError

    spec = _spec(args)
    items = plan(spec, args.model, args.adapter or [])
    try:
        service = _blob_service(spec, args)
    except AzureAccessError as exc:
        raise SpecError([Problem("credentials", str(exc))]) from None
    for item in items:
        try:
            done = blobstore.upload_folder(service, item.folder, item.target,
                                           immutable=item.immutable)
        except blobstore.BlobStoreError as exc:
            raise SpecError([Problem(item.label, str(exc))]) from None
        except AzureError as exc:
            line = str(getattr(exc, "message", "") or exc).splitlines()[0][:200]
            print(f"{item.label}: {item.target}: {type(exc).__name__}: {line}", file=sys.stderr)
            return EXIT_FAILED
        print(f"{item.label}: {done.folder} digest {done.digest} "
              f"({done.files} files, {done.uploaded} uploaded, {done.bytes} bytes)")
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    from serving.cloud import azure, preflight

    spec = _spec(args)
    if not spec.on.cloud:
        print(f"{spec.stack}: target {spec.target} creates nothing in Azure; nothing to check")
        return 0
    try:
        access = azure.connect(args.subscription or "")
    except AzureAccessError as exc:
        raise SpecError([Problem("credentials", str(exc))]) from None
    report = preflight.run(spec, access)
    for note in report.notes:
        print(note)
    for finding in report.findings:
        print(finding, file=sys.stderr)
    if report.findings:
        return EXIT_FAILED
    print(f"{spec.stack}: subscription {access.subscription_id} has what `pulumi up` needs")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("upload", help="put a model folder and adapter versions into the "
                       "stack's Blob storage, with their digests")
    _stack_args(u)
    u.add_argument("--model", metavar="DIR", help="the model folder (modelSource blob://...)")
    u.add_argument("--adapter", action="append", metavar="NAME=VERSION:DIR",
                   help="an adapter version the stack names (repeat for more)")
    u.add_argument("--account", help="storage account (`pulumi stack output storageAccount`)")
    u.add_argument("--subscription", help="find the account from the subscription id")
    u.add_argument("--connection-string-env", metavar="VAR",
                   help="read a connection string from $VAR (Azurite, a SAS) instead")
    u.set_defaults(func=cmd_upload)

    p = sub.add_parser("preflight", help="ask the subscription what `pulumi up` will need")
    _stack_args(p)
    p.add_argument("--subscription", help="default: ARM_SUBSCRIPTION_ID or `az account show`")
    p.set_defaults(func=cmd_preflight)
