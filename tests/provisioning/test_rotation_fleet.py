"""Tier 3: rolling a fleet of systemd hosts without dropping a request.

Two Debian hosts booted with systemd-nspawn, each joined to its own network namespace (a veth
pair, 10.77.N.2 on its own /24, as a VM on a subnet) and confined to its own core, reach the
package mirrors through NAT and Blob (Azurite) on this machine's side of the first veth.
``fab deploy --parallel 2`` (the fab CLI as a subprocess, as an operator deploys fresh hosts)
makes each serve the API through the project's proxy unit on the same port at its own
address. In front, Debian's HAProxy in TCP mode probing ``/health`` over HTTP like Azure's
Load Balancer (open flows stay on a host it takes out). A bounded client streams completions
through it (keep-alive connections, the base model and both adapters) while

- ``fab deploy`` rolls a stack change of a vLLM setting (``maxModelLen``) over the fleet: on
  each host in turn rotate-out, the config and the rendered unit rewritten, the unit
  restarted by systemd, the health gate, rotate-in;
- ``fab adapters.hotfix`` replaces an adapter's weights on each host in turn, out of rotation,
  with the project's adapter tool on the host verifying by the answers.

Both run in this process through Fabric's own program (``fab ...`` parsed, the stack loaded,
the task run: what the console script does), so that one thing can be tuned: how long the
rollout waits for the balancer to notice (``Rollouts``). This HAProxy probes every second,
Azure every 5 s; waiting Azure's 15 s per turn would only make the test slower. 0 failed
requests, each host seen out and back by the balancer, one at a time, and the seconds each
host was out of rotation reported (printed and written beside the test's files).

Needs root, systemd-nspawn, debootstrap (a cached Debian rootfs), iproute2, iptables,
HAProxy, Azurite (`make tools`) and Internet access for the hosts' packages, as
test_deploy.py.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from deploy_env import ADAPTERS, CONN_ENV, MODEL_ID, DeployEnv, make_env
from local_server import free_port
from testhost import PIP_BINDS, TestHost, boot

from provisioning import rotation
from serving.local.loramaker import make_adapter
from serving.stack import balancer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HOSTS = 2
API_PORT = 8000
SUBNET = "10.77"
PROBE_INTER_MS = 1000
PROBE_FALL = 2
CLIENTS = 3
# Each client pauses this long between requests: traffic never stops (every host out of
# rotation keeps getting requests until the balancer notices), but on this machine's two
# cores, clients that never pause starve the restarting host's start of CPU for minutes.
THINK_SECONDS = 0.25
MAX_TOKENS = 8
REQUEST_TIMEOUT_SECONDS = 120
MODEL_LEN_BEFORE, MODEL_LEN_AFTER = 512, 768
PROMPT = "Hello! How are you today?"
MODEL = "exaone-tiny"  # the served name deploy_env's stacks give the base model
HOTFIXED = ("tone-formal", "2", 8, 201)  # name, version, rank, seed of the new weights


def _tools_or_fail() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces, NAT, systemd-nspawn)")
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [t for t in ("ip", "iptables", "sysctl", "haproxy", "systemd-nspawn",
                           "debootstrap", "ssh", "ssh-keygen")
               if not shutil.which(t, path=path)]
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)} (.ci/tools.sh installs them)")


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")


@dataclass
class Network:
    """Each host's network namespace and veth pair, and NAT out for its package installs."""

    tag: str
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    nat_rule: tuple[str, ...] = ()
    forward_was: str = ""

    def gateway(self, index: int) -> str:
        return f"{SUBNET}.{index}.1"

    def address(self, index: int) -> str:
        return f"{SUBNET}.{index}.2"

    def add_host(self, index: int) -> str:
        """A namespace with 10.77.N.2 inside, 10.77.N.1 on this side; its path for nspawn."""
        ns, outside, inside = f"{self.tag}n{index}", f"{self.tag}a{index}", f"{self.tag}b{index}"
        _run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        self.links.append(outside)
        _run("ip", "link", "set", inside, "netns", ns)
        _run("ip", "addr", "add", f"{self.gateway(index)}/24", "dev", outside)
        _run("ip", "link", "set", outside, "up")
        inns = ("ip", "netns", "exec", ns)
        _run(*inns, "ip", "addr", "add", f"{self.address(index)}/24", "dev", inside)
        _run(*inns, "ip", "link", "set", inside, "up")
        _run(*inns, "ip", "link", "set", "lo", "up")
        # Everything else (the other hosts' gateways, where Blob listens; the mirrors through
        # NAT) goes through this machine.
        _run(*inns, "ip", "route", "add", "default", "via", self.gateway(index))
        return f"/run/netns/{ns}"

    def nat(self) -> None:
        self.forward_was = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        _run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.nat_rule = ("POSTROUTING", "-s", f"{SUBNET}.0.0/16", "!", "-d", f"{SUBNET}.0.0/16",
                         "-m", "comment", "--comment", self.tag, "-j", "MASQUERADE")
        _run("iptables", "-t", "nat", "-A", *self.nat_rule)

    def remove(self) -> None:
        if self.nat_rule:
            subprocess.run(["iptables", "-t", "nat", "-D", *self.nat_rule], check=False)
        if self.forward_was:
            subprocess.run(["sysctl", "-qw", f"net.ipv4.ip_forward={self.forward_was}"],
                           check=False)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        for link in self.links:  # gone with its peer's namespace, unless that failed
            subprocess.run(["ip", "link", "del", link], check=False, capture_output=True)


