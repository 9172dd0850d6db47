"""Recommendations from measurements: what the bench's results files say to change.

The capacity plan follows from arithmetic; whether a LoRA lever or more API servers pay can
only be measured. This module reads the bench's outputs and says which setting to change, to
what, and why, quoting the figures:

- ``levers.json`` (``bench/levers.py lora``, GPU tier): each lever against the baseline
  where the engine (not the client or the API server) limited both. The baseline is the mean
  of every baseline server of the files given that shared the same settings, and a lever
  must beat it by ``WIN_MARGIN`` or by those servers' own spread, where larger: at the
  largest such concurrency without the base model losing as much (throughput), or at a
  smaller one losing as much nowhere (single-stream latency at no cost); the best gain
  first. When no lever wins, one row says so with each lever's figure and the spread;
- ``front-end.json`` (``bench/levers.py front-end``): the smallest API-server count whose
  streamed tokens/s beat one server's by at least ``WIN_MARGIN``;
- ``bench.json`` (``serving bench --mode load``): a streamed load phase whose verdict is
  ``front-end`` recommends more API servers, with the signals that said so.

Nothing here is a default: with no results file there is no measured recommendation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run-to-run noise of streamed tokens/s on a GPU is several percent (the H200's 256-request
# runs swung far more while the front end limited them): smaller gains are not a win.
WIN_MARGIN = 0.05


@dataclass(frozen=True)
class Advice:
    setting: str  # a stack key, vllmExtraArgs, or an environment variable
    value: str
    reason: str
    source: str  # the results file


def _setting(lever: dict[str, Any]) -> tuple[str, str]:
    if lever.get("overrides"):
        keys = {k: v for k, v in lever["overrides"].items() if k != "runtimeLoraUpdating"}
        return ", ".join(keys), ", ".join(str(v) for v in keys.values())
    if lever.get("extra_args"):
        return "vllmExtraArgs", " ".join(lever["extra_args"])
    env = lever.get("env") or {}
    return ", ".join(env) or lever["name"], ", ".join(env.values())


def _engine_bound(row: dict[str, Any], c: int) -> bool:
    """Both groups' figures at ``c`` measure the engine: neither the client nor the API
    server limited them (rows of older results carry no verdict: taken as measured)."""
    return all(row.get(f"{group}_limit_c{c}") in (None, "engine")
               for group in ("base", "adapters"))


def _is_baseline(name: str) -> bool:
    """The stack as configured: "baseline", or a repeat of it ("baseline (again)")."""
    return name == "baseline" or name.startswith("baseline (")


def _reference(baselines: list[dict[str, Any]], concurrencies: list[int]
               ) -> tuple[dict[str, Any], dict[tuple[str, int], float]]:
    """One baseline row from one or more (each figure their mean; a verdict ``engine`` only
    where every one was), and per (group, concurrency) the spread of their tok/s over its
    mean: the server-to-server noise this run measured."""
    ref: dict[str, Any] = {"lever": "baseline", "error": ""}
    noise: dict[tuple[str, int], float] = {}
    for c in concurrencies:
        for group in ("base", "adapters"):
            values = [b[f"{group}_tok_s_c{c}"] for b in baselines
                      if b.get(f"{group}_tok_s_c{c}")]
            if values:
                ref[f"{group}_tok_s_c{c}"] = sum(values) / len(values)
            if len(values) > 1:
                noise[group, c] = (max(values) - min(values)) / (sum(values) / len(values))
            limits = {b.get(f"{group}_limit_c{c}") for b in baselines}
            if limits != {None}:
                ref[f"{group}_limit_c{c}"] = ("engine" if limits <= {"engine", None} else
                                              next(x for x in sorted(limits - {None})
                                                   if x != "engine"))
        ratios = [b[f"ratio_c{c}"] for b in baselines if b.get(f"ratio_c{c}") is not None]
        if ratios:
            ref[f"ratio_c{c}"] = sum(ratios) / len(ratios)
    return ref, noise


def lora_advice(doc: dict[str, Any], source: str,
                pool: list[dict[str, Any]] | None = None) -> list[Advice]:
    """A lever wins where, at an engine-bound concurrency, adapters gain at least the margin
    over the baseline (``WIN_MARGIN``, or the spread between baseline servers when the run
    started the baseline more than once and that spread is larger):

    - at the largest engine-bound concurrency, with the base model not losing the margin
      there (throughput);
    - or at a smaller one, losing the margin nowhere, neither adapters nor base (latency:
      a single stream served faster at no cost to throughput).

    ``pool``: baseline rows of every results file given whose servers shared the same
    settings (``baseline_pool``); the reference is their mean and the noise their spread, so
    a lever must beat every baseline server measured, not only its own run's."""
    rows = {r["lever"]: r for r in doc["rows"]}
    levers = {lever["name"]: lever for lever in doc["levers"]}
    baselines = pool or [r for n, r in rows.items() if _is_baseline(n) and not r.get("error")]
    if "baseline" not in rows or not baselines:
        return []
    base, noise = _reference(baselines, list(doc["concurrencies"]))
    wins: list[tuple[bool, float, Advice]] = []
    judged: list[str] = []
    front_end_only: set[int] = set()
    for name, row in rows.items():
        if _is_baseline(name) or row.get("error"):
            continue
        # A lever is judged where the engine limited both its server and the baseline's.
        # Where the front end limited a figure it measured the API server's process: on the
        # H200 every 256-stream run was, and their tok/s moved by up to 25% for levers (and a
        # base model) the lever does not touch.
        # (merged runs may have measured a lever at fewer concurrencies than the baseline)
        engine = [c for c in doc["concurrencies"]
                  if _engine_bound(row, c) and _engine_bound(base, c)
                  and row.get(f"adapters_tok_s_c{c}") and base.get(f"adapters_tok_s_c{c}")
                  and row.get(f"base_tok_s_c{c}") and base.get(f"base_tok_s_c{c}")]
        if not engine:
            continue
        top = max(engine)
        skipped = [c for c in doc["concurrencies"] if c > top
                   and not (_engine_bound(row, c) and _engine_bound(base, c))]
        front_end_only.update(skipped)
        gain = {c: row[f"adapters_tok_s_c{c}"] / base[f"adapters_tok_s_c{c}"] - 1
                for c in engine}
        base_gain = {c: row[f"base_tok_s_c{c}"] / base[f"base_tok_s_c{c}"] - 1 for c in engine}
        margin = {c: max(WIN_MARGIN, noise.get(("adapters", c), 0.0)) for c in engine}
        base_margin = {c: max(WIN_MARGIN, noise.get(("base", c), 0.0)) for c in engine}
        judged.append(f"{name} {gain[top]:+.0%} at {top}" + "".join(
            f", {gain[c]:+.0%} at {c}" for c in engine if c != top and gain[c] >= margin[c]))
        loses = [c for c in engine if gain[c] < -margin[c] or base_gain[c] < -base_margin[c]]
        if gain[top] >= margin[top] and base_gain[top] >= -base_margin[top]:
            at = top
        else:
            small = [c for c in engine if c != top and gain[c] >= margin[c]]
            if loses or not small:
                continue
            at = max(small, key=gain.__getitem__)
        setting, value = _setting(levers[name])
        ratio, ref_ratio = row.get(f"ratio_c{at}"), base.get(f"ratio_c{at}")
        ratios = (f"; adapter/base {ref_ratio:.2f} -> {ratio:.2f}"
                  if ratio is not None and ref_ratio is not None else "")
        elsewhere = "" if at == top else (
            f"; at {top} adapters {gain[top]:+.0%}, within the margin")
        unmeasured = (f" (at {', '.join(map(str, skipped))} the front end, not the engine, "
                      "limited the figures)") if skipped else ""
        wins.append((at != top, -gain[at], Advice(setting, value, (
            f"{name}: adapters {base[f'adapters_tok_s_c{at}']:.0f} -> "
            f"{row[f'adapters_tok_s_c{at}']:.0f} tok/s (+{gain[at]:.0%}) at {at} concurrent, "
            f"streamed; base {base[f'base_tok_s_c{at}']:.0f} -> "
            f"{row[f'base_tok_s_c{at}']:.0f}{ratios}{elsewhere}{_noise(noise, at)}"
            f"{unmeasured}"), source)))
    if not wins and judged:
        above = _above_the_front_end(rows, levers, sorted(front_end_only))
        return [Advice("LoRA levers", "keep the baseline", (
            f"no lever raised adapters' tok/s by {WIN_MARGIN:.0%} (or the baseline servers' "
            "own spread, where larger) where the engine limited the figures without losing "
            f"as much elsewhere ({'; '.join(judged)}){_spread(noise)}{above}"), source)]
    # Throughput wins first (best gain first), then latency-only wins.
    return [advice for *_, advice in sorted(wins, key=lambda w: w[:2])]


