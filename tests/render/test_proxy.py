"""The API proxy: its nginx configuration and its systemd unit, for every checked-in stack.

Tier 1 reads the rendered text; tier 2 hands it to nginx itself (``nginx -t``) and to
systemd-analyze. What a client can really reach through it is proved against a running vLLM in
tests/adapters/test_proxy_integration.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from checkers import find_tool

from serving.render import proxy, proxy_unit, systemd_unit, vllm_args
from serving.stack import layout, stackfile
from serving.stack.balancer import AZURE_PROBE_SOURCE
from serving.stack.spec import Spec

STACKS = stackfile.stack_names()
SPECS = {name: stackfile.load(name) for name in STACKS}
# The targets with the proxy in front (target local serves loopback only, without one).
PROXIED = [name for name in STACKS if SPECS[name].on.api_proxy]
MAX_EXPOSURE = 2.5


def _values(stack: str) -> dict:
    import yaml

    document = yaml.safe_load(stackfile.stack_path(stack).read_text())["config"]
    ns = stackfile.namespace() + ":"
    return {key[len(ns):]: value for key, value in document.items()}


def v6_spec() -> Spec:
    values = {**_values("dev"), "apiCidrs": ["198.51.100.0/24", "2001:db8:1::/48"]}
    return stackfile.from_values(values, stack="v6")


def locations(config: str) -> dict[str, str]:
    """location argument -> its block's body (the renderer closes each at its own indent)."""
    out: dict[str, str] = {}
    lines = config.splitlines()
    for i, line in enumerate(lines):
        opened = re.match(r"^(\s*)location (.+) \{$", line)
        if opened:
            end = lines.index(f"{opened.group(1)}}}", i)
            out[opened.group(2)] = "\n".join(lines[i + 1:end])
    return out


def directive(config: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name} ([^;]+);", config, flags=re.M)


@pytest.mark.parametrize("stack", PROXIED)
def test_only_the_inference_routes_reach_vllm(stack: str) -> None:
    spec = SPECS[stack]
    config = proxy.render_config(spec, proxy.VM)
    blocks = locations(config)
    passed = {where.removeprefix("= "): body for where, body in blocks.items()
              if "proxy_pass" in body}
    assert set(passed) == {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                           "/metrics"}
    for path, body in passed.items():
        # Exact match, and the fixed path upstream: no other URI can ride along.
        assert f"= {path}" in blocks
        assert f"proxy_pass http://{proxy.UPSTREAM}{path};" in body
        methods = re.search(r"limit_except ([A-Z ]+) \{ deny all; \}", body)
        assert methods, path
        assert methods.group(1) == ("POST" if path.endswith("completions") else "GET")
    admin = blocks["~ ^/v1/(load|unload)_lora_adapter"]
    assert "return 403" in admin and "adapters" in admin
    assert "return 404" in blocks["/"]
    assert "proxy_pass" not in admin + blocks["/"]
    # The scrape the project renders reads a route the proxy serves.
    assert spec and "/metrics" in passed


@pytest.mark.parametrize("stack", PROXIED)
def test_ports_addresses_and_sources(stack: str) -> None:
    spec = SPECS[stack]
    config = proxy_unit.render_config(spec)
    assert directive(config, "listen") == [f"0.0.0.0:{spec.vllm.port}"]
    (upstream,) = re.findall(r"upstream vllm \{\s*server ([^;]+);", config)
    assert upstream == f"127.0.0.1:{layout.vllm_port(spec)}"
    allowed = directive(config, "allow")
    # Azure's load balancer probe comes from its platform address (serving.stack.balancer).
    assert allowed == ["127.0.0.1", "::1", AZURE_PROBE_SOURCE, *proxy.client_networks(spec)]
    assert {str(ipaddress.ip_network(c)) for c in spec.network.api_cidrs} <= set(allowed)
    assert spec.network.vnet_cidr in allowed
    assert directive(config, "deny")[-1] == "all"


