"""Tier 1: the LoRA kernel tuner's logic: the shapes an EXAONE step calls, the candidates,
the choice against vLLM's default, and files vLLM's own lookup reads back.

The timing half runs only on a GPU (``serving.bench.lora_kernels``, GPU tier); the figures
it produced are in docs/bench-gpu/lora-tune.json, and the last test here replays them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.bench import lora_tune as lt
from serving.stack.catalog import EXAONE_MODELS
from tests.local_server import VLLM_PYTHON

ROOT = Path(__file__).resolve().parents[2]
DIMS = EXAONE_MODELS["LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"]


def test_an_exaone_step_calls_seven_shapes_per_layer_kind() -> None:
    found = {(s.op, s.num_slices, s.k, s.n): s for s in lt.shapes(DIMS, 32)}
    # shrink: q/k/v merged (3 slices), out_proj, the MLP's two inputs merged, down.
    assert {k for k in found if k[0] == "shrink"} == {
        ("shrink", 3, 2560, 32), ("shrink", 1, 2560, 32), ("shrink", 2, 2560, 32),
        ("shrink", 1, 7168, 32)}
    # expand: out_proj and down share vLLM's key (1 slice, 32 -> 2560).
    assert {k for k in found if k[0] == "expand"} == {
        ("expand", 3, 32, 2560), ("expand", 1, 32, 2560), ("expand", 2, 32, 7168)}
    assert found["expand", 3, 32, 2560].slice_sizes == (2560, 640, 640)
    assert found["expand", 1, 32, 2560].per_token_calls == 2 * DIMS.num_layers
    # Each of the 4 LoRA layers of each of the 30 decoder layers calls shrink and expand once.
    assert sum(s.per_token_calls for s in found.values()) == 2 * 4 * DIMS.num_layers


@pytest.mark.parametrize("batch,per_lora", [(1, 1), (8, 2), (256, 64), (8192, 2048)])
def test_candidates_start_with_vllms_default_and_fit_the_shape(batch: int,
                                                                per_lora: int) -> None:
    for shape in lt.shapes(DIMS, 32):
        cands = lt.candidates(shape, batch, per_lora)
        default = lt.default_config(shape.op, batch)
        if shape.op == "expand" and shape.num_slices > 1:
            default["block_n"] = 64
        assert cands[0] == default
        assert 1 < len(cands) <= lt.MAX_CANDIDATES
        assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)
        for c in cands[1:]:
            assert c["block_m"] <= max(16, 1 << (per_lora - 1).bit_length())
            assert c["block_k"] <= max(16, shape.k)
            if shape.op == "shrink":
                assert c["block_n"] <= shape.n and c["block_k"] * c["split_k"] <= shape.k
            else:
                assert shape.k % c["block_k"] == 0


def test_batches_of_one_shape_share_candidates_so_each_compiles_once() -> None:
    shape = lt.shapes(DIMS, 32)[0]
    small = [json.dumps(c, sort_keys=True) for c in lt.candidates(shape, 1, 1)[1:]]
    same_class = [json.dumps(c, sort_keys=True) for c in lt.candidates(shape, 64, 16)[1:]]
    assert small == same_class


def test_a_candidate_replaces_the_default_only_beyond_the_margin() -> None:
    assert lt.choose(10.0, {0: 10.0, 1: 9.9, 2: 9.8}) == (0, 10.0, False)
    assert lt.choose(10.0, {0: 10.0, 1: 9.0, 2: 9.5}) == (1, 9.0, True)
    assert lt.choose(10.0, {0: 10.0, 3: 12.0}) == (0, 10.0, False)


def test_jobs_tune_the_measured_batches_first() -> None:
    jobs = lt.plan_jobs(lt.shapes(DIMS, 32), lt.BATCHES, active=4)
    order = list(dict.fromkeys(b for _, b, _ in jobs))
    assert order[:3] == [1, 8, 256]
    assert len(jobs) == 7 * len(lt.BATCHES)


def _choices() -> list[tuple[lt.Shape, int, dict]]:
    """A distinct config per point, so a lookup that lands on the wrong entry is seen."""
    out = []
    for i, shape in enumerate(lt.shapes(DIMS, 32)):
        for batch in lt.BATCHES:
            config = {**lt.default_config(shape.op, batch), "num_stages": 2 + i,
                      "block_m": 16 * (1 + lt.BATCHES.index(batch))}
            out.append((shape, batch, config))
    return out


def test_every_call_of_the_model_finds_the_config_tuned_at_the_nearest_batch() -> None:
    choices = _choices()
    docs = {op: lt.config_document(choices, max_loras=4, op=op) for op in ("shrink", "expand")}
    for shape in lt.shapes(DIMS, 32):
        for batch in (1, 3, 8, 100, 256, 300, 1000, 5000, 8192, 16384):
            nearest = min(lt.BATCHES, key=lambda b: abs(b - batch))
            want = next(c for s, b, c in choices if s == shape and b == nearest)
            # vLLM passes max_loras + 1 slots; another max-loras falls back to the nearest.
            for slots in (5, 9):
                assert lt.lookup(docs[shape.op], max_loras=slots, num_slices=shape.num_slices,
                                 batch=batch, k=shape.k, n=shape.n) == want


def test_vllms_own_lookup_reads_the_files_back(tmp_path: Path) -> None:
    """The files, read by the pinned CPU vLLM's ``get_lora_op_configs`` (the same code as
    0.25.1's GPU build): its lookup and ours agree for every call the model makes."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"the vLLM venv is missing ({VLLM_PYTHON}); run `make local`")
    choices = _choices()
    names = lt.file_names("NVIDIA H200")
    assert names == {"shrink": "NVIDIA_H200_SHRINK.json",
                     "expand": "NVIDIA_H200_EXPAND_TRUE.json"}
    calls = []
    for op, name in names.items():
        doc = lt.config_document(choices, max_loras=4, op=op)
        (tmp_path / name).write_text(json.dumps(doc))
        for shape in lt.shapes(DIMS, 32):
            if shape.op != op:
                continue
            for batch in (1, 5, 256, 3000):
                want = lt.lookup(doc, max_loras=5, num_slices=shape.num_slices, batch=batch,
                                 k=shape.k, n=shape.n)
                hidden, rank = (shape.k, shape.n) if op == "shrink" else (shape.n, shape.k)
                calls.append([op, batch, hidden, rank, shape.num_slices, want])
    script = (
        "import json, sys, torch\n"
        "torch.cuda.get_device_name = lambda *a: 'NVIDIA H200'\n"
        "from vllm.lora.ops.triton_ops.utils import get_lora_op_configs\n"
        "bad = []\n"
        "for op, m, hidden, rank, slices, want in json.load(sys.stdin):\n"
        "    got = get_lora_op_configs(op, max_loras=5, batch=m, hidden_size=hidden,\n"
        "                              rank=rank, num_slices=slices,\n"
        "                              add_inputs=True if op == 'expand' else None)\n"
        "    if got != want: bad.append([op, m, hidden, slices, got, want])\n"
        "print(json.dumps(bad))\n")
    done = subprocess.run([str(VLLM_PYTHON), "-c", script], input=json.dumps(calls),
                          capture_output=True, text=True, timeout=300,
                          env={"VLLM_TUNED_CONFIG_FOLDER": str(tmp_path), "PATH": "/usr/bin:/bin",
                               "VLLM_TARGET_DEVICE": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    # Every wanted config differs from vLLM's default (``_choices``): a match is a read.
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_per_step_figure_weights_each_shape_by_its_calls() -> None:
    shape_list = lt.shapes(DIMS, 32)
    report = lt.TuneReport("GPU", "m", 32, 4, 4)
    for shape in shape_list:
        report.points.append(lt.Point(shape.op, shape.layer, shape.num_slices, shape.k,
                                      shape.n, 1, 10.0, 5.0, shape.op == "shrink", {}, 2, 0))
    default, tuned = report.per_step_us(1, shape_list)
    assert default == 10.0 * 2 * 4 * DIMS.num_layers
    # Only the shrink points were kept: half the calls at half the time.
    assert tuned == pytest.approx(default * 0.75)


def test_the_recorded_gpu_run_kept_only_what_beat_the_default() -> None:
    """The H200 run's own figures (bench/lora_tune.py on the GPU host) obey the rule the
    tuner applies: a kept point beat vLLM's default by more than the margin, and the
    per-step totals follow from the points."""
    recorded = ROOT / "docs" / "bench-gpu" / "lora-tune.json"
    doc = json.loads(recorded.read_text())
    assert doc["points"], "the recorded run tuned nothing"
    for p in doc["points"]:
        if p["kept"]:
            assert p["best_us"] < p["default_us"] * (1 - doc["keep_margin"]), p
        else:
            assert p["best_us"] == p["default_us"], p
    shape_list = lt.shapes(EXAONE_MODELS[doc["model"]], doc["rank"])
    report = lt.TuneReport(doc["gpu"], doc["model"], doc["rank"], doc["max_loras"],
                           doc["active_loras"], [lt.Point(**p) for p in doc["points"]])
    for row in doc["per_step"]:
        assert report.per_step_us(row["batch"], shape_list) == pytest.approx(
            (row["default_us"], row["tuned_us"]))


RECORDED = ROOT / "docs" / "bench-gpu" / "lora-tune.json"
CLI = ROOT / "bench" / "lora_tune.py"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_a_recorded_run_writes_the_same_files_again(tmp_path: Path) -> None:
    """``--from`` (no GPU) rebuilds the checked-in files of the H200 run byte for byte, and
    ``--up-to 64`` the small-batch set measured end to end."""
    done = _cli("--from", str(RECORDED), "--out", str(tmp_path / "full"))
    assert done.returncode == 0, done.stderr
    small = _cli("--from", str(RECORDED), "--up-to", "64", "--out", str(tmp_path / "small"))
    assert small.returncode == 0, small.stderr
    for folder, checked_in in (("full", "tuned-h200"), ("small", "tuned-h200-small-batches")):
        for name in lt.file_names("NVIDIA H200").values():
            assert (tmp_path / folder / name).read_bytes() == (
                ROOT / "docs" / "bench-gpu" / checked_in / name).read_bytes(), (folder, name)


def test_up_to_keeps_small_batches_tuned_and_gives_large_ones_vllms_default() -> None:
    report = lt.report_from_json(json.loads(RECORDED.read_text()))
    small = lt.limited(report, 64)
    shape_list = lt.shapes(EXAONE_MODELS[report.model], report.rank)
    docs = {op: lt.config_document(lt.choices_of(small), max_loras=report.max_loras, op=op)
            for op in ("shrink", "expand")}
    kept_small = 0
    for p in report.points:
        for batch in (p.batch, p.batch + p.batch // 8):  # the key and a step near it
            got = lt.lookup(docs[p.op], max_loras=report.max_loras + 1,
                            num_slices=p.num_slices, batch=batch, k=p.k, n=p.n)
            if p.batch <= 64 and p.kept:
                kept_small += batch == p.batch
                assert got == p.config, (p.op, p.layer, batch)
            elif p.batch >= 128:
                assert got == lt.default_config(p.op, p.batch) | (
                    {"block_n": 64} if p.op == "expand" and p.num_slices > 1 else {}), (
                    p.op, p.layer, batch)
    assert kept_small > 0
    # The per-step figures: tuned up to 64 tokens, vLLM's default from 128 on.
    for batch in (128, 256, 8192):
        default, tuned = small.per_step_us(batch, shape_list)
        assert tuned == default
    default, tuned = small.per_step_us(1, shape_list)
    assert tuned < default * 0.8


def test_a_bad_recorded_file_is_refused_in_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "lora-tune.json"
    broken.write_text('{"gpu": "x"}')
    for path in (broken, tmp_path / "missing.json"):
        done = _cli("--from", str(path), "--out", str(tmp_path / "out"))
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        assert str(path) in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_negative_up_to_is_refused_in_one_line(tmp_path: Path) -> None:
    done = _cli("--from", str(RECORDED), "--up-to", "-64", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--up-to" in done.stderr
    assert not (tmp_path / "out").exists()
