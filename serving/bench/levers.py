"""Server settings measured one by one, each on a server of its own: the LoRA levers and the
API-server count.

A lever is a change to the stack (config keys, extra vLLM flags) or to vLLM's environment.
Each is measured on a freshly started server (vLLM reads these only at start), with streamed
closed-loop load from several processes (``serving.bench.load``) at each concurrency of the
list, once on the base model and once spread over the adapters, so every row of the table
says: lever, adapter/base tokens/s at each concurrency, and what limited the figure.

The same machinery compares API-server counts (``front_end_levers``): the rows are then
servers with 1 and N API servers under the same streamed load, with the unstreamed reference.

Starting servers is the caller's part (``Serve``): the CPU bench starts the local stack's
vLLM, the GPU tier the VM argv on the GPU host. A lever vLLM refuses (an unknown flag in the
pinned release) becomes a row with its error, and the run goes on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from serving.bench.engine import BenchConfig
from serving.bench.load import LoadResult, LoadSpec, run_load
from serving.stack.catalog import ALLOWED_LORA_RANKS
from serving.stack.spec import Spec

DEFAULT_CONCURRENCIES = (1, 5, 256)
# Requests per measurement: enough for every lane to finish a few requests.
REQUESTS_PER_LANE = 4
MIN_REQUESTS = 8


@dataclass(frozen=True)
class Lever:
    name: str
    why: str  # what it changes in vLLM, in a line
    overrides: dict[str, Any] = field(default_factory=dict)  # stack config keys
    env: dict[str, str] = field(default_factory=dict)  # added to vLLM's environment
    extra_args: tuple[str, ...] = ()  # appended to vllmExtraArgs


@dataclass(frozen=True)
class Target:
    """A started server: where to send load, and which models it serves."""

    endpoint: str
    api_key: str
    base: str
    adapters: tuple[str, ...]
    start_s: float  # start to /health


# Starts the server a lever describes and stops it on exit.
Serve = Callable[[Lever], AbstractContextManager[Target]]


def tightest_rank(spec: Spec) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds every adapter of the set."""
    top = max((a.rank for a in spec.adapters), default=1)
    return next(r for r in ALLOWED_LORA_RANKS if r >= top)


def lora_levers(spec: Spec, *, tuned_config_folder: str = "",
                tuned_config_folders: Mapping[str, str] | None = None,
                batched_tokens: Sequence[int] = (2048, 8192)) -> list[Lever]:
    """The issue's LoRA levers for ``spec``'s adapter set, baseline first.

    Each lever changes one thing against the baseline (the stack as configured).
    ``tuned_config_folders``: label -> folder, one lever each (e.g. a full tuned set and the
    same limited to small batches, ``bench/lora_tune.py --up-to``)."""
    n = max(1, len(spec.adapters))
    levers = [Lever("baseline", "the stack as configured")]
    if spec.vllm.max_loras != n:
        levers.append(Lever(f"max-loras {n}", "one GPU LoRA slot per adapter of the set, no "
                            "more (smaller LoRA buffers, every adapter resident)",
                            {"maxLoras": n, "maxCpuLoras": max(n, spec.vllm.max_cpu_loras)}))
    rank = tightest_rank(spec)
    if spec.max_lora_rank != rank:
        levers.append(Lever(f"max-lora-rank {rank}", "LoRA buffers and kernels at the largest "
                            "rank of the set, not above", {"maxLoraRank": rank}))
    levers.append(Lever("fully-sharded-loras", "vLLM's fully sharded LoRA layers",
                        extra_args=("--fully-sharded-loras",)))
    for tokens in batched_tokens:
        levers.append(Lever(f"max-num-batched-tokens {tokens}", "tokens per engine step "
                            "(prefill chunk size)",
                            extra_args=("--max-num-batched-tokens", str(tokens))))
    # vLLM >= 0.32 (at least): CUDA graphs per count of active adapters. Older releases refuse
    # the flag; the row then says so.
    levers.append(Lever("specialize-active-lora", "CUDA graphs captured per number of active "
                        "adapters (with cudagraph_specialize_lora, on by default)",
                        extra_args=("--specialize-active-lora",)))
    folders = {"": tuned_config_folder} if tuned_config_folder else {}
    folders.update(tuned_config_folders or {})
    for label, folder in folders.items():
        levers.append(Lever("tuned LoRA kernel configs" + (f" ({label})" if label else ""),
                            "Triton LoRA kernel configs tuned for this GPU, read from "
                            "VLLM_TUNED_CONFIG_FOLDER" + (f" ({label})" if label else ""),
                            env={"VLLM_TUNED_CONFIG_FOLDER": folder}))
    return levers