def _common_key(doc: dict[str, Any]) -> str:
    """The settings every server of a run shared, as a key."""
    return json.dumps(doc.get("common"), sort_keys=True)


def baseline_pool(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Baseline rows of LoRA lever runs, grouped by the settings their servers shared."""
    pool: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        if doc.get("kind") != "lora":
            continue
        pool.setdefault(_common_key(doc), []).extend(
            r for r in doc["rows"] if _is_baseline(r["lever"]) and not r.get("error"))
    return pool


def _spread(noise: dict[tuple[str, int], float]) -> str:
    seen = sorted(c for group, c in noise if group == "adapters")
    if not seen:
        return ""
    return "; baseline servers' adapters spread " + ", ".join(
        f"{noise['adapters', c]:.0%} at {c}" for c in seen)


def _noise(noise: dict[tuple[str, int], float], c: int) -> str:
    if ("adapters", c) not in noise:
        return ""
    return (f"; the baseline's servers differed by {noise['adapters', c]:.0%} (adapters) and "
            f"{noise.get(('base', c), 0.0):.0%} (base) there")


def _above_the_front_end(rows: dict[str, dict[str, Any]], levers: dict[str, dict[str, Any]],
                         concurrencies: list[int]) -> str:
    """What is known where the front end limited the baseline: adapters against base on a
    server with more API servers, where the engine limited both (same server, same run)."""
    if not concurrencies:
        return ""
    where = ", ".join(map(str, concurrencies))
    seen = []
    for name, row in rows.items():
        if row.get("error") or "apiServerCount" not in (levers[name].get("overrides") or {}):
            continue
        for c in concurrencies:
            ratio = row.get(f"ratio_c{c}")
            if _engine_bound(row, c) and ratio is not None:
                seen.append(f"with {name} the engine limited {c} and adapters ran at "
                            f"{ratio:.2f}x base ({row[f'adapters_tok_s_c{c}']:.0f} against "
                            f"{row[f'base_tok_s_c{c}']:.0f} tok/s)")
    if not seen:
        return (f"; at {where} the front end limited the runs, so raise apiServerCount first "
                "and measure again there")
    return f"; at {where} the front end limited the baseline; " + "; ".join(seen)


def front_end_advice(doc: dict[str, Any], source: str) -> list[Advice]:
    levers = {lever["name"]: lever for lever in doc["levers"]}
    # Merged runs may list the counts in any order: the smallest count that pays wins.
    rows = sorted(doc["rows"], key=lambda r: levers[r["lever"]]["overrides"]["apiServerCount"])
    top = max(doc["concurrencies"])
    one = rows[0] if rows else None
    ref = one.get(f"all_tok_s_c{top}") if one else None
    if not one or not ref:
        return []
    for row in rows[1:]:
        tok = row.get(f"all_tok_s_c{top}")
        if row.get("error") or not tok or tok / ref - 1 < WIN_MARGIN:
            continue
        count = levers[row["lever"]]["overrides"]["apiServerCount"]
        unstreamed = row.get(f"all_tok_s_c{top}_unstreamed")
        gap = f"; unstreamed reference {unstreamed:.0f}" if unstreamed else ""
        return [Advice("apiServerCount", str(count), (
            f"{count} API servers: {ref:.0f} -> {tok:.0f} tok/s streamed at {top} concurrent "
            f"({tok / ref:.2f}x){gap}; needs runtimeLoraUpdating false (vLLM refuses runtime "
            "adapter loads with several API servers)"), source)]
    return []


def bench_advice(doc: dict[str, Any], source: str) -> list[Advice]:
    for load in doc.get("load") or []:
        if load.get("stream") and load.get("limit") == "front-end":
            return [Advice("apiServerCount", "> 1 (measure with bench/levers.py front-end)", (
                f"{load['label']}: the front end limited the streamed figure: "
                + "; ".join(load.get("reasons") or [])), source)]
    return []


def advice(paths: list[Path]) -> list[Advice]:
    """Every recommendation the results files support, in file order."""
    out: list[Advice] = []
    docs = [json.loads(Path(path).read_text()) for path in paths]
    pool = baseline_pool(docs)
    for path, doc in zip(paths, docs, strict=True):
        kind = doc.get("kind")
        if kind == "lora":
            out += lora_advice(doc, str(path), pool.get(_common_key(doc)))
        elif kind == "front-end":
            out += front_end_advice(doc, str(path))
        elif "load" in doc:
            out += bench_advice(doc, str(path))
        else:
            raise ValueError(f"{path}: not a bench results file (levers, front-end or bench)")
    return out