@pytest.mark.parametrize("stack", STACKS)
def test_vllm_listens_on_loopback_beside_the_proxy(stack: str) -> None:
    spec = SPECS[stack]
    for place in (layout.VM, layout.POD):
        argv = vllm_args.args(spec, place)
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        port = int(argv[argv.index("--port") + 1])
        assert port == layout.vllm_port(spec)
        if spec.on.api_proxy:
            assert port != spec.vllm.port
        else:  # target local: loopback on the API port, no proxy
            assert port == spec.vllm.port


def test_vllm_port_stays_a_port() -> None:
    spec = stackfile.from_values({**_values("dev"), "vllmPort": 65535}, stack="top")
    assert layout.vllm_port(spec) == 65534
    assert "server 127.0.0.1:65534;" in proxy.render_config(spec, proxy.VM)


def test_the_proxy_and_vllm_never_share_a_port() -> None:
    spec = SPECS["dev"]
    with pytest.raises(ValueError, match="both listen"):
        proxy.render_config(spec, proxy.VM, port=9000, upstream_port=9000)


def test_ipv6_listener_only_for_ipv6_clients() -> None:
    assert directive(proxy_unit.render_config(SPECS["dev"]), "listen") == ["0.0.0.0:8000"]
    spec = v6_spec()
    config = proxy_unit.render_config(spec)
    assert directive(config, "listen") == [f"0.0.0.0:{spec.vllm.port}",
                                           f"[::]:{spec.vllm.port}"]
    assert "2001:db8:1::/48" in directive(config, "allow")


@pytest.mark.parametrize("stack", PROXIED)
def test_streaming_timeouts_and_body_limit(stack: str) -> None:
    spec = SPECS[stack]
    config = proxy.render_config(spec, proxy.VM)
    assert directive(config, "proxy_buffering") == ["off"]
    assert directive(config, "proxy_http_version") == ["1.1"]
    read = int(directive(config, "proxy_read_timeout")[0].removesuffix("s"))
    # A silent, non-streamed generation must outlast the unit's drain.
    assert read >= systemd_unit.STOP_TIMEOUT_SECONDS
    (body,) = directive(config, "client_max_body_size")
    assert body == f"{proxy.max_body_mib(spec)}m"
    assert proxy.max_body_mib(spec) * 2**20 >= spec.vllm.max_model_len * 16
    # Bodies stay in memory, so nothing a client sends is written to disk.
    assert directive(config, "client_body_buffer_size") == [body]
    # Nothing that carries the key is logged.
    (log_format,) = re.findall(r"log_format exaone '([^']+)'", config)
    assert "http_authorization" not in log_format and "$request " not in log_format


def test_pod_config_leaves_sources_to_the_network_policy() -> None:
    config = proxy.render_config(SPECS["dev"], proxy.POD)
    assert not directive(config, "allow") and not directive(config, "deny")
    assert directive(config, "pid") == ["/tmp/nginx.pid"]


@pytest.mark.parametrize("stack", PROXIED)
def test_proxy_unit_admits_the_client_networks(stack: str) -> None:
    spec = SPECS[stack]
    unit = proxy_unit.render_unit(spec)
    allowed = re.findall(r"^IPAddressAllow=(.+)$", unit, flags=re.M)
    assert allowed == ["localhost", *proxy.client_networks(spec)]
    assert re.findall(r"^IPAddressDeny=(.+)$", unit, flags=re.M) == ["any"]
    assert "DynamicUser=yes" in unit and "CapabilityBoundingSet=\n" in unit
    assert f"RuntimeDirectory={proxy.VM.run_dir.removeprefix('/run/')}" in unit
    assert f"-c {proxy_unit.CONFIG_FILE}" in unit
    # vLLM's own unit admits only loopback once the proxy is in front.
    vllm_unit = systemd_unit.render_unit(spec)
    vllm_allowed = re.findall(r"^IPAddressAllow=(.+)$", vllm_unit, flags=re.M)
    assert vllm_allowed == (["localhost"] if spec.on.api_proxy else
                            ["localhost", *proxy.client_networks(spec)])