def front_end_levers(counts: Sequence[int]) -> list[Lever]:
    """Servers with each API-server count; runtime adapter loading off for all of them alike
    (vLLM refuses it with more than one API server)."""
    return [Lever(f"api-server-count {c}", f"{c} API server process(es) before one engine",
                  {"apiServerCount": c, "runtimeLoraUpdating": False}) for c in counts]


@dataclass(frozen=True)
class Measurement:
    lever: str
    concurrency: int
    models: str  # "base" or "adapters"
    stream: bool
    result: LoadResult | None
    error: str = ""

    @property
    def tok_s(self) -> float | None:
        return None if self.result is None else self.result.client.tok_s


@dataclass
class LeverReport:
    kind: str  # "lora" or "front-end"
    concurrencies: tuple[int, ...]
    levers: list[Lever]
    start_s: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # lever -> why it did not run
    measurements: list[Measurement] = field(default_factory=list)
    common: Lever | None = None  # settings every server of the run had

    def get(self, lever: str, concurrency: int, models: str, stream: bool = True
            ) -> Measurement | None:
        """The last measurement of that kind (a concurrency measured twice: the second)."""
        return next((m for m in reversed(self.measurements)
                     if (m.lever, m.concurrency, m.models, m.stream)
                     == (lever, concurrency, models, stream)), None)

    def ratio(self, lever: str, concurrency: int) -> float | None:
        """Adapters' tokens/s over the base model's at one concurrency."""
        a, b = self.get(lever, concurrency, "adapters"), self.get(lever, concurrency, "base")
        if not a or not b or not a.tok_s or not b.tok_s or a.error or b.error:
            return None
        return a.tok_s / b.tok_s

    def rows(self) -> list[dict[str, Any]]:
        """One row per lever: the figures the table, the CSV and the planner read."""
        out = []
        for lever in self.levers:
            row: dict[str, Any] = {"lever": lever.name, "why": lever.why,
                                   "start_s": self.start_s.get(lever.name),
                                   "error": self.errors.get(lever.name, "")}
            for c in self.concurrencies:
                for models in ("base", "adapters", "all"):
                    for stream in (True, False):
                        m = self.get(lever.name, c, models, stream)
                        if m is None:
                            continue
                        suffix = "" if stream else "_unstreamed"
                        row[f"{models}_tok_s_c{c}{suffix}"] = m.tok_s
                        if m.result is not None and stream:
                            row[f"{models}_limit_c{c}"] = m.result.verdict.limit
                            row[f"{models}_engine_tok_s_c{c}"] = \
                                m.result.engine.generation_tok_s
                        if m.error:
                            row["error"] = row["error"] or m.error
                row[f"ratio_c{c}"] = self.ratio(lever.name, c)
            out.append(row)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "concurrencies": list(self.concurrencies),
            "common": asdict(self.common) if self.common else None,
            "levers": [asdict(lever) for lever in self.levers],
            "rows": self.rows(),
            "measurements": [{"lever": m.lever, "concurrency": m.concurrency,
                              "models": m.models, "stream": m.stream, "error": m.error,
                              "load": m.result.to_json() if m.result else None}
                             for m in self.measurements],
        }


def _requests(concurrency: int, per_lane: int) -> int:
    return max(MIN_REQUESTS, concurrency * per_lane)


def with_common(lever: Lever, common: Lever | None) -> Lever:
    """``lever`` on top of settings every server of a run shares (``common``)."""
    if common is None:
        return lever
    return replace(lever, overrides={**common.overrides, **lever.overrides},
                   env={**common.env, **lever.env},
                   extra_args=(*common.extra_args, *lever.extra_args))


