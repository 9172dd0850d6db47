"""Tier 3: rolling a fleet without dropping a request, on real parts.

Two test hosts, each its own network namespace (a veth pair, 10.77.N.2) and its own mount
namespace (its own /run/exaone-rotation and /run/exaone-proxy, the VM's paths), each running
its own sshd, and vLLM CPU with the tiny model on loopback behind the project's rendered API
proxy (Debian's nginx) on the same port. In front, Debian's HAProxy in TCP mode probing
``/health`` over HTTP like Azure's Load Balancer (open flows stay on a host it takes out). A
bounded client streams completions through it (keep-alive connections, base model and an
adapter) while the production rollout loops reach each host over SSH with the project's
``Host``, one at a time:

- a rolling deploy: ``provisioning.tasks.deploy.deploy_all`` (what `fab deploy` runs), which
  puts rotate-out before the first step that changes a host and rotate-in after its health
  gate; the steps are the unit's restart (vLLM stopped and started again) and a health gate
  on vLLM's loopback port;
- a fleet hotfix: ``provisioning.tasks.adapters._each_host`` (what `fab adapters.hotfix`
  runs), the adapter reloaded in place through vLLM's LoRA API on the host's loopback.

The steps are stand-ins for the real ones, which need systemd and the project's bundle on
the host: `fab deploy` and `fab adapters.*` run for real over SSH on a systemd host in
test_deploy.py. Needs root, iproute2, util-linux (nsenter, unshare), openssh-server, nginx,
haproxy, curl, sudo and the vLLM CPU venv with the tiny model (`python -m serving local
setup`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from local_server import VLLM_PYTHON, free_port
from provisioning_helpers import settings_for, spec_with
from testhost import make_keypair

from provisioning import rotation
from provisioning.settings import DeploySettings
from provisioning.steps.converge import CHANGED, StepError, StepResult, Target
from provisioning.tasks import adapters as adapter_tasks
from provisioning.tasks import deploy
from provisioning.tasks import options as cli_options
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
THINK_SECONDS = 0.25
MAX_TOKENS = 8
REQUEST_TIMEOUT_SECONDS = 120


def _tools_or_fail() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (network and mount namespaces)")
    missing = [t for t in ("ip", "nsenter", "unshare", "haproxy", "nginx", "curl", "sudo", "ss",
                           "sshd", "ssh-keygen", "taskset")
               if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)} (.ci/tools.sh installs them)")
    if not VLLM_PYTHON.is_file() or not (REPO / ".local/models").is_dir():
        pytest.fail("run `python -m serving local setup --stack local` first")


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
    settings: DeploySettings
    vllm_env: dict[str, str] = field(default_factory=dict)

    def by_name(self, name: str) -> FleetHost:
        """The host a rollout names (its --hosts text, root@ADDRESS)."""
        return next(h for h in self.hosts if name.endswith(f"@{h.address}"))

    def start_vllm(self, host: FleetHost) -> None:
        lay = dataclasses_replace_layout(self.local_spec)
        log = (host.folder / "vllm.log").open("ab")
        # Both hosts share this machine's cores; each gets one, as if it were a machine of
        # its own. vLLM CPU pins its OpenMP worker to a core and busy-waits there while
        # requests flow, and it starts each of its processes pinned to a core of its choosing
        # for a while: left to choose among all cores, a restarting host's processes landed on
        # the serving host's busy core and got a sliver of it for minutes. Confined to one
        # core (taskset), vLLM chooses within it.
        cores = sorted(os.sched_getaffinity(0))
        core = str(cores[(host.index - 1) % len(cores)])
        env = {**self.vllm_env, "VLLM_CPU_OMP_THREADS_BIND": core}
        host.vllm = subprocess.Popen(
            host.enter("taskset", "-c", core, *vllm_args.command(self.local_spec, lay)),
            stdout=log,
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

    def wait_ssh(self, host: FleetHost, deadline_s: float = 30) -> None:
        """Until the host's sshd lets the rollout in (through the project's Host)."""
        end = time.monotonic() + deadline_s
        while True:
            conn = cli_options.connector(self.settings, say=lambda _m: None)(
                f"root@{host.address}")
            try:
                code, out, _ = conn.run("hostname -I", check=False)
                if code == 0 and host.address in out.split():
                    return
            except Exception as exc:
                out = str(exc)
            finally:
                conn.close()
            if time.monotonic() > end:
                pytest.fail(f"{host.name}: no SSH within {deadline_s} s: {out}\n"
                            + (host.folder / "sshd.log").read_text()[-2000:])
            time.sleep(0.5)

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


def dataclasses_replace_layout(spec: Spec) -> layout.Layout:
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
    private_key, public_key = make_keypair(folder / "ssh")
    (folder / "ssh" / "authorized_keys").write_text(public_key + "\n")
    try:
        # Mount points for each host's own tmpfs (and sshd's privilege-separation folder).
        for path in (balancer.ROTATION_DIR, proxy.VM.run_dir, "/run/sshd"):
            Path(path).mkdir(mode=0o755, exist_ok=True)
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
            # The VM's run folder (pid file and temp folders where the rollout looks for
            # them), the access log in the host's folder for the test to read.
            place = dataclasses.replace(proxy.VM, access_log=str(hfolder / "access.log"))
            (hfolder / "nginx.conf").write_text(proxy.render_config(vm_spec, place))
            (hfolder / "sshd_config").write_text(_sshd_config(hfolder, folder / "ssh", i))
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                 str(hfolder / "ssh_host_ed25519_key"))
            # Its own /run/exaone-rotation and /run/exaone-proxy (tmpfs in its own mount
            # namespace), its proxy and its sshd; then it idles, holding the namespaces.
            script = (f"mount -t tmpfs -o mode=0755 tmpfs {balancer.ROTATION_DIR} && "
                      f"mount -t tmpfs -o mode=0755 tmpfs {proxy.VM.run_dir} && "
                      f"mkdir -p {' '.join(f'{proxy.VM.run_dir}/{k}' for k in proxy.TEMP_KINDS)}"
                      f" && {{ nginx -c {hfolder}/nginx.conf >{hfolder}/nginx.stderr 2>&1 & "
                      f"$(command -v sshd || echo /usr/sbin/sshd) -D -f {hfolder}/sshd_config "
                      f"-E {hfolder}/sshd.log & }}; exec sleep infinity")
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
        settings = dataclasses.replace(
            settings_for(vm_spec), hosts=tuple(f"root@{h.address}" for h in hosts),
            ssh_key_file=str(private_key), connect_timeout_s=10.0)
        fl = Fleet(vm_spec, local_spec, key, hosts, f"http://127.0.0.1:{lb_port}", folder,
                   settings, env)
        time.sleep(1)
        Path(dataclasses_replace_layout(local_spec).resolver_dir).mkdir(parents=True,
                                                                        exist_ok=True)
        for h in hosts:
            fl.start_vllm(h)
        for h in hosts:
            fl.wait_healthy(h)
            fl.wait_ssh(h)
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


def _root_password_locked() -> bool:
    for line in Path("/etc/shadow").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == "root":
            return rest.startswith("!")
    return False


def _sshd_config(hfolder: Path, keys: Path, index: int) -> str:
    """A private sshd on the host's own address: root by key only (the test runs as root;
    a VM's admin user with sudo is test_deploy's business)."""
    return "\n".join([
        "Port 22", f"ListenAddress {SUBNET}.{index}.2",
        f"HostKey {hfolder}/ssh_host_ed25519_key", f"PidFile {hfolder}/sshd.pid",
        f"AuthorizedKeysFile {keys}/authorized_keys", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        # Without PAM, OpenSSH refuses an account whose password is locked ("!"), even for a
        # key; PAM does not (and its session modules may not work in a namespace: only then).
        f"UsePAM {'yes' if _root_password_locked() else 'no'}",
        "StrictModes no", "PrintMotd no", ""])


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
        return {fleet.by_name(name).name: seconds for turn in self.made
                for name, seconds in turn.out_seconds.items()}


@contextlib.contextmanager
def rolled(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Load, Rollouts]]:
    """Load through the balancer around one rollout. It starts only once the balancer sends
    to every host: with none marked up yet it closes each new connection at once, which is
    the balancer starting, not the rollout."""
    rollouts = Rollouts()
    monkeypatch.setattr(rotation, "Rotation", rollouts)
    fleet.wait_balanced()
    with streaming(fleet) as load:
        time.sleep(3)
        yield load, rollouts
        time.sleep(3)


def _report(fleet: Fleet, name: str, load: Load, out: dict[str, float]) -> None:
    doc = {"run": name, "ok": load.ok, "failed": len(load.failed), "errors": load.failed[:10],
           "out_of_rotation_seconds": out}
    print(json.dumps(doc))
    (fleet.folder / f"{name}.json").write_text(json.dumps(doc, indent=2))


class UnitRestart:
    """Stand-in for the service step after a change: the unit restarted (here the test's own
    vLLM process on that host)."""

    name = "service"

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def run(self, t: Target) -> StepResult:
        started = time.monotonic()
        host = self.fleet.by_name(t.host.name)
        self.fleet.stop_vllm(host)
        self.fleet.start_vllm(host)
        return StepResult(self.name, CHANGED, time.monotonic() - started, "restarted")


class LoopbackGate:
    """Stand-in for the health gate: vLLM's /health on the host's loopback, asked over SSH."""

    name = "health"

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def run(self, t: Target) -> StepResult:
        started = time.monotonic()
        url = f"http://127.0.0.1:{layout.vllm_port(t.spec)}/health"
        while time.monotonic() - started < START_DEADLINE_SECONDS:
            vllm = self.fleet.by_name(t.host.name).vllm
            if vllm is None or vllm.poll() is not None:
                raise StepError(self.name, "vLLM exited")
            _, code, _ = t.host.run(f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 3 "
                                    f"{url} || true", check=False)
            if code.strip() == "200":
                return StepResult(self.name, "passed", time.monotonic() - started, "")
            time.sleep(2)
        raise StepError(self.name, f"no answer within {START_DEADLINE_SECONDS} s")


def test_rolling_deploy_drops_no_request(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fab deploy`'s rollout over SSH: each host out, restarted, gated, back; 0 failures."""
    monkeypatch.setattr(deploy, "select", lambda _only: [UnitRestart(fleet), LoopbackGate(fleet)])
    said: list[str] = []
    with rolled(fleet, monkeypatch) as (load, rollouts):
        reports = deploy.deploy_all(fleet.settings, connect=cli_options.connector(fleet.settings),
                                    say=said.append)
    out = rollouts.out_seconds(fleet)
    _report(fleet, "rolling-deploy", load, out)
    assert [r.error for r in reports] == ["", ""], "\n".join(said)
    assert [[s.step for s in r.results] for r in reports] == [
        ["rotate-out", "service", "health", "rotate-in"]] * HOSTS
    assert load.failed == [] and load.ok > 0, fleet.balancer_log()
    assert sorted(out) == [h.name for h in fleet.hosts]


