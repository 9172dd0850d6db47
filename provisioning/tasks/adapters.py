"""`fab adapters.<op>`: the runtime adapter operations against each VM in turn.

Each operation runs ON the host with the project's adapter tool (``python -m serving
adapters``, from the shipped bundle) against the host's own vLLM, so it verifies by the
model's answers exactly as it does locally, and keeps the adapter record beside the
adapters. Hosts go one at a time; the first failure stops the rest (the failed host has
already rolled itself back where the operation allows).

    fab adapters.add NAME VERSION --source blob://adapters/NAME/VERSION --sha256 HEX --stack dev
    fab adapters.hotfix NAME VERSION --source ... --sha256 ...
    fab adapters.rollback NAME | adapters.remove NAME | adapters.reconcile | adapters.list
    fab adapters.settle [--name NAME]   (after a hotfix/rollback whose settle was deferred)
"""

from __future__ import annotations

from fabric import task
from invoke import Collection
from invoke.exceptions import Exit

from provisioning import rotation
from provisioning.bundle import host_python
from provisioning.remote import RemoteError
from provisioning.settings import DeploySettings
from provisioning.steps.converge import Target
from provisioning.steps.model import blob_args, stack_file
from provisioning.tasks import options as cli_options
from serving.stack.digest import digest_problem
from serving.stack.errors import Problem
from serving.stack.spec import BLOB_RE, name_problem, version_problem

OP_TIMEOUT_SECONDS = 900


def _each_host(s: DeploySettings, body, *, changes: bool = True) -> None:
    if changes and rotation.wanted(len(s.hosts), dry=False):
        # Out of the load balancer's rotation while its adapters change (provisioning.rotation).
        turn = rotation.Rotation()
        inner = body

        def body(t: Target) -> None:
            turn.around(t, inner)

    for run in cli_options.each_host(s, body):
        if run.error:
            raise Exit(f"{run.host}: {run.error}\nhosts after {run.host} were not changed",
                       code=1)


def _op(t: Target, *argv: str) -> None:
    code, out, err = t.host.run(host_python("serving.adapters.cli", *argv, "--config",
                                            stack_file(t)), sudo=True, check=False,
                                timeout_s=OP_TIMEOUT_SECONDS)
    for line in out.rstrip().splitlines():
        t.say(line)
    if code:
        raise RemoteError(f"adapters {' '.join(argv)}", code, "", err)


def _fetch(t: Target, name: str, version: str, source: str, sha256: str) -> None:
    args, stdin = blob_args(t)
    done = t.host.json(host_python("serving.host.adapters", "fetch", "--config", stack_file(t),
                                   *args, name, version, "--source", source, "--sha256", sha256),
                       sudo=True, stdin=stdin, lock=True)
    t.say(f"{name} {version}: {'fetched and checked' if done['fetched'] else 'already there'}"
          f" at {done['path']}")


def version_arg_problems(name: str, version: str, source: str, sha256: str) -> list[Problem]:
    """Every problem of add/hotfix's arguments (checked before any host is touched)."""
    found: list[Problem] = []
    if name_problem(name):
        found.append(Problem("NAME", name_problem(name)))
    if version_problem(version):
        found.append(Problem("VERSION", version_problem(version)))
    if bool(source) != bool(sha256):
        found.append(Problem("--source/--sha256",
                             "go together (the digest pins what is fetched)"))
    if source and not BLOB_RE.fullmatch(source):
        found.append(Problem("--source", f"{source!r} is malformed; allowed: "
                                         "blob://container/path"))
    if sha256 and digest_problem(sha256):
        found.append(Problem("--sha256", digest_problem(sha256)))
    return found


def check_version_args(name: str, version: str, source: str, sha256: str) -> str:
    """The first problem of add/hotfix's arguments, as one line; empty when there is none."""
    found = version_arg_problems(name, version, source, sha256)
    return f"{found[0].where} {found[0].message}" if found else ""


def _versioned(op: str):
    def body(c, name, version, source="", sha256="", stack="", config="", hosts="",
             blob_url="", blob_connection_string_env="", connect_timeout=0.0):
        s = cli_options.load(c, stack=stack, config=config, hosts=hosts, blob_url=blob_url,
                             blob_connection_string_env=blob_connection_string_env,
                             connect_timeout=connect_timeout,
                             also=version_arg_problems(name, version, source, sha256))

        def run(t: Target) -> None:
            if source:
                _fetch(t, name, version, source, sha256)
            _op(t, op, name, version)

        _each_host(s, run)

    body.__name__ = op
    body.__doc__ = {"add": "Fetch (optional) and load a new adapter on each VM, verified by "
                           "its answers.",
                    "hotfix": "Replace an adapter's weights in place on each VM; a failure "
                              "rolls that VM back."}[op]
    return task(help={**cli_options.HELP, "source": "blob://container/path of the version",
                      "sha256": "its folder digest (`python -m serving digest FOLDER`)"})(body)


add = _versioned("add")
hotfix = _versioned("hotfix")


def _named(op: str):
    def body(c, name="", stack="", config="", hosts="", deadline=60.0, blob_url="",
             blob_connection_string_env="", connect_timeout=0.0, rebuild=False):
        s = cli_options.load(c, stack=stack, config=config, hosts=hosts, blob_url=blob_url,
                             blob_connection_string_env=blob_connection_string_env,
                             connect_timeout=connect_timeout, gate=op != "list")
        argv = [op]
        if op in ("rollback", "remove"):
            if not name:
                raise Exit(f"adapters.{op} needs --name NAME", code=2)
            argv.append(name)
        if op == "settle" and name:
            argv.append(name)
        if op in ("remove", "reconcile"):
            argv += ["--deadline", str(float(deadline))]
        if rebuild:
            if op != "reconcile":
                raise Exit(f"--rebuild belongs to adapters.reconcile, not adapters.{op}", code=2)
            argv.append("--rebuild")
        _each_host(s, lambda t: _op(t, *argv), changes=op != "list")

    body.__name__ = op
    body.__doc__ = {"rollback": "Back to the previous recorded version on each VM.",
                    "remove": "Wait for the adapter's requests to finish, unload it, on each VM.",
                    "reconcile": "Make each VM's loaded adapters equal its record.",
                    "settle": "Load in-place loaded adapters once more, plainly, on each VM "
                              "(vLLM re-reads in-place loaded weights on every step).",
                    "list": "The record versus what vLLM has loaded, per VM."}[op]
    return task(help={**cli_options.HELP, "name": "adapter name",
                      "deadline": "seconds to wait for running requests",
                      "rebuild": "reconcile: rebuild a damaged adapter record from what vLLM "
                                 "serves and the adapter folders first"})(body)


rollback = _named("rollback")
remove = _named("remove")
reconcile = _named("reconcile")
settle = _named("settle")
list_ = _named("list")

ns = Collection("adapters")
for _t in (add, hotfix, rollback, remove, reconcile, settle):
    ns.add_task(_t)
ns.add_task(list_, name="list")
