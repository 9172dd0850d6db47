"""The Grafana dashboard's panels drawn from a real Prometheus scraping the local CPU server.

    .venv/bin/python bench/dashboard_png.py [--load-s 150] [--out docs/grafana/exaone-vllm.png]

Starts the local stack's vLLM (CPU, tiny model, its own port and state folder), a Prometheus
(the ``prometheus`` binary on PATH) scraping its ``/metrics`` under the stack's job, and a
bounded load of streaming completions over the base model and every adapter; then asks
Prometheus ``query_range`` for each query of each dashboard panel
(``monitoring.dashboard_panels``, the queries the JSON dashboard and the alert rules share) and
plots them with matplotlib. The tiny model's timings are CPU timings, not a GPU's: the picture
shows what each panel plots, not figures to plan with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from serving.adapters.client import VllmClient, VllmError
from serving.local import run as localrun
from serving.render import monitoring
from serving.stack import layout as layouts
from serving.stack import secretref, stackfile

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "grafana" / "exaone-vllm.png"
STATE = Path(".local", "dashboard")  # the run's own vLLM state, under the checkout
SCRAPE_INTERVAL = "2s"  # finer than the stacks' 15 s: a short run still draws curves
STEP_SECONDS = 5
IDLE_SECONDS = 20  # before and after the load: the panels show it start and stop
CONCURRENCY = 4
MAX_TOKENS = 48
PROMPT = "Summarise the maintenance log of the cooling pump in three sentences:"
READY_DEADLINE_SECONDS = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, params: dict[str, str] | None = None) -> Any:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _start_prometheus(job: str, target: str, folder: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("prometheus")
    if not binary:
        raise SystemExit("prometheus is not on PATH (Debian/Ubuntu: apt-get install prometheus)")
    config = {"global": {"scrape_interval": SCRAPE_INTERVAL},
              "scrape_configs": [{"job_name": job, "metrics_path": monitoring.METRICS_PATH,
                                  "static_configs": [{"targets": [target],
                                                      "labels": {"instance": "local"}}]}]}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    listen = f"127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}",
         f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address={listen}"],
        stdout=subprocess.DEVNULL, stderr=(folder / "prometheus.log").open("w"))
    base = f"http://{listen}"
    deadline = time.monotonic() + READY_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=2).close()
            return proc, base
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"prometheus not ready on {listen}; see {folder / 'prometheus.log'}")


def _load(client: VllmClient, models: list[str], seconds: float) -> tuple[int, int]:
    """CONCURRENCY streams, one model after another, until ``seconds`` are up."""
    stop = time.monotonic() + seconds
    done, failed = [0], [0]
    lock = threading.Lock()

    def worker(n: int) -> None:
        i = n
        while time.monotonic() < stop:
            try:
                client.stream_tokens(models[i % len(models)], PROMPT, max_tokens=MAX_TOKENS,
                                     ignore_eos=True)
                with lock:
                    done[0] += 1
            except VllmError:
                with lock:
                    failed[0] += 1
            i += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(CONCURRENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0], failed[0]


def _series(base: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    doc = _get(f"{base}/api/v1/query_range", {"query": expr, "start": f"{start:.3f}",
                                              "end": f"{end:.3f}", "step": str(STEP_SECONDS)})
    return doc["data"]["result"]


def _legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend; a label the series lacks (an empty one) is empty."""
    return re.sub(r"\{\{(\w+)\}\}", lambda m: labels.get(m.group(1), "") or "-", template)


def plot(base: str, job: str, start: float, end: float, out: Path, note: str) -> None:
    panels = monitoring.dashboard_panels(monitoring.selector(job))
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.set_title(panel.title, fontsize=11, loc="left")
        if panel.kind == "table":
            ax.axis("off")
            # Grafana shows the newest row; over a run, every distinct row it showed.
            lines: list[str] = []
            for legend, expr in panel.queries:
                for result in _series(base, expr, start, end):
                    line = _legend(legend, result["metric"])
                    if line not in lines:
                        lines.append(line)
            ax.text(0.0, 0.95, "\n".join(lines[-12:]) or "(no sample)", va="top",
                    family="monospace", fontsize=8, transform=ax.transAxes)
            continue
        for legend, expr in panel.queries:
            for result in _series(base, expr, start, end):
                xs = [float(t) - start for t, _ in result["values"]]
                ys = [float(v) for _, v in result["values"]]
                ax.plot(xs, ys, label=_legend(legend, result["metric"]))
        ax.set_xlabel("seconds", fontsize=8)
        ax.set_ylabel({"s": "seconds", "percentunit": "fraction", "ops": "per second"}.get(
            panel.unit, ""), fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"EXAONE on vLLM: the dashboard's panels\n{note}", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-s", type=float, default=150.0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.load_s <= 0:
        parser.error("--load-s: allowed: seconds above 0")

    spec = stackfile.load(stack="local")
    layout = dataclasses.replace(layouts.local(ROOT), state_dir=str(ROOT / STATE))
    Path(layout.state_dir).mkdir(parents=True, exist_ok=True)
    localrun.setup_files(spec, layout, root=ROOT)
    spec = spec.model_copy(update={"vllm": spec.vllm.model_copy(
        update={"port": _free_port()})})
    server = localrun.LocalServer(spec, layout)
    key = secretref.resolve(spec.api_key, root=ROOT, stack=spec.stack)
    job = monitoring.job_name(spec)
    with tempfile.TemporaryDirectory(prefix="dashboard-") as tmp:
        localrun.start(server, key)
        prom = None
        try:
            prom, base = _start_prometheus(job, server.endpoint.split("://", 1)[1], Path(tmp))
            client = VllmClient(server.endpoint, key)
            models = [spec.model.served_name, *(a.name for a in spec.adapters)]
            start = time.time()
            time.sleep(IDLE_SECONDS)
            done, failed = _load(client, models, args.load_s)
            time.sleep(IDLE_SECONDS)
            end = time.time()
            note = (f"local CPU server, tiny model, {CONCURRENCY} streams over "
                    f"{len(models)} models for {args.load_s:.0f} s: {done} requests, "
                    f"{failed} failed; rates and quantiles over the alerts' windows")
            print(note)
            plot(base, job, start, end, args.out, note)
            print(f"wrote {args.out}")
        finally:
            if prom is not None:
                prom.terminate()
                prom.wait(timeout=30)
            localrun.stop(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