def test_fleet_hotfix_drops_no_request(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fab adapters.hotfix`'s rollout over SSH: each host out, the adapter reloaded in place
    on its loopback, back; 0 failures."""
    adapter = fleet.local_spec.adapters[0]
    path = dataclasses_replace_layout(fleet.local_spec).adapter_path(fleet.local_spec, adapter)
    body = json.dumps({"lora_name": adapter.name, "lora_path": path, "load_inplace": True})
    url = f"http://127.0.0.1:{layout.vllm_port(fleet.vm_spec)}/v1/load_lora_adapter"
    answers: dict[str, str] = {}

    def hotfix(t: Target) -> None:
        # The key travels in the command line here (a test host); the project's own tool reads
        # it on the host.
        _, code, _ = t.host.run(
            f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 60 -H 'Authorization: Bearer "
            f"{fleet.key}' -H 'Content-Type: application/json' -d {shlex.quote(body)} {url}",
            check=False, timeout_s=90)
        answers[fleet.by_name(t.host.name).name] = code.strip()

    with rolled(fleet, monkeypatch) as (load, rollouts):
        adapter_tasks._each_host(fleet.settings, hotfix)
    out = rollouts.out_seconds(fleet)
    _report(fleet, "fleet-hotfix", load, out)
    assert answers == {h.name: "200" for h in fleet.hosts}
    assert load.failed == [] and load.ok > 0, fleet.balancer_log()
    assert sorted(out) == [h.name for h in fleet.hosts]