@dataclass
class Fleet:
    env: DeployEnv
    stack: Path
    lb_url: str
    folder: Path
    first_deploy_s: float

    @property
    def hosts(self) -> list[TestHost]:
        return self.env.hosts

    def short(self, host_string: str) -> str:
        """h1, h2: the balancer's name for the host a rollout names (its --hosts text)."""
        return next(f"h{i}" for i, h in enumerate(self.hosts, 1)
                    if host_string == h.host_string)

    def api(self, host: TestHost) -> httpx.Client:
        """A client with the key on one host's API port (its proxy), not through the balancer."""
        key = self.env.api_key_file.read_text().strip()
        return httpx.Client(base_url=f"http://{host.address}:{API_PORT}", timeout=60,
                            headers={"Authorization": f"Bearer {key}"})

    def answer(self, host: TestHost, model: str) -> str:
        with self.api(host) as c:
            got = c.post("/v1/completions", json={"model": model, "prompt": PROMPT,
                                                  "max_tokens": 12, "temperature": 0})
        got.raise_for_status()
        return str(got.json()["choices"][0]["text"])

    def model_len(self, host: TestHost) -> int:
        """The base model's context length as the host's vLLM reports it (adapters report
        none)."""
        with self.api(host) as c:
            got = c.get("/v1/models")
        got.raise_for_status()
        return next(int(m["max_model_len"]) for m in got.json()["data"] if m["id"] == MODEL)

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
        names = {f"h{i}" for i in range(1, len(self.hosts) + 1)}
        return {row[at["svname"]]: row[at["status"]] for row in rows
                if len(row) > at["status"] and row[at["svname"]] in names}

    def wait_balanced(self, deadline_s: float = 60) -> None:
        """Until the balancer sends to every host: a host serving is not enough, the balancer
        marks it up only after its own probes pass (rise)."""
        end = time.monotonic() + deadline_s
        states: dict[str, str] = {}
        while time.monotonic() < end:
            with contextlib.suppress(OSError):  # HAProxy starting: no stats socket yet
                states = self.balancer_states()
            if states and all(v == "UP" for v in states.values()):
                return
            time.sleep(0.2)
        pytest.fail(f"the balancer does not send to every host within {deadline_s} s: "
                    f"{states}\n{self.balancer_log()}")

    def balancer_log(self) -> str:
        return (self.folder / "haproxy.log").read_text()[-3000:]


