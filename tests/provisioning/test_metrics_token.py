"""Tier 3: the VM metrics agent's bearer token, with real processes.

- The refresher (``provisioning/steps/scripts/metrics-token.sh``, run with the command line its
  unit renders) against a local HTTP server that answers as the instance metadata service does
  (its documented JSON): the token renamed into place, only its expiry printed; IMDS down, an
  error answer and unusable answers keep the previous token, exit 1 and say why.
- The distribution's Prometheus in agent mode with the rendered configuration (only the scrape
  target, its own endpoint, and the intervals changed) remote-writes through Debian's nginx,
  which admits only ``Authorization: Bearer <the current token>``, to a second Prometheus with
  its remote-write receiver. After nginx is switched to a new token and the refresher has
  written it, samples keep arriving without a restart or reload of the agent: Prometheus reads
  the ``credentials_file`` on every request.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from checkers import find_tool
from imds_server import CLIENT_ID, IMDS_PATH, Imds, serve_imds
from local_server import free_port

from provisioning.steps import metrics
from serving.render import metrics_unit
from serving.stack import stackfile

pytestmark = pytest.mark.integration

START_TIMEOUT_SECONDS = 15
ARRIVAL_TIMEOUT_SECONDS = 12


def refresh(imds_url: str, token_file: Path) -> subprocess.CompletedProcess[str]:
    """The refresher as its unit runs it (``token_argv``), the script from the checkout."""
    argv = metrics_unit.token_argv(CLIENT_ID, script=str(metrics.TOKEN_SCRIPT),
                                   imds_url=imds_url, token_file=str(token_file))
    return subprocess.run(["bash", *argv], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8"})


@pytest.fixture
def token_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "token"
    folder.mkdir(mode=0o700)
    return folder


# --- the refresher -----------------------------------------------------------------------------

def test_refresher_renames_the_identity_token_into_place(token_dir: Path) -> None:
    token_file = token_dir / "token"
    with serve_imds() as imds:
        done = refresh(imds.url, token_file)
        assert done.returncode == 0, done.stderr
        assert token_file.read_text() == imds.token
        first = token_file.stat().st_ino
        imds.token = "eyJ0eXAiOiJKV1QifQ.second.c2lnbmF0dXJl"
        again = refresh(imds.url, token_file)
    assert again.returncode == 0, again.stderr
    assert token_file.read_text() == imds.token
    assert token_file.stat().st_ino != first, "a new file renamed over the old one"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in token_dir.iterdir()) == ["token", "token.expires_on"]
    [asked, _] = imds.asked
    assert asked["path"] == IMDS_PATH and asked["metadata"] == "true"
    assert asked["query"] == {"api-version": ["2018-02-01"],
                              "resource": ["https://monitor.azure.com/"],
                              "client_id": [CLIENT_ID]}
    for run in (done, again):
        assert "expires" in run.stdout
        assert "eyJ" not in run.stdout + run.stderr, "the token is never printed"


def test_refresher_keeps_the_token_when_imds_is_down(token_dir: Path) -> None:
    token_file = token_dir / "token"
    with serve_imds() as imds:
        assert refresh(imds.url, token_file).returncode == 0
    # The server is gone: nothing listens on its port any more.
    done = refresh(imds.url, token_file)
    assert done.returncode == 1
    assert "did not answer" in done.stderr and "previous token stays in use" in done.stderr
    assert token_file.read_text() == imds.token
    assert imds.token not in done.stdout + done.stderr
    assert sorted(p.name for p in token_dir.iterdir()) == ["token", "token.expires_on"]


def _answer(status: int, body: Any) -> Callable[[Imds], tuple[int, str]]:
    return lambda _: (status, body if isinstance(body, str) else json.dumps(body))


@pytest.mark.parametrize(("answer", "says"), [
    pytest.param(_answer(400, {"error": "invalid_request", "error_description":
                               "Identity not found"}), "HTTP 400", id="unknown-identity"),
    pytest.param(_answer(200, "<html>proxy login</html>"), "not JSON", id="not-json"),
    pytest.param(_answer(200, {"expires_on": "99999999999", "token_type": "Bearer"}),
                 "no usable access_token", id="no-token"),
    pytest.param(_answer(200, {"access_token": "a b", "expires_on": "99999999999"}),
                 "no usable access_token", id="token-with-a-space"),
    pytest.param(_answer(200, {"access_token": "eyJ.x.y", "expires_on": "soon"}),
                 "no expires_on", id="bad-expiry"),
    pytest.param(_answer(200, {"access_token": "eyJ.x.y", "expires_on": "1000"}),
                 "expired already", id="expired"),
])
def test_refresher_refuses_a_bad_answer_and_keeps_the_token(
        token_dir: Path, answer: Callable[[Imds], tuple[int, str]], says: str) -> None:
    token_file = token_dir / "token"
    with serve_imds() as imds:
        assert refresh(imds.url, token_file).returncode == 0
        imds.answer = answer
        done = refresh(imds.url, token_file)
    assert done.returncode == 1, done.stdout
    assert says in done.stderr and "previous token stays in use" in done.stderr
    assert token_file.read_text() == imds.token
    assert imds.token not in done.stdout + done.stderr


def test_refresher_without_a_previous_token_says_the_agent_cannot_write(
        token_dir: Path) -> None:
    with serve_imds() as imds:
        imds.answer = _answer(200, {"access_token": ""})
        done = refresh(imds.url, token_dir / "token")
    assert done.returncode == 1
    assert "there is no previous token" in done.stderr
    assert list(token_dir.iterdir()) == []


# --- the agent, through nginx, to a receiving Prometheus ---------------------------------------

def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up:\n{log.read_text(errors='replace')}")
        time.sleep(0.2)


@contextlib.contextmanager
def started(argv: list[str], log: Path, ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_http(ready_url, process, log)
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


def _nginx_config(folder: Path, port: int, upstream: int) -> str:
    """Admits a remote write only with the bearer token named in ``expected.conf``."""
    temp = "\n".join(f"    {kind}_temp_path {folder}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {folder}/access.log;
{temp}
    # Bodies in memory, streamed on: the workers never need a file of their own.
    client_body_buffer_size 16m;
    client_max_body_size 16m;
    proxy_request_buffering off;
    include {folder}/expected.conf;
    server {{
        listen 127.0.0.1:{port};
        location = /api/v1/write {{
            if ($admitted = 0) {{ return 401; }}
            proxy_pass http://127.0.0.1:{upstream};
        }}
    }}
}}
"""