def run_levers(levers: Sequence[Lever], serve: Serve, cfg: BenchConfig, *, kind: str = "lora",
               concurrencies: Sequence[int] = DEFAULT_CONCURRENCIES, processes: int = 4,
               per_lane: int = REQUESTS_PER_LANE, unstreamed_reference: bool = False,
               common: Lever | None = None,
               say: Callable[[str], None] = print) -> LeverReport:
    """Each lever on a server of its own; per concurrency the base model and the adapters
    (``kind`` lora) or all models together (``kind`` front-end), streamed.

    ``common``: settings every server of the run gets, the baseline's too (e.g. four API
    servers, so 256 streams measure the engine): the rows then compare levers on that."""
    # A concurrency listed twice is measured twice (e.g. 256 again after the rest: kernels
    # compiled at first use show as a first pass slower than the second); the table and the
    # planner read the last pass, the JSON keeps every one.
    report = LeverReport(kind, tuple(dict.fromkeys(concurrencies)), list(levers),
                         common=common)
    for lever in levers:
        say(f"lever {lever.name}: starting a server")
        served = with_common(lever, common)
        try:
            context = serve(served)
            target = context.__enter__()
        except Exception as exc:  # vLLM refused the lever or did not start: a row says so
            report.errors[lever.name] = f"{type(exc).__name__}: {exc}"[:400]
            say(f"lever {lever.name}: did not start: {report.errors[lever.name][:200]}")
            continue
        try:
            report.start_s[lever.name] = target.start_s
            run_cfg = replace(cfg, endpoint=target.endpoint, api_key=target.api_key,
                              api_servers=int(served.overrides.get("apiServerCount", 1)))
            warm_up(run_cfg, (target.base, *target.adapters))
            for group, models in _groups(kind, target):
                for c in concurrencies:
                    for stream in (True, False) if unstreamed_reference else (True,):
                        report.measurements.append(
                            _measure(run_cfg, lever.name, group, models, c, processes,
                                     per_lane, stream, say))
        finally:
            context.__exit__(None, None, None)
    return report


def warm_up(cfg: BenchConfig, models: Sequence[str], rounds: int = 2) -> None:
    """Unrecorded requests to every model: a fresh server's first steps compile kernels and
    load adapters, which would otherwise land in the first measurement."""
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    with httpx.Client(base_url=cfg.endpoint.rstrip("/"), headers=headers, trust_env=False,
                      timeout=cfg.request_timeout_s) as client:
        for _ in range(rounds):
            for model in models:
                client.post("/v1/completions", json={
                    "model": model, "prompt": cfg.prompt, "max_tokens": cfg.max_tokens,
                    "ignore_eos": True}).raise_for_status()


def _groups(kind: str, target: Target) -> Iterator[tuple[str, tuple[str, ...]]]:
    if kind == "front-end":
        yield "all", (target.base, *target.adapters)
        return
    yield "base", (target.base,)
    if target.adapters:
        yield "adapters", target.adapters


def _measure(cfg: BenchConfig, lever: str, group: str, models: tuple[str, ...],
             concurrency: int, processes: int, per_lane: int, stream: bool,
             say: Callable[[str], None]) -> Measurement:
    spec = LoadSpec(models, concurrency, _requests(concurrency, per_lane),
                    processes=max(1, min(processes, concurrency)), stream=stream,
                    label=f"{lever} {group} c={concurrency}" + ("" if stream else " unstreamed"))
    try:
        results, outcome = run_load(cfg, spec)
    except Exception as exc:  # a lever that breaks serving is a finding, not a crash
        return Measurement(lever, concurrency, group, stream, None,
                           f"{type(exc).__name__}: {exc}"[:400])
    failed = [r.error for r in results if not r.ok]
    say(f"  {spec.label}: {outcome.client.tok_s:.1f} tok/s (engine "
        f"{outcome.engine.generation_tok_s:.1f}), limit {outcome.verdict.limit}"
        + (f", {len(failed)} failed: {failed[0][:80]}" if failed else ""))
    return Measurement(lever, concurrency, group, stream, outcome,
                       f"{len(failed)} of {len(results)} requests failed: {failed[0][:200]}"
                       if failed else "")


# --- outputs -------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    return str(value)


Doc = dict[str, Any]  # LeverReport.to_json(), or several merged (merge_docs)


def merge_docs(docs: Sequence[Doc]) -> Doc:
    """Results of several runs (e.g. lever subsets in separate GPU calls) as one: rows in
    order, concurrencies those of the first."""
    if not docs:
        raise ValueError("nothing to merge")
    kinds = {d["kind"] for d in docs}
    if len(kinds) > 1:
        raise ValueError(f"cannot merge {', '.join(sorted(kinds))} results")
    commons = {json.dumps(d.get("common"), sort_keys=True) for d in docs}
    if len(commons) > 1:
        # Each run's rows compare against its own baseline, on its own common settings.
        raise ValueError("cannot merge runs whose servers shared different settings")
    merged: Doc = {"kind": docs[0]["kind"], "concurrencies": docs[0]["concurrencies"],
                   "common": docs[0].get("common"), "levers": [], "rows": [],
                   "measurements": []}
    seen: set[str] = set()
    for d in docs:
        # A lever in several runs (each run's own baseline, most often) is one more server
        # of it: "baseline (again)", which the planner reads as the noise between servers.
        names = {}
        for lever in d["levers"]:
            name = unique_name(lever["name"], seen)
            seen.add(name)
            names[lever["name"]] = name
        merged["levers"] += [{**lever, "name": names[lever["name"]]} for lever in d["levers"]]
        merged["rows"] += [{**row, "lever": names.get(row["lever"], row["lever"])}
                           for row in d["rows"]]
        merged["measurements"] += [{**m, "lever": names.get(m["lever"], m["lever"])}
                                   for m in d.get("measurements", [])]
    return merged