def _haproxy_config(port: int, addresses: list[str], stats: Path) -> str:
    servers = "\n".join(
        f"    server h{i} {address}:{API_PORT} check inter {PROBE_INTER_MS} "
        f"fall {PROBE_FALL} rise {PROBE_FALL}" for i, address in enumerate(addresses, 1))
    return f"""global
    maxconn 512
    # Read by the test to know what the balancer thinks of each host (Fleet.balancer_states).
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
    net = Network(tag=f"f{os.getpid() % 100000}")
    cores = sorted(os.sched_getaffinity(0))
    haproxy: subprocess.Popen | None = None
    env: DeployEnv | None = None

    def boot_hosts(rootfs: Path, workdir: Path, key_file: Path, pubkey: str
                   ) -> list[TestHost]:
        hosts: list[TestHost] = []
        try:
            for i in range(1, HOSTS + 1):
                # Each host its own core, as if it were its own machine: vLLM CPU pins its
                # OpenMP worker to a core of those it may use and busy-waits there while
                # requests flow; left to choose among all cores, a restarting host's engine
                # landed on the serving host's busy core and got a sliver of it for minutes.
                hosts.append(boot(rootfs, workdir, f"fleet{i}", pubkey=pubkey,
                                  key_file=key_file, binds=PIP_BINDS,
                                  network_namespace=namespaces[i - 1], address=net.address(i),
                                  port=22, cpu_affinity=str(cores[(i - 1) % len(cores)])))
        except BaseException:
            for h in hosts:
                h.stop()
            raise
        return hosts

    try:
        namespaces = [net.add_host(i) for i in range(1, HOSTS + 1)]
        net.nat()
        # Blob on this machine's end of host 1's veth: host 2 reaches it through its own
        # gateway (this machine routes between them), as VMs reach a storage endpoint.
        env = make_env(folder, blob_host=net.gateway(1), boot_hosts=boot_hosts, port=API_PORT)
        stack = _write_stack(env, MODEL_LEN_BEFORE)
        started = time.monotonic()
        # Fresh hosts, both at once (the rollout's one-at-a-time is for hosts that serve).
        done = env.fab("deploy", "--parallel", str(HOSTS), "--report",
                       str(folder / "first.json"), stack=stack, hosts=env.host_strings)
        first_s = time.monotonic() - started
        print(done.stdout[-3000:])
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
        lb_port = free_port()
        (folder / "haproxy.cfg").write_text(
            _haproxy_config(lb_port, [h.address for h in env.hosts], folder / "haproxy.sock"))
        log = (folder / "haproxy.log").open("wb")
        haproxy = subprocess.Popen(["haproxy", "-f", str(folder / "haproxy.cfg"), "-db"],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        fl = Fleet(env, stack, f"http://127.0.0.1:{lb_port}", folder, first_s)
        fl.wait_balanced()
        yield fl
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(timeout=10)
        if env is not None:
            # The reports, logs and console logs stay; the hosts' roots (4 GB each) do not.
            env.stop(remove_roots=True)
        net.remove()


def _write_stack(env: DeployEnv, model_len: int) -> Path:
    return env.write_stack("fleet", vmCount=HOSTS, maxModelLen=model_len,
                           sshCidrs=[f"{SUBNET}.0.0/16"], apiCidrs=[f"{SUBNET}.0.0/16"])


class _Tee(io.TextIOBase):
    def __init__(self, *outs: io.TextIOBase) -> None:
        self.outs = outs

    def write(self, text: str) -> int:
        for out in self.outs:
            out.write(text)
        return len(text)


def fab(fleet: Fleet, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    """``fab ARGS --config STACK --hosts ALL ...`` through Fabric's program in this process
    (the console script's code path); its exit code and what it printed."""
    from fabric.main import program

    monkeypatch.setenv(CONN_ENV, fleet.env.azurite.connection_string)
    monkeypatch.setenv("COLUMNS", "200")
    argv = ["fab", "--search-root", str(REPO), *args, "--config", str(fleet.stack),
            "--hosts", fleet.env.host_strings, "--blob-connection-string-env", CONN_ENV]
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(_Tee(out, sys.stdout)):  # type: ignore[type-var]
        try:
            program.run(argv, exit=True)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue()


@dataclass
class Load:
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def _stream(fleet: Fleet, load: Load, worker: int) -> None:
    models = [MODEL, *(name for name, *_ in ADAPTERS)]
    key = fleet.env.api_key_file.read_text().strip()
    with httpx.Client(base_url=fleet.lb_url, headers={"Authorization": f"Bearer {key}"},
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


@dataclass
class Watch:
    """The balancer's view during a rollout, sampled: per host, the seconds it was not UP,
    whether it was seen down and back, and whether two hosts were ever down at once."""

    fleet: Fleet
    down_s: dict[str, float] = field(default_factory=dict)
    seen_down: set[str] = field(default_factory=set)
    both_down: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.is_set():
            states = self.fleet.balancer_states()
            now = time.monotonic()
            down = {h for h, s in states.items() if not s.startswith("UP")}
            for h in down:
                self.down_s[h] = self.down_s.get(h, 0.0) + now - last
                if states[h].startswith("DOWN"):
                    self.seen_down.add(h)
            if len(down) > 1:
                self.both_down += 1
            last = now
            self.stop.wait(0.2)


class Rollouts:
    """``rotation.Rotation`` as the production loops create it, timed for this balancer: it
    probes every PROBE_INTER_MS and needs PROBE_FALL answers to change its mind; that, plus
    one interval, is how long a rollout waits for it (Azure's is
    ``balancer.seconds_to_notice()``). Keeps every instance for the report."""

    def __init__(self) -> None:
        self.made: list[rotation.Rotation] = []
        self.real = rotation.Rotation  # the class itself, before it is patched with this

    def __call__(self, **kwargs: object) -> rotation.Rotation:
        kwargs.setdefault("notice_s", PROBE_INTER_MS / 1000 * (PROBE_FALL + 1))
        kwargs.setdefault("poll_s", 0.5)
        turn = self.real(**kwargs)  # type: ignore[arg-type]
        self.made.append(turn)
        return turn

    def out_seconds(self, fleet: Fleet) -> dict[str, float]:
        return {fleet.short(name): seconds for turn in self.made
                for name, seconds in turn.out_seconds.items()}


@dataclass
class Roll:
    load: Load
    rollouts: Rollouts
    watch: Watch


@contextlib.contextmanager
def rolled(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Iterator[Roll]:
    """Load through the balancer around one rollout, and the balancer watched. Load starts
    only once the balancer sends to every host: with none marked up yet it closes each new
    connection at once, which is the balancer starting, not the rollout."""
    rollouts = Rollouts()
    monkeypatch.setattr(rotation, "Rotation", rollouts)
    fleet.wait_balanced()
    load, watch = Load(), Watch(fleet)
    threads = [threading.Thread(target=_stream, args=(fleet, load, i)) for i in range(CLIENTS)]
    threads.append(threading.Thread(target=watch.run))
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        yield Roll(load, rollouts, watch)
        fleet.wait_balanced()
        time.sleep(3)
    finally:
        load.stop.set()
        watch.stop.set()
        for t in threads:
            t.join(timeout=REQUEST_TIMEOUT_SECONDS + 30)


def _report(fleet: Fleet, name: str, roll: Roll, seconds: float) -> dict[str, object]:
    out = roll.rollouts.out_seconds(fleet)
    doc = {"run": name, "seconds": round(seconds, 1), "ok": roll.load.ok,
           "failed": len(roll.load.failed), "errors": roll.load.failed[:10],
           "out_of_rotation_seconds": out,
           "balancer_not_up_seconds": {h: round(s, 1)
                                       for h, s in sorted(roll.watch.down_s.items())},
           "first_deploy_seconds": round(fleet.first_deploy_s, 1)}
    rows = [f"{name}: {roll.load.ok} ok, {len(roll.load.failed)} failed, {seconds:.0f} s",
            f"{'host':6} {'out of rotation (s)':>20} {'balancer not UP (s)':>20}"]
    rows += [f"{h:6} {out.get(h, 0.0):>20.1f} {roll.watch.down_s.get(h, 0.0):>20.1f}"
             for h in sorted(out)]
    print("\n".join(rows))
    (fleet.folder / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _assert_rolled(fleet: Fleet, roll: Roll) -> None:
    names = [f"h{i}" for i in range(1, len(fleet.hosts) + 1)]
    assert roll.load.failed == [] and roll.load.ok > 0, (roll.load.failed[:10],
                                                         fleet.balancer_log())
    # Each host taken out (the balancer saw it DOWN) and brought back, one at a time.
    assert sorted(roll.rollouts.out_seconds(fleet)) == names
    assert sorted(roll.watch.seen_down) == names, roll.watch
    assert roll.watch.both_down == 0, roll.watch
    assert all(s == "UP" for s in fleet.balancer_states().values())


def test_rolling_deploy_restarts_each_host_and_drops_no_request(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fab deploy` of a changed vLLM setting: each host out, its unit restarted with the new
    setting, its health gate, back in; 0 failures."""
    assert {h.address: fleet.model_len(h) for h in fleet.hosts} == {
        h.address: MODEL_LEN_BEFORE for h in fleet.hosts}
    pids = {h.address: _vllm_pid(h) for h in fleet.hosts}
    _write_stack(fleet.env, MODEL_LEN_AFTER)
    started = time.monotonic()
    with rolled(fleet, monkeypatch) as roll:
        code, out = fab(fleet, monkeypatch, "deploy", "--report",
                        str(fleet.folder / "rolling.json"))
    doc = _report(fleet, "rolling-deploy", roll, time.monotonic() - started)
    assert code == 0, out[-6000:]
    report = json.loads((fleet.folder / "rolling.json").read_text())["hosts"]
    for host in report:
        steps = {s["step"]: s["status"] for s in host["steps"]}
        names = [s["step"] for s in host["steps"]]
        assert steps["service"] == "changed" and steps["health"] == "passed", host
        assert names.index("rotate-out") < names.index("config") < names.index("service")
        assert names.index("health") < names.index("rotate-in"), names
    _assert_rolled(fleet, roll)
    # Really restarted, with the new setting, on every host.
    for h in fleet.hosts:
        assert _vllm_pid(h) != pids[h.address]
        assert fleet.model_len(h) == MODEL_LEN_AFTER
    assert doc["failed"] == 0


def test_fleet_hotfix_drops_no_request(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fab adapters.hotfix` across the fleet: each host out, the adapter's weights replaced
    in place and checked by its answers on the host, back in; 0 failures."""
    name, version, rank, seed = HOTFIXED
    before = {h.address: fleet.answer(h, name) for h in fleet.hosts}
    folder = make_adapter(fleet.env.work / "adapters" / name / version,
                          base=fleet.env.model_dir, rank=rank, seed=seed,
                          base_model_id=MODEL_ID)
    fleet.env.azurite.upload_folder("adapters", f"{name}/{version}", folder)
    entry = fleet.env.adapter_entry(name, version, rank, folder)
    pids = {h.address: _vllm_pid(h) for h in fleet.hosts}
    started = time.monotonic()
    with rolled(fleet, monkeypatch) as roll:
        code, out = fab(fleet, monkeypatch, "adapters.hotfix", name, version,
                        "--source", entry["source"], "--sha256", entry["sha256"])
    _report(fleet, "fleet-hotfix", roll, time.monotonic() - started)
    assert code == 0, out[-6000:]
    _assert_rolled(fleet, roll)
    after = {h.address: fleet.answer(h, name) for h in fleet.hosts}
    for h in fleet.hosts:
        assert after[h.address] != before[h.address], (before, after)
        assert _vllm_pid(h) == pids[h.address]  # in place: not restarted
    assert len(set(after.values())) == 1, after  # the same weights answer on every host


def _vllm_pid(host: TestHost) -> str:
    return host.ssh("systemctl show exaone-vllm.service -p MainPID --value").stdout.strip()