def _expect(folder: Path, token: str) -> None:
    (folder / "expected.conf").write_text(
        f'map $http_authorization $admitted {{\n    default 0;\n    "Bearer {token}" 1;\n}}\n')


def _post_status(url: str, token: str) -> int:
    request = urllib.request.Request(url, data=b"", method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _agent_refused(access_log: Path) -> bool:
    """Prometheus (its user agent) got a 401: only after nginx wants another token."""
    return any('" 401 ' in line and '"Prometheus/' in line
               for line in access_log.read_text().splitlines())


def _newest_sample(receiver: str, job: str, instance: str) -> float:
    query = f'max(timestamp(up{{job="{job}",instance="{instance}",stack="dev"}}))'
    url = f"{receiver}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as answer:
        result = json.load(answer)["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def _wait_for_sample_after(receiver: str, job: str, instance: str, after: float) -> float:
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_SECONDS
    while (newest := _newest_sample(receiver, job, instance)) <= after:
        if time.monotonic() > deadline:
            pytest.fail(f"no sample after {after:.1f} reached the receiver "
                        f"(newest {newest:.1f})")
        time.sleep(0.5)
    return newest


def test_agent_writes_with_the_token_file_and_follows_its_rotation(tmp_path: Path) -> None:
    prometheus = find_tool("prometheus", Path("/usr/bin"))
    nginx = find_tool("nginx", Path("/usr/sbin"))
    spec = stackfile.load("dev")
    instance = "exaone-dev-0"
    token_dir = tmp_path / "token"
    token_dir.mkdir(mode=0o700)
    token_file = token_dir / "token"
    receiver_port, nginx_port, agent_port = free_port(), free_port(), free_port()
    receiver = f"http://127.0.0.1:{receiver_port}"
    gate = f"http://127.0.0.1:{nginx_port}/api/v1/write"

    (tmp_path / "receiver.yml").write_text("global: {scrape_interval: 1m}\n")
    config = yaml.safe_load(metrics_unit.render_config(
        spec, instance=instance, remote_write_url=gate, token_file=str(token_file)))
    assert config["remote_write"][0]["authorization"]["credentials_file"] == str(token_file)
    # The rendered file, with the agent scraping itself, every second.
    config["global"]["scrape_interval"] = "1s"
    [scrape] = config["scrape_configs"]
    scrape.update(scrape_interval="1s", scrape_timeout="1s")
    scrape["static_configs"][0]["targets"] = [f"127.0.0.1:{agent_port}"]
    (tmp_path / "agent.yml").write_text(yaml.safe_dump(config))
    job = scrape["job_name"]

    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    (nginx_dir / "nginx.conf").write_text(_nginx_config(nginx_dir, nginx_port, receiver_port))

    with serve_imds() as imds:
        assert refresh(imds.url, token_file).returncode == 0
        first = imds.token
        _expect(nginx_dir, first)
        receiver_argv = [prometheus, f"--config.file={tmp_path / 'receiver.yml'}",
                         f"--storage.tsdb.path={tmp_path / 'receiver-data'}",
                         f"--web.listen-address=127.0.0.1:{receiver_port}",
                         "--web.enable-remote-write-receiver"]
        agent_argv = metrics_unit.prometheus_argv(
            str(tmp_path / "agent.yml"), listen=f"127.0.0.1:{agent_port}",
            storage=str(tmp_path / "agent-data"))
        with (started(receiver_argv, tmp_path / "receiver.log", f"{receiver}/-/ready"),
              started([nginx, "-c", str(nginx_dir / "nginx.conf")], tmp_path / "nginx.log",
                      f"http://127.0.0.1:{nginx_port}/") as gatekeeper):
            assert _post_status(gate, "wrong") == 401, "nginx admits only the current token"
            with started(agent_argv, tmp_path / "agent.log",
                         f"http://127.0.0.1:{agent_port}/-/ready") as agent:
                _wait_for_sample_after(receiver, job, instance, 0.0)

                # nginx now wants a new token: the agent, still on the old one, is refused.
                imds.token = "eyJ0eXAiOiJKV1QifQ.rotated.c2lnbmF0dXJl"
                _expect(nginx_dir, imds.token)
                gatekeeper.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + START_TIMEOUT_SECONDS
                while _post_status(gate, first) != 401:
                    assert time.monotonic() < deadline, "nginx did not reload"
                    time.sleep(0.2)
                refused = time.time()
                deadline = time.monotonic() + ARRIVAL_TIMEOUT_SECONDS
                while not _agent_refused(nginx_dir / "access.log"):
                    assert time.monotonic() < deadline, "the agent was never refused"
                    time.sleep(0.2)

                # The refresher writes the new token; the agent, untouched, sends again.
                done = refresh(imds.url, token_file)
                assert done.returncode == 0, done.stderr
                rotated = time.time()
                newest = _wait_for_sample_after(receiver, job, instance, rotated)
                assert newest > refused
                assert agent.poll() is None, "the agent ran throughout"
            log = (tmp_path / "agent.log").read_text()
            assert first not in log and imds.token not in log
