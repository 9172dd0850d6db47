"""Tunes vLLM's Triton LoRA kernels for this GPU and a stack's model and adapter set.

    python3 bench/lora_tune.py --stack dev --out tuned/ [--workers 12] [--deadline-s 300]
    python3 bench/lora_tune.py --stack dev --out tuned/ --active 4 --rank 32 --max-loras 4
    python3 bench/lora_tune.py --from tuned/lora-tune.json --up-to 64 --out tuned-small/

Needs a CUDA GPU and CUDA vLLM (0.25.x: the defaults it beats are that release's). Writes to
--out the files vLLM reads from ``VLLM_TUNED_CONFIG_FOLDER`` (<GPU>_SHRINK.json,
<GPU>_EXPAND_TRUE.json), lora-tune.json (every point: vLLM's default against the best
candidate, microseconds per call) and lora-tune.md/.png (LoRA kernel time of one forward
step per batch size, default against tuned). Then measure the lever end to end: the GPU
tier's ``test_lora_levers`` with ``EXAONE_TUNED_CONFIG_FOLDER`` set to the folder (or
``EXAONE_TUNED_CONFIG_FOLDERS`` to ``label=folder,...`` for several, each a lever).

``--from`` rewrites a recorded run's files without a GPU; ``--up-to N`` keeps the tuned
configs only for steps of at most N tokens (single streams and small batches) and vLLM's
default above, a set to measure when the full set wins small batches and loses large ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from levers import ints  # noqa: E402  (bench/levers.py: comma-separated integers)

from serving.bench import lora_tune as lt  # noqa: E402
from serving.bench.levers import tightest_rank  # noqa: E402
from serving.stack import stackfile  # noqa: E402
from serving.stack.catalog import EXAONE_MODELS  # noqa: E402


def write_summary(doc: dict, out: Path) -> None:
    """lora-tune.md (per-step table) and lora-tune.png (the same as bars)."""
    lines = ["| tokens per step | LoRA kernels, vLLM default (us) | tuned (us) | tuned/default |",
             "|---|---|---|---|"]
    for row in doc["per_step"]:
        ratio = row["tuned_us"] / row["default_us"] if row["default_us"] else 0.0
        lines.append(f"| {row['batch']} | {row['default_us']:.0f} | {row['tuned_us']:.0f} | "
                     f"{ratio:.2f} |")
    kept = sum(p["kept"] for p in doc["points"])
    lines.append("")
    lines.append(f"{doc['gpu']}, {doc['model']}, rank {doc['rank']}, max-loras "
                 f"{doc['max_loras']}, {doc['active_loras']} adapters active; {kept} of "
                 f"{len(doc['points'])} points beat vLLM's default by more than "
                 f"{doc['keep_margin']:.0%}.")
    (out / "lora-tune.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["per_step"]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["default_us"] for r in rows], 0.4, label="vLLM default")
    ax.bar([x + 0.2 for x in xs], [r["tuned_us"] for r in rows], 0.4, label="tuned")
    ax.set_xticks(list(xs), [str(r["batch"]) for r in rows])
    ax.set_xlabel("tokens per forward step")
    ax.set_ylabel("LoRA kernel time per step (us)")
    ax.set_yscale("log")
    ax.set_title(f"LoRA shrink+expand per step, {doc['gpu']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "lora-tune.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", default="dev", help="checked-in stack whose model, "
                        "max-loras and adapter ranks to tune for")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=0, help="default: the tightest "
                        "--max-lora-rank of the stack's adapters")
    parser.add_argument("--max-loras", type=int, default=0, help="default: the stack's")
    parser.add_argument("--active", type=int, default=0,
                        help="adapters the tokens are spread over (default: the stack's count)")
    parser.add_argument("--batches", type=ints, default=lt.BATCHES)
    parser.add_argument("--candidates", type=int, default=lt.MAX_CANDIDATES)
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--deadline-s", type=float, default=300.0)
    parser.add_argument("--from", dest="recorded", type=Path, help="a lora-tune.json of an "
                        "earlier run: write its files again (with --up-to), no GPU needed")
    parser.add_argument("--up-to", type=int, default=0, help="keep tuned configs only for "
                        "steps of at most this many tokens; vLLM's default above")
    args = parser.parse_args(argv)
    if args.up_to < 0:
        print(f"--up-to {args.up_to}: a token count per step, 1 or more (0: no limit)",
              file=sys.stderr)
        return 2
    if args.recorded:
        try:
            report = lt.report_from_json(json.loads(args.recorded.read_text()))
            dims = EXAONE_MODELS[report.model]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"--from {args.recorded}: not a lora-tune.json this tuner wrote ({exc})",
                  file=sys.stderr)
            return 2
    else:
        spec = stackfile.load(stack=args.stack)
        dims = EXAONE_MODELS[spec.model.id]
        rank = args.rank or tightest_rank(spec)
        max_loras = args.max_loras or spec.vllm.max_loras
        active = args.active or max(1, len(spec.adapters))
        report = lt.run_tuning(dims, model=spec.model.id, rank=rank, max_loras=max_loras,
                               active=min(active, max_loras), out_dir=args.out,
                               batches=args.batches, workers=args.workers,
                               deadline_s=args.deadline_s, limit=args.candidates)
    shape_list = lt.shapes(dims, report.rank)
    if args.recorded or args.up_to:
        if args.up_to:
            report = lt.limited(report, args.up_to)
        report.files = lt.write_files(lt.choices_of(report), shape_list, gpu=report.gpu,
                                      max_loras=report.max_loras, out_dir=args.out)
    doc = report.to_json(shape_list)
    (args.out / "lora-tune.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_summary(doc, args.out)
    print((args.out / "lora-tune.md").read_text())
    print(f"wrote {', '.join(report.files)} to {args.out}: export "
          f"VLLM_TUNED_CONFIG_FOLDER={args.out.resolve()}")
    return 0 if report.files else 1


if __name__ == "__main__":
    sys.exit(main())
