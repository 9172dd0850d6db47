"""Tier 3: rolling a fleet without dropping a request, on real parts.

Two test hosts, each its own network namespace (a veth pair, 10.77.N.2) and its own mount
namespace (its own /run/exaone-rotation), each running vLLM CPU with the tiny model on loopback
behind the project's rendered API proxy (Debian's nginx) on the same port. In front, Debian's
HAProxy in TCP mode probing ``/health`` over HTTP like Azure's Load Balancer (open flows stay
on a host it takes out). A bounded client streams completions through it (keep-alive
connections, base model and an adapter) while ``provisioning.rotation`` takes each host out,
touches it and brings it back, one at a time:

- a rolling restart: vLLM stopped and started again, back after /health answers;
- a fleet hotfix: an adapter reloaded in place through vLLM's LoRA API on loopback.

What is not exercised here: SSH (commands reach each host through nsenter instead of sshd; the
remote layer has its own tests) and `fab deploy`'s other steps (a real systemd host runs those
in test_deploy.py). Needs root, iproute2, util-linux (nsenter, unshare), nginx, haproxy,
curl, sudo and the vLLM CPU venv with the tiny model (`python -m serving local setup`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from invoke import Context
from local_server import VLLM_PYTHON, free_port
from provisioning_helpers import settings_for, spec_with

from provisioning import rotation
from provisioning.remote import Host
from provisioning.steps.converge import Target
from serving.render import proxy, vllm_args
from serving.stack import balancer, layout, stackfile
from serving.stack.spec import Spec

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HOSTS = 2
API_PORT = 8000
SUBNET = "10.77"
START_DEADLINE_SECONDS = 420
PROBE_INTER_MS = 1000
PROBE_FALL = 2
CLIENTS = 3
# Each client pauses this long between requests: traffic never stops (every host out of
# rotation keeps getting requests until the balancer notices), but on this machine's two
# cores, clients that never pause starve the restarting host's start of CPU for minutes.
THINK_SECONDS = 0.1
MAX_TOKENS = 8
REQUEST_TIMEOUT_SECONDS = 120


def _tools_or_fail() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (network and mount namespaces)")
    missing = [t for t in ("ip", "nsenter", "unshare", "haproxy", "nginx", "curl", "sudo", "ss")
               if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)} (.ci/tools.sh installs them)")
    if not VLLM_PYTHON.is_file() or not (REPO / ".local/models").is_dir():
        pytest.fail("run `python -m serving local setup --stack local` first")


class NsContext(Context):
    """invoke's local runner, inside one test host's network and mount namespaces."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self._pid = pid

    def run(self, command: str, **kwargs):  # type: ignore[override]
        line = f"nsenter -t {self._pid} -m -n -- bash -c {shlex.quote(command)}"
        return super().run(line, **kwargs)


@dataclass
class FleetHost:
    index: int
    folder: Path
    launcher: subprocess.Popen
    vllm: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"h{self.index}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.index}.2"

    @property
    def pid(self) -> int:
        return self.launcher.pid

    def enter(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "-n", "--", *argv]

    def sh(self, command: str, timeout: float = 30) -> str:
        done = subprocess.run(self.enter("bash", "-c", command), capture_output=True,
                              text=True, timeout=timeout, check=True)
        return done.stdout


