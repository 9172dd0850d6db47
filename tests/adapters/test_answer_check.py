"""Tier 1: the answer check's decisions (serving.adapters.answer), on synthetic scores with the
noise a GPU shows and on scores recorded on a real GPU (tests/fixtures/gpu/)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from serving.adapters.answer import (
    AGREE,
    MAX_OBSERVATIONS,
    CheckError,
    Indistinct,
    Reference,
    Scores,
    decide,
    distinct,
    match,
    noise_floor,
    parse_scores,
    separation,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gpu"


def _scores(seed: int, noise: float = 0.0, rng: random.Random | None = None) -> Scores:
    """Three texts of 30 tokens; ``seed`` picks the weights, ``noise`` the repeat jitter."""
    base = random.Random(seed)
    jitter = rng or random.Random()
    return Scores(tuple(
        tuple(-base.uniform(0.0, 12.0) + (jitter.gauss(0.0, noise) if noise else 0.0)
              for _ in range(30))
        for _ in range(3)
    ))


def _ref(label: str, seed: int, noise: float, rng: random.Random, n: int = 3) -> Reference:
    return Reference.from_samples(label, [_scores(seed, noise, rng) for _ in range(n)])


def test_deterministic_scores_decide_on_the_first_agreeing_observations() -> None:
    rng = random.Random(1)
    new, old, base = (_ref(lbl, s, 0.0, rng) for lbl, s in (("new", 1), ("old", 2), ("base", 3)))
    assert new.noise == pytest.approx(0.0, abs=1e-12)
    calls = []

    def observe() -> Scores:
        calls.append(1)
        return _scores(1)

    verdict = decide(observe, [new, old, base])
    assert verdict.is_("new") and verdict.observations == AGREE == len(calls)


@pytest.mark.parametrize("noise", [0.05, 0.3, 0.8], ids=["low", "gpu-typical", "gpu-high"])
def test_noisy_scores_still_decide_the_right_candidate(noise: float) -> None:
    """Adapters jitter per token as on an H200 (0.5-0.8 on average between repeats); the base
    model does not. 200 decisions, each the right one."""
    rng = random.Random(7)
    for trial in range(200):
        expected, old = 10 + trial, 5000 + trial
        new_ref = _ref("new", expected, noise, rng)
        old_ref = _ref("old", old, noise, rng)
        base_ref = _ref("base", 3, 0.0, rng)
        floor = noise_floor([new_ref, old_ref])
        answering = rng.choice([expected, old, 3])
        want = {expected: "new", old: "old", 3: "base"}[answering]
        jitter = noise if answering != 3 else 0.0
        verdict = decide(lambda a=answering, j=jitter: _scores(a, j, rng),
                         [new_ref, old_ref, base_ref], floor=floor)
        assert verdict.is_(want), (trial, verdict.describe())


def test_an_unknown_answer_is_undecided_not_the_nearest() -> None:
    """Weights that are none of the candidates (a third version, broken weights) must not be
    called one of them: undecided, after the bound."""
    rng = random.Random(3)
    cands = [_ref("new", 1, 0.5, rng), _ref("old", 2, 0.5, rng), _ref("base", 3, 0.0, rng)]
    verdict = decide(lambda: _scores(99, 0.5, rng), cands, floor=0.5)
    assert not verdict.decided and verdict.observations == MAX_OBSERVATIONS
    assert "undecided after" in verdict.describe()


def test_two_candidates_matched_is_undecided_at_once() -> None:
    """An observation stream that flips between candidates is not evidence for either."""
    rng = random.Random(4)
    a, b = _ref("a", 1, 0.0, rng), _ref("b", 2, 0.0, rng)
    stream = iter([_scores(1), _scores(2), _scores(1), _scores(1)])
    verdict = decide(lambda: next(stream), [a, b])
    assert not verdict.decided and verdict.observations == 2


def test_candidates_too_close_to_tell_apart_are_reported() -> None:
    rng = random.Random(5)
    a = _ref("a", 1, 0.5, rng)
    b = Reference.from_samples("b", [Scores(tuple(tuple(x + 0.2 for x in row)
                                                  for row in a.mean.values))])
    apart, distance, needed = separation(a, b, floor=a.noise)
    assert not apart and distance == pytest.approx(0.2) and needed > distance
    c = Reference("c", Scores(tuple(tuple(x - 20.0 for x in row) for row in a.mean.values)))
    assert separation(a, c, floor=0.5)[0]


def test_a_noisier_repeat_than_the_reference_showed_still_matches_the_nearest() -> None:
    """References learnt from three repeats can underestimate the noise; an observation far
    outside the tolerance but many times closer to one candidate matches it."""
    new = Reference("new", _scores(1), noise=0.01)
    old = Reference("old", _scores(2), noise=0.01)
    far = Scores(tuple(tuple(x + 0.4 for x in row) for row in _scores(1).values))
    label, distances = match(far, [new, old])
    assert label == "new" and distances["new"] == pytest.approx(0.4)


def test_reference_round_trips_and_rejects_other_checks() -> None:
    ref = Reference.from_samples("v", [_scores(1, 0.3, random.Random(2)) for _ in range(3)])
    back = Reference.from_json("v", ref.to_json())
    assert back is not None and back.mean.distance(ref.mean) < 1e-4
    assert back.noise == pytest.approx(ref.noise, abs=1e-6)
    assert Reference.from_json("v", {"prompt": "Hello", "tokens": ["a"]}) is None
    assert Reference.from_json("v", {**ref.to_json(), "texts": "other"}) is None
    assert Reference.from_json("v", None) is None


def _choice(index: int, logprobs: list) -> dict:
    return {"index": index, "logprobs": {"token_logprobs": logprobs}}


def test_parse_scores_drops_the_first_and_generated_tokens() -> None:
    scores = parse_scores([_choice(1, [None, -2.0, -3.0, -9.0]),
                           _choice(0, [None, -1.0, -0.5, -9.0])], ["a", "b"])
    assert scores.values == ((-1.0, -0.5), (-2.0, -3.0))


@pytest.mark.parametrize("choices, words", [
    ([_choice(0, [None, -1.0, -1.0])], "asked to score 2 texts"),
    ([_choice(0, None), _choice(1, None)], "no prompt logprobs"),
    ([_choice(0, [None, "x", -1.0, 0]), _choice(1, [None, -1.0, -1.0, 0])], "not a number"),
    ([_choice(0, [None, math.nan, -1.0, 0]), _choice(1, [None, -1.0, -1.0, 0])], "NaN"),
], ids=["count", "no-logprobs", "not-a-number", "nan"])
def test_parse_scores_refuses_unusable_answers(choices, words: str) -> None:
    with pytest.raises(CheckError, match=words):
        parse_scores(choices, ["a", "b"])


# --- replayed from a real GPU ------------------------------------------------------------------

def _gpu_fixture() -> dict:
    path = FIXTURES / "scores.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing: record it with `pytest -m gpu` on a GPU host "
                    "(tests/gpu/test_gpu_adapters.py writes it)")
    return json.loads(path.read_text())


def _replay(samples: list) -> list[Scores]:
    return [Scores(tuple(tuple(row) for row in sample)) for sample in samples]


def test_gpu_recorded_scores_decide_every_repeat_correctly() -> None:
    """Scores recorded on an H200 (CUDA vLLM, EXAONE-3.5-2.4B shapes, rank-32 adapters), every
    other repeat under concurrent load: each candidate's own repeats, replayed one by one as
    observations against references built from the first three, decide that candidate."""
    data = _gpu_fixture()
    models = {name: _replay(samples) for name, samples in data["models"].items()}
    assert len(models) >= 3 and all(len(s) >= 6 for s in models.values())
    refs = [Reference.from_samples(name, samples[:3]) for name, samples in models.items()]
    floor = noise_floor(r for r in refs if r.label != data["base"])
    for a in refs:
        for b in refs:
            if a is not b:
                assert separation(a, b, floor)[0], (a.label, b.label)
    for name, samples in models.items():
        rest = iter(samples[3:] * 2)
        verdict = decide(lambda it=rest: next(it), refs, floor=floor)
        assert verdict.is_(name), (name, verdict.describe())


def test_gpu_recorded_noise_is_what_the_margins_assume() -> None:
    """The recorded repeat noise of each adapter stays far below the distance between
    candidates: the margin the check relies on, from measured data."""
    data = _gpu_fixture()
    models = {name: _replay(samples) for name, samples in data["models"].items()}
    refs = {name: Reference.from_samples(name, samples) for name, samples in models.items()}
    worst_noise = max(r.noise for r in refs.values())
    closest = min(a.mean.distance(b.mean) for a in refs.values() for b in refs.values()
                  if a is not b)
    assert closest > 10 * worst_noise, (closest, worst_noise)
    assert refs[data["base"]].noise <= 0.05  # the base model repeats itself on a GPU


def test_candidates_that_answer_alike_are_refused_before_any_observation() -> None:
    """Two candidates with the same answer (a reference recorded while the base model
    answered like the adapter): an observation would match both, every time. The decision
    is refused up front, naming the pair, instead of ending "undecided" after six."""
    rng = random.Random(5)
    version, base = _ref("version 2", 1, 0.0, rng), _ref("the base model", 1, 0.0, rng)
    observed: list[int] = []

    def observe() -> Scores:
        observed.append(1)
        return _scores(1)

    with pytest.raises(Indistinct, match="version 2 and the base model answer alike"):
        decide(observe, [base, version])
    assert observed == []
    kept, twins = distinct([version, base, _ref("old", 2, 0.0, rng)])
    assert [c.label for c in kept] == ["version 2", "old"]
    assert [(a.label, b.label) for a, b, _d, _n in twins] == [("the base model", "version 2")]
