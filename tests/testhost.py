"""A disposable test host with real systemd: a Debian bookworm rootfs booted by systemd-nspawn.

The container shares this machine's network, and its sshd listens only on 127.0.0.1 on a free
port; or it joins a network namespace made for it (``network_namespace``: a veth pair, an
address of its own, as a VM on a subnet) and its sshd listens on that address. sshd takes key
logins for a non-root admin user with passwordless sudo, as on an Azure VM,
so `fab deploy` can be run against ``TestHost.host_string``. Needs root, debootstrap and
systemd-nspawn (Debian package systemd-container).

What runs inside the container here (seen 2026-11-22: systemd 252 inside and as nspawn,
kernel 6.18; this machine's PID 1 is not systemd and its cgroups are hybrid: v1 controllers
plus an empty cgroup2 at /sys/fs/cgroup/unified). Probed with ``systemd-run --wait -p DIRECTIVE``
running a process that tries the forbidden thing:

- Start and are enforced: ProtectSystem=strict (EROFS writing /etc), PrivateTmp=yes,
  PrivateUsers=yes (uid_map "0 0 1" plus the service user), DynamicUser=yes,
  CapabilityBoundingSet= (CapBnd 0), NoNewPrivileges= (NoNewPrivs 1), ProtectHome= (/home
  empty), ProtectKernelTunables= and ProtectControlGroups= (EROFS), ProtectHostname= (EPERM),
  ProtectProc=invisible (1 pid visible instead of 12), PrivateDevices=yes (/dev/net/tun gone),
  PrivateNetwork=yes (only lo), RestrictNamespaces= (unshare EPERM), RestrictAddressFamilies=
  (EAFNOSUPPORT), MemoryDenyWriteExecute= (EPERM on a W+X mmap),
  SystemCallFilter=@system-service (swapoff(2) kills the process: "status=31/SYS"),
  Restart=on-failure after SIGKILL. ProtectClock= and ProtectKernelModules= start but prove
  nothing: nspawn already drops CAP_SYS_TIME and CAP_SYS_MODULE.
- IPAddressDeny=/IPAddressAllow= and DevicePolicy= need bpf(2), which nspawn's own seccomp
  filter refuses: the unit starts, nothing is enforced, and systemd says so only at debug
  level: "bpf-firewall: Can't load kernel CGROUP SKB BPF program, BPF firewalling is not
  supported: Operation not permitted", "Can't load kernel CGROUP DEVICE BPF program, BPF device
  control is not supported: Operation not permitted". Hence --system-call-filter=bpf.
- With bpf(2) allowed but nspawn's default cgroup layout (hybrid, like this machine),
  IPAddressDeny= is enforced and DevicePolicy=closed is not (hybrid uses the v1 devices
  controller, read-only in the container). Hence also SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1, which
  also removes "System is tainted: cgroupsv1". With both, IPAddressDeny=any +
  IPAddressAllow=localhost (connect() elsewhere times out) and DevicePolicy=closed (EPERM on
  /dev/net/tun) are enforced.
- Accepted silently and never enforced: MemoryMax=, TasksMax=, CPUQuota= and the other
  controller limits. Those controllers live in this machine's v1 hierarchies, so the
  container's systemd logs "Controller 'memory' supported: no" (cpu, io, pids likewise); an
  800 MB allocation under MemoryMax=100M and 30 threads under TasksMax=5 succeed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from local_server import free_port

REPO = Path(__file__).resolve().parent.parent
CACHE_ENV = "EXAONE_TESTHOST_CACHE"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
INCLUDE = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv", "sudo",
    "pciutils", "ca-certificates", "curl",
)
ROOTFS_NAME = f"{SUITE}-rootfs"
MARKER = ".testhost-rootfs"
# This machine's package sources for pip, bound read-only at the same paths when present.
PIP_BINDS = ("/opt/wheels", "/opt/pypi", "/opt/pypi-more")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

ROOTFS_BUILD_TIMEOUT_SECONDS = 1200
BOOT_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 30
SSH_TIMEOUT_SECONDS = 120
SSH_CONNECT_TIMEOUT_SECONDS = 5
LOG_TAIL_LINES = 40

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class HostError(RuntimeError):
    """A test host could not be built, booted or reached."""


class SSHCommandError(subprocess.CalledProcessError):
    """A command over ssh exited non-zero; the message carries its output."""

    def __str__(self) -> str:
        return (f"{super().__str__()}\n--- stdout ---\n{_tail(self.stdout or '')}"
                f"\n--- stderr ---\n{_tail(self.stderr or '')}")


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or REPO / ".local" / "testhost")


def make_keypair(directory: Path, name: str = "id_ed25519") -> tuple[Path, str]:
    """An ed25519 key pair without passphrase: (private key path, public key text)."""
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / name
    private.unlink(missing_ok=True)
    private.with_name(f"{name}.pub").unlink(missing_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"testhost-{name}",
          "-f", str(private)])
    private.chmod(0o600)
    return private, private.with_name(f"{name}.pub").read_text().strip()


def host_pip_conf(binds: tuple[str, ...] = PIP_BINDS) -> str:
    """pip.conf for a test host: the package sources bound into it (``binds``: wheel folders
    as find-links, ``simple/`` indexes as extra index URLs) and the CA bundle, and nothing of
    this machine's own pip configuration, which may name files the host does not have (a
    constraints file, say). Where nothing is bound, pip on the host uses PyPI."""
    present = [b for b in binds if Path(b).is_dir()]
    wheels = [b for b in present if not Path(b, "simple").is_dir()]
    indexes = [f"file://{b}/simple" for b in present if Path(b, "simple").is_dir()]
    lines = ["[global]"]
    if wheels:
        lines.append("find-links = " + " ".join(wheels))
    if indexes:
        lines.append("extra-index-url = " + " ".join(indexes))
    if HOST_CA_BUNDLE.is_file():
        lines.append(f"cert = {HOST_CA_BUNDLE}")
    return "\n".join(lines) + "\n"


def build_rootfs(cache_dir: Path | None = None, *, mirror: str = MIRROR) -> Path:
    """The cached base rootfs, built by debootstrap (about 3 min) when missing or outdated."""
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / ROOTFS_NAME
    wanted = _marker_text()
    with (cache_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = target / MARKER
        if marker.is_file() and marker.read_text() == wanted:
            return target
        _require_root_tools("debootstrap")
        building = cache_dir / f".{ROOTFS_NAME}.building"
        _remove_tree(building)
        log = cache_dir / "debootstrap.log"
        command = ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                   SUITE, str(building), mirror]
        with log.open("w") as out:
            try:
                done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT,
                                      timeout=ROOTFS_BUILD_TIMEOUT_SECONDS, check=False)
            except subprocess.TimeoutExpired as exc:
                raise HostError(f"debootstrap took over {ROOTFS_BUILD_TIMEOUT_SECONDS} s; "
                                f"see {log}") from exc
        if done.returncode != 0:
            raise HostError(f"debootstrap failed (exit {done.returncode}): "
                            f"{shlex.join(command)}\n{_tail(log.read_text(errors='replace'))}")
        _generalize(building)
        (building / MARKER).write_text(wanted)
        old = cache_dir / f".{ROOTFS_NAME}.old"
        if target.exists():
            _remove_tree(old)
            target.rename(old)
        building.rename(target)
        _remove_tree(old)
        return target


@dataclasses.dataclass
class TestHost:
    """A booted container; ``root`` is its filesystem as seen from this machine."""

    __test__ = False  # not a pytest test class

    name: str
    root: Path
    port: int
    admin_user: str
    key_file: Path
    log_file: Path
    address: str = "127.0.0.1"
    _process: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)
    _cgroups: tuple[Path, ...] = dataclasses.field(default=(), repr=False)

    @property
    def host_string(self) -> str:
        return f"{self.admin_user}@{self.address}:{self.port}"

    def ssh_command(self, command: str | None = None) -> list[str]:
        args = ["ssh", "-F", "/dev/null", "-i", str(self.key_file), "-p", str(self.port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_SECONDS}",
                f"{self.admin_user}@{self.address}"]
        return [*args, command] if command is not None else args

    def ssh(self, command: str, *, check: bool = True, timeout: float = SSH_TIMEOUT_SECONDS,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``command`` through the remote shell as the admin user."""
        args = self.ssh_command(command)
        done = subprocess.run(args, input=input, capture_output=True, text=True,
                              timeout=timeout, check=False,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise SSHCommandError(done.returncode, args, done.stdout, done.stderr)
        return done

    def sudo(self, command: str, *, check: bool = True, timeout: float = SSH_TIMEOUT_SECONDS,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``command`` as root (sudo -n sh -c ...)."""
        return self.ssh(f"sudo -n sh -c {shlex.quote(command)}", check=check, timeout=timeout,
                        input=input)

    def write_file(self, path: str, text: str, *, mode: str = "0644") -> None:
        """Write a root-owned file inside the host, through sudo (as a deploy would)."""
        quoted = shlex.quote(path)
        self.sudo(f"install -D -m {mode} /dev/stdin {quoted}", input=text)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, *, remove_root: bool = False) -> None:
        """Power the container off (SIGTERM to nspawn), SIGKILL it after the deadline."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
        for cgroup in self._cgroups:
            # After a SIGKILL of nspawn the container's processes would outlive it.
            with contextlib.suppress(OSError):
                (cgroup / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for cgroup in self._cgroups:
            _remove_cgroup(cgroup, deadline)
        # nspawn refuses to delete this folder itself when /run is not a tmpfs (it says so).
        with contextlib.suppress(OSError):
            Path("/run/systemd/nspawn/propagate", self.name).rmdir()
        if remove_root:
            _remove_tree(self.root)

    def __enter__(self) -> TestHost:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def console_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_file.read_bytes().decode(errors="replace")
        except OSError:
            return ""
        return _tail(_ANSI.sub("", text).replace("\r", ""), lines)


def boot(base_rootfs: Path, workdir: Path, name: str, *, pubkey: str, key_file: Path,
         admin_user: str = "azureuser", binds: Sequence[str] = (),
         pip_conf: str | None = None, trust_host_ca: bool = True,
         network_namespace: str | None = None, address: str = "127.0.0.1",
         port: int | None = None, cpu_affinity: str | None = None,
         timeout: float = BOOT_TIMEOUT_SECONDS) -> TestHost:
    """Copy ``base_rootfs`` to ``workdir/name``, configure it, boot it, wait for SSH.

    ``binds`` are folders of this machine bound read-only at the same path if they exist (for
    pip: PIP_BINDS). ``pip_conf`` becomes /etc/pip.conf (see host_pip_conf). With
    ``trust_host_ca`` this machine's CA bundle replaces the container's, so TLS through an
    intercepting egress proxy works the same inside.

    ``network_namespace`` (a path such as /run/netns/NAME, set up by the caller with
    ``address`` on one of its interfaces) is joined instead of sharing this machine's network;
    sshd then listens on ``address`` (and ``port``, a free one by default).
    ``cpu_affinity`` (nspawn's --cpu-affinity, e.g. "1") confines every process of the host
    to those cores, as if they were its machine's.
    """
    if not _NAME.match(name):
        raise HostError(f"bad host name {name!r}: lowercase letters, digits and '-'")
    _require_root_tools("systemd-nspawn")
    if not (base_rootfs / MARKER).is_file():
        raise HostError(f"{base_rootfs} is not a complete rootfs from build_rootfs()")
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / name
    _remove_tree(root)
    _run(["cp", "-a", "--reflink=auto", str(base_rootfs), str(root)])
    port = port or free_port()
    _configure(root, name, address=address, port=port, pubkey=pubkey, admin_user=admin_user,
               pip_conf=pip_conf, trust_host_ca=trust_host_ca)
    log_file = workdir / f"{name}.console.log"
    command = ["systemd-nspawn", "--boot", "--register=no", f"--directory={root}",
               f"--machine={name}", "--resolv-conf=copy-host", "--console=read-only",
               "--system-call-filter=bpf"]
    command += [f"--bind-ro={path}" for path in binds if Path(path).exists()]
    if network_namespace:
        command.append(f"--network-namespace-path={network_namespace}")
    if cpu_affinity:
        command.append(f"--cpu-affinity={cpu_affinity}")
    cgroups: tuple[Path, ...] = ()
    preexec: Callable[[], None] | None = None
    # On a systemd host, without --keep-unit, nspawn puts itself in its own transient scope.
    if not Path("/run/systemd/system").exists():
        # No systemd here: with --keep-unit nspawn makes payload/ and supervisor/ inside its
        # own cgroup, the root here, so two containers would share (and fight over) them.
        command.append("--keep-unit")
        cgroups = _make_cgroups(f"testhost-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        preexec = functools.partial(_enter_cgroups, [c / "cgroup.procs" for c in cgroups])

    env = dict(os.environ)
    if _has_cgroup2():
        env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"  # see the top of this file
    try:
        with log_file.open("wb") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, env=env, preexec_fn=preexec,
                                       start_new_session=True)
    except BaseException:
        for cgroup in cgroups:
            _remove_cgroup(cgroup, time.monotonic())
        raise
    host = TestHost(name=name, root=root, port=port, admin_user=admin_user, key_file=key_file,
                    log_file=log_file, address=address, _process=process, _cgroups=cgroups)
    try:
        _wait_for_ssh(host, timeout)
    except BaseException:
        host.stop()
        raise
    return host


def _wait_for_ssh(host: TestHost, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        process = host._process
        if process is not None and process.poll() is not None:
            raise HostError(f"systemd-nspawn for {host.name} exited with {process.returncode} "
                            f"before SSH answered; console ({host.log_file}):\n"
                            f"{host.console_tail()}")
        try:
            done = host.ssh("true", check=False, timeout=SSH_CONNECT_TIMEOUT_SECONDS + 5)
            if done.returncode == 0:
                return
            last = done.stderr.strip()
        except subprocess.TimeoutExpired:
            last = "ssh timed out"
        if time.monotonic() > deadline:
            raise HostError(f"no SSH key login to {host.host_string} within "
                            f"{timeout} s "
                            f"(last ssh error: {last or 'none'}); console ({host.log_file}):\n"
                            f"{host.console_tail()}")
        time.sleep(0.2)


def _configure(root: Path, name: str, *, address: str, port: int, pubkey: str,
               admin_user: str, pip_conf: str | None, trust_host_ca: bool) -> None:
    etc = root / "etc"
    (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
    (etc / "hostname").write_text(name + "\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n"
                               "::1\tlocalhost ip6-localhost ip6-loopback\n")
    _run(["chroot", str(root), "useradd", "--create-home", "--shell", "/bin/bash",
          "--groups", "sudo", admin_user])
    home = root / "home" / admin_user
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text(pubkey.strip() + "\n")
    (ssh_dir / "authorized_keys").chmod(0o600)
    _run(["chroot", str(root), "chown", "-R", f"{admin_user}:{admin_user}",
          f"/home/{admin_user}/.ssh"])
    sudoers = etc / "sudoers.d" / "90-cloud-init-users"
    sudoers.write_text(f"{admin_user} ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    _run(["chroot", str(root), "visudo", "-c", "-q", "-f", f"/etc/sudoers.d/{sudoers.name}"])
    host_key = etc / "ssh" / "ssh_host_ed25519_key"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}",
          "-f", str(host_key)])
    (etc / "ssh" / "sshd_config.d" / "50-testhost.conf").write_text(
        f"Port {port}\n"
        f"ListenAddress {address}\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin no\n"
        "HostKey /etc/ssh/ssh_host_ed25519_key\n")
    if pip_conf is not None:
        (etc / "pip.conf").write_text(pip_conf)
    if trust_host_ca and HOST_CA_BUNDLE.is_file():
        shutil.copyfile(HOST_CA_BUNDLE, etc / "ssl" / "certs" / "ca-certificates.crt")


def _generalize(root: Path) -> None:
    """Strip what must differ per host; boot() writes it anew."""
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc" / "machine-id").write_text("")
    with contextlib.suppress(FileNotFoundError):
        (root / "var" / "lib" / "dbus" / "machine-id").unlink()
    _run(["chroot", str(root), "apt-get", "clean"])


def _make_cgroups(leaf: str) -> tuple[Path, ...]:
    """A fresh child of this process's cgroup in the cgroup2 and name=systemd hierarchies."""
    mounts: dict[str, Path | None] = {"0": None, "name=systemd": None}
    for candidate, kind in ((Path("/sys/fs/cgroup/unified"), "0"),
                            (Path("/sys/fs/cgroup"), "0"),
                            (Path("/sys/fs/cgroup/systemd"), "name=systemd")):
        if mounts[kind] is None and (candidate / "cgroup.procs").is_file():
            if kind == "0" and not (candidate / "cgroup.controllers").is_file():
                continue
            mounts[kind] = candidate
    made: list[Path] = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy_id, controllers, own = line.split(":", 2)
        kind = "0" if hierarchy_id == "0" else controllers
        base = mounts.get(kind)
        if base is None:
            continue
        path = base / own.lstrip("/") / leaf
        try:
            path.mkdir()
        except OSError as exc:
            raise HostError(f"cannot create cgroup {path}: {exc}") from exc
        made.append(path)
    return tuple(made)


def _has_cgroup2() -> bool:
    return any((Path(p) / "cgroup.controllers").is_file()
               for p in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"))


def _enter_cgroups(procs: list[Path]) -> None:
    """Runs in the child between fork and exec: move it into its own cgroups."""
    for path in procs:
        path.write_text("0")


def _remove_cgroup(cgroup: Path, deadline: float) -> None:
    """Remove the cgroup tree once its processes are gone (a SIGKILL takes a moment)."""
    if not cgroup.is_dir():
        return
    while any(p.read_text().strip() for p in cgroup.rglob("cgroup.procs")):
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    for sub in sorted((p for p in cgroup.rglob("*") if p.is_dir()),
                      key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        cgroup.rmdir()


def _marker_text() -> str:
    return f"suite={SUITE}\nvariant=minbase\ninclude={','.join(INCLUDE)}\n"


def _require_root_tools(tool: str) -> None:
    if os.geteuid() != 0:
        raise HostError(f"test hosts need root ({tool}, chroot, cgroups)")
    if shutil.which(tool) is None:
        package = {"systemd-nspawn": "systemd-container"}.get(tool, tool)
        raise HostError(f"{tool} is missing: apt-get install {package}")


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        # A rootfs has root-owned, immutable-looking trees; rm copes with all of it.
        _run(["rm", "-rf", "--one-file-system", str(path)])


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise HostError(f"{shlex.join(command)} failed (exit {done.returncode}):\n"
                        f"{_tail(done.stdout + done.stderr)}")


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