@dataclass
class Fleet:
    vm_spec: Spec
    local_spec: Spec
    key: str
    hosts: list[FleetHost]
    lb_url: str
    folder: Path
    vllm_env: dict[str, str] = field(default_factory=dict)

    def start_vllm(self, host: FleetHost) -> None:
        lay = dataclasses_replace_layout(self.local_spec)
        log = (host.folder / "vllm.log").open("ab")
        # vLLM CPU pins its OpenMP threads to core 0 on every host of this one machine; a
        # busy host's spinning threads then starve the other's start. One core each, as on
        # separate machines.
        env = {**self.vllm_env, "VLLM_CPU_OMP_THREADS_BIND": str((host.index - 1) % _cores())}
        host.vllm = subprocess.Popen(
            host.enter(*vllm_args.command(self.local_spec, lay)), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=host.folder, start_new_session=True)

    def stop_vllm(self, host: FleetHost) -> None:
        if host.vllm is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host.vllm.pid, signal.SIGTERM)
        try:
            host.vllm.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(host.vllm.pid, signal.SIGKILL)
            host.vllm.wait(timeout=30)
        host.vllm = None

    def wait_healthy(self, host: FleetHost, deadline_s: float = START_DEADLINE_SECONDS) -> None:
        """The health gate's first check: vLLM's /health on the host's loopback."""
        end = time.monotonic() + deadline_s
        url = f"http://127.0.0.1:{layout.vllm_port(self.vm_spec)}/health"
        while time.monotonic() < end:
            if host.vllm is not None and host.vllm.poll() is not None:
                pytest.fail(f"{host.name}: vLLM exited:\n"
                            + (host.folder / "vllm.log").read_text()[-3000:])
            code = host.sh(f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 3 {url} || true")
            if code.strip() == "200":
                return
            time.sleep(2)
        pytest.fail(f"{host.name}: vLLM not healthy within {deadline_s} s")

    def balancer_states(self) -> dict[str, str]:
        """Each host's state as the balancer sees it (HAProxy's `show stat`: UP, DOWN, ...)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(str(self.folder / "haproxy.sock"))
            conn.sendall(b"show stat\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        rows = csv.reader(data.decode().lstrip("# ").splitlines())
        header = next(rows)
        at = {name: i for i, name in enumerate(header)}
        return {row[at["svname"]]: row[at["status"]] for row in rows
                if len(row) > at["status"] and row[at["svname"]] in
                {h.name for h in self.hosts}}

    def wait_balanced(self, deadline_s: float = 30) -> None:
        """Until the balancer sends to every host: vLLM healthy on loopback is not enough, the
        balancer marks a host up only after its own probes pass (rise)."""
        end = time.monotonic() + deadline_s
        states: dict[str, str] = {}
        while time.monotonic() < end:
            states = self.balancer_states()
            if states and all(v == "UP" for v in states.values()):
                return
            time.sleep(0.2)
        pytest.fail(f"the balancer does not send to every host within {deadline_s} s: "
                    f"{states}\n{self.balancer_log()}")

    def balancer_log(self) -> str:
        return (self.folder / "haproxy.log").read_text()[-3000:]

    def target(self, host: FleetHost) -> Target:
        return Target(host=Host(NsContext(host.pid), name=host.name), spec=self.vm_spec,
                      settings=settings_for(self.vm_spec), say=print)


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def dataclasses_replace_layout(spec: Spec) -> layout.Layout:
    import dataclasses

    return dataclasses.replace(layout.local(REPO), python=str(VLLM_PYTHON),
                               venv_dir=str(VLLM_PYTHON.parent.parent))


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def _haproxy_config(port: int, hosts: list[FleetHost], stats: Path) -> str:
    servers = "\n".join(
        f"    server {h.name} {h.address}:{API_PORT} check inter {PROBE_INTER_MS} "
        f"fall {PROBE_FALL} rise {PROBE_FALL}" for h in hosts)
    return f"""global
    maxconn 512
    # Read by the test to know what the balancer thinks of each host (_balancer_states).
    stats socket {stats} mode 600 level user
defaults
    # Layer 4, like Azure's Load Balancer: a flow stays on the host it was sent to.
    mode tcp
    timeout connect 5s
    timeout client {REQUEST_TIMEOUT_SECONDS}s
    timeout server {REQUEST_TIMEOUT_SECONDS}s
frontend api
    bind 127.0.0.1:{port}
    default_backend fleet
backend fleet
    balance roundrobin
    option httpchk
    http-check send meth GET uri {balancer.PROBE_PATHS[0]}
    http-check expect status 200
{servers}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    _tools_or_fail()
    folder = tmp_path_factory.mktemp("fleet")
    folder.chmod(0o755)
    local_spec = stackfile.from_values(
        {**_local_values(), "vllmPort": API_PORT + 1}, stack="local")
    vm_spec = spec_with(vmCount=HOSTS, vllmPort=API_PORT, vllmPackage="vllm-cpu",
                        apiCidrs=[f"{SUBNET}.0.0/16"])
    key = (REPO / ".local/api-key").read_text().strip()
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env.update(vllm_args.environment(local_spec, dataclasses_replace_layout(local_spec)))
    env[layout.API_KEY_ENV] = key
    tag = f"i15{os.getpid() % 10000}"
    hosts: list[FleetHost] = []
    haproxy: subprocess.Popen | None = None
    made: list[str] = []
    try:
        rotation_dir = Path(balancer.ROTATION_DIR)
        rotation_dir.mkdir(mode=0o755, exist_ok=True)
        for i in range(1, HOSTS + 1):
            ns, outside, inside = f"{tag}n{i}", f"{tag}a{i}", f"{tag}b{i}"
            _run("ip", "netns", "add", ns)
            made.append(ns)
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            _run("ip", "link", "set", inside, "netns", ns)
            _run("ip", "addr", "add", f"{SUBNET}.{i}.1/24", "dev", outside)
            _run("ip", "link", "set", outside, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{i}.2/24", "dev",
                 inside)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", inside, "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            hfolder = folder / f"h{i}"
            hfolder.mkdir()
            hfolder.chmod(0o755)
            place = proxy.ProxyPlace(run_dir=str(hfolder), access_log=str(hfolder / "access.log"),
                                     rotation_file=balancer.OUT_OF_ROTATION_FILE)
            (hfolder / "nginx.conf").write_text(proxy.render_config(vm_spec, place))
            # Its own /run/exaone-rotation (a tmpfs in its own mount namespace) and its proxy;
            # then it idles, holding the namespaces every later command enters.
            script = (f"mount -t tmpfs -o mode=0755 tmpfs {balancer.ROTATION_DIR} && "
                      f"nginx -c {hfolder}/nginx.conf >{hfolder}/nginx.stderr 2>&1 & "
                      "exec sleep infinity")
            launcher = subprocess.Popen(
                ["ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private",
                 "bash", "-c", script], start_new_session=True)
            hosts.append(FleetHost(i, hfolder, launcher))
        lb_port = free_port()
        (folder / "haproxy.cfg").write_text(
            _haproxy_config(lb_port, hosts, folder / "haproxy.sock"))
        log = (folder / "haproxy.log").open("wb")
        haproxy = subprocess.Popen(["haproxy", "-f", str(folder / "haproxy.cfg"), "-db"],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        fl = Fleet(vm_spec, local_spec, key, hosts, f"http://127.0.0.1:{lb_port}", folder, env)
        time.sleep(1)
        Path(dataclasses_replace_layout(local_spec).resolver_dir).mkdir(parents=True,
                                                                        exist_ok=True)
        for h in hosts:
            fl.start_vllm(h)
        for h in hosts:
            fl.wait_healthy(h)
        fl.wait_balanced()
        yield fl
        for h in hosts:
            fl.stop_vllm(h)
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(timeout=10)
        for h in hosts:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(h.launcher.pid, signal.SIGKILL)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _local_values() -> dict:
    from pulumi_mocks import stack_values

    values = stack_values("local")
    values["modelSource"] = str(REPO / values["modelSource"])
    for adapter in values["adapters"]:
        adapter["source"] = str(REPO / adapter["source"])
    values["apiKeyRef"] = f"file:{REPO / '.local/api-key'}"
    return values


@dataclass
class Load:
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def _stream(fleet: Fleet, load: Load, worker: int) -> None:
    models = [fleet.local_spec.model.served_name, *(a.name for a in fleet.local_spec.adapters)]
    headers = {"Authorization": f"Bearer {fleet.key}"}
    with httpx.Client(base_url=fleet.lb_url, headers=headers,
                      timeout=REQUEST_TIMEOUT_SECONDS) as client:
        n = 0
        while not load.stop.is_set():
            model = models[(worker + n) % len(models)]
            n += 1
            body = {"model": model, "prompt": f"request {n} from {worker}",
                    "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0}
            try:
                with client.stream("POST", "/v1/completions", json=body) as answer:
                    chunks = [line for line in answer.iter_lines() if line.startswith("data:")]
                    if answer.status_code != 200 or chunks[-1:] != ["data: [DONE]"]:
                        load.failed.append(f"{model}: {answer.status_code} {chunks[-1:]}")
                        continue
                load.ok += 1
            except httpx.HTTPError as exc:
                load.failed.append(f"{model}: {type(exc).__name__}: {exc}")
            load.stop.wait(THINK_SECONDS)


@contextlib.contextmanager
def streaming(fleet: Fleet) -> Iterator[Load]:
    load = Load()
    workers = [threading.Thread(target=_stream, args=(fleet, load, i)) for i in range(CLIENTS)]
    for w in workers:
        w.start()
    try:
        yield load
    finally:
        load.stop.set()
        for w in workers:
            w.join(timeout=REQUEST_TIMEOUT_SECONDS + 30)


def _roll(fleet: Fleet, body: Callable[[FleetHost], None]) -> tuple[Load, dict[str, float]]:
    # The balancer here probes every PROBE_INTER_MS and needs PROBE_FALL answers to change
    # its mind: that, plus one interval, is how long the rollout waits for it.
    turn = rotation.Rotation(notice_s=PROBE_INTER_MS / 1000 * (PROBE_FALL + 1), poll_s=0.5)
    # Load starts only once the balancer sends to every host: with none marked up yet it
    # closes each new connection at once, which is the balancer starting, not the rollout.
    fleet.wait_balanced()
    with streaming(fleet) as load:
        time.sleep(3)
        for host in fleet.hosts:
            turn.proxy_pid_file = str(host.folder / "nginx.pid")
            turn.around(fleet.target(host), lambda _t, h=host: body(h))
        time.sleep(3)
    return load, dict(turn.out_seconds)


def _report(fleet: Fleet, name: str, load: Load, out: dict[str, float]) -> None:
    doc = {"run": name, "ok": load.ok, "failed": len(load.failed), "errors": load.failed[:10],
           "out_of_rotation_seconds": out}
    print(json.dumps(doc))
    (fleet.folder / f"{name}.json").write_text(json.dumps(doc, indent=2))


def test_rolling_restart_drops_no_request(fleet: Fleet) -> None:
    def restart(host: FleetHost) -> None:
        fleet.stop_vllm(host)
        fleet.start_vllm(host)
        fleet.wait_healthy(host)

    load, out = _roll(fleet, restart)
    _report(fleet, "rolling-restart", load, out)
    assert load.failed == [] and load.ok > 0, fleet.balancer_log()
    assert sorted(out) == [h.name for h in fleet.hosts]


def test_fleet_hotfix_drops_no_request(fleet: Fleet) -> None:
    adapter = fleet.local_spec.adapters[0]
    path = dataclasses_replace_layout(fleet.local_spec).adapter_path(fleet.local_spec, adapter)
    body = json.dumps({"lora_name": adapter.name, "lora_path": path, "load_inplace": True})
    url = f"http://127.0.0.1:{layout.vllm_port(fleet.vm_spec)}/v1/load_lora_adapter"

    def hotfix(host: FleetHost) -> None:
        code = host.sh(f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 60 "
                       f"-H 'Authorization: Bearer {fleet.key}' -H 'Content-Type: "
                       f"application/json' -d {shlex.quote(body)} {url}", timeout=90)
        assert code.strip() == "200", f"{host.name}: in-place load answered {code}"

    load, out = _roll(fleet, hotfix)
    _report(fleet, "fleet-hotfix", load, out)
    assert load.failed == [] and load.ok > 0, fleet.balancer_log()
    assert sorted(out) == [h.name for h in fleet.hosts]
