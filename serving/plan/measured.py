"""Recommendations from measurements: what the bench's results files say to change.

The capacity plan follows from arithmetic; whether a LoRA lever or more API servers pay can
only be measured. This module reads the bench's outputs and says which setting to change, to
what, and why, quoting the figures:

- ``levers.json`` (``bench/levers.py lora``, GPU tier): a lever wins when, at the largest
  concurrency where the engine (not the client or the API server) limited both its run and
  the baseline's, adapters' tokens/s beat the baseline's by at least ``WIN_MARGIN`` and the
  base model's do not lose more than that; the best gain first. When no lever wins, one row
  says so with each lever's figure;
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


def lora_advice(doc: dict[str, Any], source: str) -> list[Advice]:
    rows = {r["lever"]: r for r in doc["rows"]}
    levers = {lever["name"]: lever for lever in doc["levers"]}
    base = rows.get("baseline")
    if not base or base.get("error"):
        return []
    wins: list[tuple[float, Advice]] = []
    judged: list[str] = []
    front_end_only: set[int] = set()
    for name, row in rows.items():
        if name == "baseline" or row.get("error"):
            continue
        # A lever is judged at the largest concurrency where the engine limited both its
        # server and the baseline's. Where the front end limited a figure it measured the
        # API server's process: on the H200 every 256-stream run was, and their tok/s moved
        # by up to 25% for levers (and a base model) the lever does not touch.
        # (merged runs may have measured a lever at fewer concurrencies than the baseline)
        engine = [c for c in doc["concurrencies"]
                  if _engine_bound(row, c) and _engine_bound(base, c)
                  and row.get(f"adapters_tok_s_c{c}") and base.get(f"adapters_tok_s_c{c}")]
        if not engine:
            continue
        top = max(engine)
        skipped = [c for c in doc["concurrencies"] if c > top
                   and not (_engine_bound(row, c) and _engine_bound(base, c))]
        front_end_only.update(skipped)
        adapters, base_tok = row.get(f"adapters_tok_s_c{top}"), row.get(f"base_tok_s_c{top}")
        ref_adapters, ref_base = (base.get(f"adapters_tok_s_c{top}"),
                                  base.get(f"base_tok_s_c{top}"))
        if not (adapters and base_tok and ref_adapters and ref_base):
            continue
        gain = adapters / ref_adapters - 1
        judged.append(f"{name} {gain:+.0%} at {top}")
        if gain < WIN_MARGIN or base_tok / ref_base - 1 < -WIN_MARGIN:
            continue
        setting, value = _setting(levers[name])
        ratio, ref_ratio = row.get(f"ratio_c{top}"), base.get(f"ratio_c{top}")
        ratios = (f"; adapter/base {ref_ratio:.2f} -> {ratio:.2f}"
                  if ratio is not None and ref_ratio is not None else "")
        unmeasured = (f" (at {', '.join(map(str, skipped))} the front end, not the engine, "
                      "limited the figures)") if skipped else ""
        wins.append((gain, Advice(setting, value, (
            f"{name}: adapters {ref_adapters:.0f} -> {adapters:.0f} tok/s (+{gain:.0%}) at "
            f"{top} concurrent, streamed; base {ref_base:.0f} -> {base_tok:.0f}{ratios}"
            f"{unmeasured}"), source)))
    if not wins and judged:
        above = _above_the_front_end(rows, levers, sorted(front_end_only))
        return [Advice("LoRA levers", "keep the baseline", (
            f"no lever raised adapters' tok/s by {WIN_MARGIN:.0%} where the engine limited "
            f"the figures ({'; '.join(judged)}){above}"), source)]
    return [advice for _, advice in sorted(wins, key=lambda w: -w[0])]


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
    for path in paths:
        doc = json.loads(Path(path).read_text())
        kind = doc.get("kind")
        if kind == "lora":
            out += lora_advice(doc, str(path))
        elif kind == "front-end":
            out += front_end_advice(doc, str(path))
        elif "load" in doc:
            out += bench_advice(doc, str(path))
        else:
            raise ValueError(f"{path}: not a bench results file (levers, front-end or bench)")
    return out