def unique_name(name: str, seen: set[str]) -> str:
    """``name``, or "name (again)", "name (again 3)", ... where it is taken."""
    candidate, n = name, 2
    while candidate in seen:
        candidate = f"{name} (again)" if n == 2 else f"{name} (again {n})"
        n += 1
    return candidate


def table_rows(doc: Doc | LeverReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the printed table (the same for terminal and markdown)."""
    if isinstance(doc, LeverReport):
        doc = doc.to_json()
    cs = doc["concurrencies"]
    if doc["kind"] == "front-end":
        header = ["lever", "start s"]
        for c in cs:
            header += [f"tok/s c={c}", f"engine c={c}", f"unstreamed c={c}",
                       f"streamed/unstreamed c={c}", f"vs first c={c}", f"limit c={c}"]
        rows = doc["rows"]
        first = rows[0] if rows else {}
        out = []
        for row in rows:
            line = [row["lever"], _fmt(row["start_s"])]
            for c in cs:
                tok, ref = row.get(f"all_tok_s_c{c}"), row.get(f"all_tok_s_c{c}_unstreamed")
                base = first.get(f"all_tok_s_c{c}")
                line += [_fmt(tok), _fmt(row.get(f"all_engine_tok_s_c{c}")), _fmt(ref),
                         _fmt(tok / ref if tok and ref else None),
                         _fmt(tok / base if tok and base else None),
                         _fmt(row.get(f"all_limit_c{c}"))]
            out.append(line + ([row["error"]] if row["error"] else []))
        return header, out
    header = ["lever"]
    for c in cs:
        header += [f"adapter/base c={c}", f"base tok/s c={c}", f"adapters tok/s c={c}"]
    header += ["limit (largest c)", "start s", "error"]
    out = []
    for row in doc["rows"]:
        line = [row["lever"]]
        for c in cs:
            line += [_fmt(row.get(f"ratio_c{c}")), _fmt(row.get(f"base_tok_s_c{c}")),
                     _fmt(row.get(f"adapters_tok_s_c{c}"))]
        top = cs[-1]
        limits = {row.get(f"base_limit_c{top}"), row.get(f"adapters_limit_c{top}")} - {None}
        line += [",".join(sorted(limits)) or "-", _fmt(row["start_s"]), row["error"][:60]]
        out.append(line)
    return header, out


def write_outputs(report: Doc | LeverReport, out_dir: Path, name: str) -> list[Path]:
    """NAME.json, NAME.csv, NAME.md (the table) and NAME.png (tokens/s per lever)."""
    doc = report.to_json() if isinstance(report, LeverReport) else report
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    paths.append(path)
    rows = doc["rows"]
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("lever", "why"), k))
    path = out_dir / f"{name}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    paths.append(path)
    header, lines = table_rows(doc)
    path = out_dir / f"{name}.md"
    path.write_text("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + "".join(
        "| " + " | ".join(c.replace("|", "\\|") for c in line) + " |\n" for line in lines))
    paths.append(path)
    paths.append(plot(doc, out_dir / f"{name}.png"))
    return paths


def plot(doc: Doc, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    cs = doc["concurrencies"]
    fig, axes = plt.subplots(1, len(cs), figsize=(4.2 * len(cs), 4.2), dpi=110, squeeze=False)
    groups = ("all",) if doc["kind"] == "front-end" else ("base", "adapters")
    for ax, c in zip(axes[0], cs, strict=True):
        names = [r["lever"] for r in rows]
        width = 0.8 / len(groups)
        for i, group in enumerate(groups):
            values = [r.get(f"{group}_tok_s_c{c}") or 0.0 for r in rows]
            ax.bar([x + (i - (len(groups) - 1) / 2) * width for x in range(len(rows))],
                   values, width, label=group)
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{c} concurrent, streamed", fontsize=9)
        ax.set_ylabel("output tokens/s")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