# --- tier 2: nginx -t and systemd-analyze -----------------------------------------------------


@pytest.fixture(scope="session")
def nginx() -> str:
    return find_tool("nginx", Path("/usr/sbin"))


def nginx_check(nginx: str, config: str, folder: Path) -> subprocess.CompletedProcess[str]:
    path = folder / "nginx.conf"
    path.write_text(config)
    return subprocess.run([nginx, "-t", "-c", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.tools
@pytest.mark.parametrize("stack", [*PROXIED, "v6"])
def test_nginx_accepts_the_vm_configuration(stack: str, nginx: str, tmp_path: Path) -> None:
    spec = v6_spec() if stack == "v6" else SPECS[stack]
    # The VM's own text; only the run folder (which nginx -t must find) is one that exists here.
    run = tmp_path / "run"
    run.mkdir()
    here = proxy.render_config(spec, dataclasses.replace(proxy.VM, run_dir=str(run)))
    assert here.replace(str(run), proxy.VM.run_dir) == proxy_unit.render_config(spec)
    done = nginx_check(nginx, here, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[warn]" not in done.stderr, done.stderr


@pytest.mark.tools
def test_nginx_accepts_the_pod_configuration(nginx: str, tmp_path: Path) -> None:
    done = nginx_check(nginx, proxy.render_config(SPECS["prod"], proxy.POD), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[warn]" not in done.stderr, done.stderr


@pytest.mark.tools
def test_nginx_check_catches_a_bad_line(nginx: str, tmp_path: Path) -> None:
    config = proxy.render_config(SPECS["prod"], proxy.POD).replace("gzip off;", "gzip bogus;")
    done = nginx_check(nginx, config, tmp_path)
    assert done.returncode != 0 and "bogus" in done.stderr


@pytest.fixture(scope="session")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An alternate root for systemd-analyze: the host's units, stubs at the unit's binaries."""
    root = tmp_path_factory.mktemp("proxyroot")
    (root / "etc/systemd/system").mkdir(parents=True)
    for units in {Path("/usr/lib/systemd/system").resolve(), Path("/lib/systemd/system").resolve()}:
        if units.is_dir():
            shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True,
                            dirs_exist_ok=True)
    for binary in (proxy_unit.NGINX, "/bin/kill"):
        stub = root / binary.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = find_tool("systemd-analyze")
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info"}
    return subprocess.run([tool, *args], capture_output=True, text=True, env=env, timeout=120,
                          check=False)


@pytest.mark.tools
@pytest.mark.parametrize("stack", PROXIED)
def test_systemd_analyze_verify_and_security(stack: str, unit_root: Path) -> None:
    (unit_root / "etc/systemd/system" / proxy_unit.UNIT_NAME).write_text(
        proxy_unit.render_unit(SPECS[stack]))
    done = analyze("verify", f"--root={unit_root}", proxy_unit.UNIT_NAME)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    done = analyze("security", "--offline=yes", f"--root={unit_root}", proxy_unit.UNIT_NAME)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, done.stdout + done.stderr
    print(f"{stack}: proxy exposure {match.group(1)}")
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout


def test_render_writes_the_proxy_of_each_target() -> None:
    from serving.render import artifacts

    vm = artifacts.artifacts(SPECS["dev"], stackfile.ROOT)
    assert vm["proxy/exaone-proxy.nginx.conf"] == proxy_unit.render_config(SPECS["dev"])
    assert vm["systemd/exaone-proxy.service"] == proxy_unit.render_unit(SPECS["dev"])
    aks = artifacts.artifacts(SPECS["prod"], stackfile.ROOT)
    assert "k8s/configmap-exaone-vllm-proxy.yaml" in aks
    assert not any(path.startswith("proxy/") for path in
                   artifacts.artifacts(SPECS["local"], stackfile.ROOT))
