"""Which weights answer under a name: decided between known candidates, robust to GPU noise.

On a GPU, vLLM's LoRA path is not run-to-run deterministic (batching and kernel split
choices), while the base model is: the same adapter's greedy answer flips tokens at near-ties
and its logprobs move by up to ~0.2 between repeats. A check that asks "is this answer equal,
within a fixed tolerance, to the one recorded?" therefore fails on a GPU (6 of 6 hotfixes did)
although it always holds on the CPU build.

This check asks a different question: of the known candidates (the version expected, the
version it replaces, the base model), which one is answering? Each candidate is a
``Reference``: the teacher-forced scores of fixed texts (each token's logprob given the text
before it: ``echo`` + ``logprobs`` with one generated token), averaged over repeats, with the
largest repeat deviation as its measured noise. Teacher forcing does not diverge at near-ties
the way greedy generation does: on an H200 an adapter's per-token scores moved by 0.5-0.8 on
average between repeats, while two adapters, or an adapter and the base, differed by 27-30.

An observation matches a candidate when it lies within that candidate's tolerance (a multiple
of its measured noise, never below a floor) or is many times closer to it than to any other.
Candidates must be separable first (their distance well above the sum of their tolerances), so
an observation can match at most one; ``decide`` refuses candidates that are not (``Indistinct``)
rather than observe and end "undecided", and ``distinct`` lets a caller handle such a pair.
The verdict needs ``AGREE`` matching observations and none for another candidate; otherwise
it gathers more, up to ``MAX_OBSERVATIONS``, and then says "undecided". The same code holds on
the CPU (noise 0, one repeat is exact) and the GPU.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# Fixed texts scored teacher-forced. Short (about 30-40 tokens each under EXAONE's tokenizer),
# English and Korean like the model's training mix; one request scores all of them at once.
SCORE_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog, and then it runs back into the quiet "
    "forest before the evening rain begins to fall.",
    "Please answer briefly and politely: what are the three most important steps when you "
    "deploy a new version of a service to production?",
    "안녕하세요. 오늘 날씨가 좋네요. 짧고 정중하게 답해 주세요. 무엇을 도와드릴까요?",
)
TEXTS_ID = hashlib.sha256("\n".join(SCORE_TEXTS).encode()).hexdigest()[:16]

# Where prompts cannot be scored, the greedy continuation of one fixed prompt is. The CPU build
# of vLLM (0.32, seen) kills its engine when a batch holds more than one sequence that asks for
# prompt logprobs with a LoRA adapter (its CPU LoRA kernel indexes the logits by request, not by
# token), and concurrent traffic makes such batches. Greedy answers are exact on the CPU, and
# this prompt's answers have clear winners on the project's tiny model even under load.
GREEDY_PROMPT = "Hello! How are you today?"
GREEDY_TOKENS = 12

# Repeats that make up a candidate's reference (its noise is measured over them).
REFERENCE_SAMPLES = 3
# A candidate's tolerance: NOISE_FACTOR x its measured noise, never below NOISE_FLOOR (mean
# absolute per-token logprob difference). On the CPU the noise is 0 and the floor decides.
NOISE_FACTOR = 4.0
NOISE_FLOOR = 0.05
# Outside every tolerance, an observation still matches the candidate it is this many times
# closer to than to every other (a noisier repeat than the reference's few samples showed).
NEAREST_RATIO = 8.0
# Two candidates are told apart only when their distance exceeds SEPARATION x the sum of
# their tolerances; then no observation can match both.
SEPARATION = 2.0
AGREE = 2
MAX_OBSERVATIONS = 6

Outcome = Literal["decided", "undecided"]


class CheckError(Exception):
    """Scores could not be read (the server answered something unusable)."""


class Indistinct(CheckError):
    """Candidates that the check cannot tell apart were asked to be told apart: any verdict
    between them would be a guess, so none is attempted."""


@dataclass(frozen=True)
class Scores:
    """Per-token logprobs for each of ``SCORE_TEXTS``: teacher-forced (the texts' own tokens),
    or, where vLLM cannot score prompts (its CPU build, see ``GREEDY``), the logprobs of the
    greedy continuation of each text, whose ``tokens`` must then agree too."""

    values: tuple[tuple[float, ...], ...]
    tokens: tuple[tuple[str, ...], ...] = ()

    def distance(self, other: Scores) -> float:
        """Mean absolute per-token difference over all texts; inf when shapes or (greedy)
        tokens differ."""
        if len(self.values) != len(other.values) or self.tokens != other.tokens:
            return math.inf
        total, count = 0.0, 0
        for mine, theirs in zip(self.values, other.values, strict=True):
            if len(mine) != len(theirs):
                return math.inf
            total += sum(abs(a - b) for a, b in zip(mine, theirs, strict=True))
            count += len(mine)
        return total / count if count else math.inf

    @staticmethod
    def mean(samples: Sequence[Scores]) -> Scores:
        if not samples:
            raise ValueError("no samples")
        first = samples[0]
        for sample in samples[1:]:
            if sample.distance(first) == math.inf:
                raise CheckError("repeats of the same scoring request differ in length")
        return Scores(tuple(
            tuple(sum(s.values[t][i] for s in samples) / len(samples)
                  for i in range(len(first.values[t])))
            for t in range(len(first.values))
        ), first.tokens)


@dataclass(frozen=True)
class Reference:
    """A candidate: its label (``base``, ``version 2``...), mean scores and measured noise."""

    label: str
    mean: Scores
    noise: float = 0.0
    samples: int = 1

    @classmethod
    def from_samples(cls, label: str, samples: Sequence[Scores]) -> Reference:
        """The mean of ``samples`` and their largest deviation from it. Greedy samples whose
        tokens differ (a flip at a near-tie) cannot be averaged: the largest group of equal
        tokens makes the reference."""
        groups: dict[tuple[tuple[str, ...], ...], list[Scores]] = {}
        for sample in samples:
            groups.setdefault(sample.tokens, []).append(sample)
        group = max(groups.values(), key=len)
        mean = Scores.mean(group)
        noise = max((s.distance(mean) for s in group), default=0.0)
        return cls(label, mean, noise, len(group))

    def tolerance(self, noise_floor: float = 0.0) -> float:
        return max(NOISE_FLOOR, NOISE_FACTOR * max(self.noise, noise_floor))

    def relabel(self, label: str) -> Reference:
        return Reference(label, self.mean, self.noise, self.samples)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "scores", "texts": TEXTS_ID, "noise": round(self.noise, 6),
            "samples": self.samples,
            "mean": [[round(x, 5) for x in row] for row in self.mean.values]}
        if self.mean.tokens:
            out["tokens"] = [list(row) for row in self.mean.tokens]
        return out

    @classmethod
    def from_json(cls, label: str, data: Mapping[str, Any] | None) -> Reference | None:
        """The reference recorded with a version, or None when it was recorded by another
        check or over other texts (then it cannot be compared)."""
        if not isinstance(data, Mapping) or data.get("kind") != "scores" or \
                data.get("texts") != TEXTS_ID:
            return None
        try:
            mean = Scores(tuple(tuple(float(x) for x in row) for row in data["mean"]),
                          tuple(tuple(str(t) for t in row) for row in data.get("tokens", ())))
            return cls(label, mean, float(data.get("noise", 0.0)), int(data.get("samples", 1)))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Verdict:
    """What answers: ``label`` when decided, with the evidence for the message and the log."""

    outcome: Outcome
    label: str | None
    observations: int
    distances: tuple[dict[str, float], ...] = ()
    tolerances: dict[str, float] = field(default_factory=dict)

    @property
    def decided(self) -> bool:
        return self.outcome == "decided"

    def is_(self, label: str) -> bool:
        return self.decided and self.label == label

    def describe(self) -> str:
        last = self.distances[-1] if self.distances else {}
        figures = ", ".join(f"{k} {v:.3g} (tolerance {self.tolerances.get(k, 0):.3g})"
                            for k, v in sorted(last.items(), key=lambda kv: kv[1]))
        if self.decided:
            return f"answers as {self.label} ({self.observations} observations; {figures})"
        return (f"undecided after {self.observations} observations: no candidate matched "
                f"{AGREE} times alone (distances {figures})")


def noise_floor(references: Iterable[Reference]) -> float:
    """The largest noise any adapter reference showed. The LoRA path's noise is a property of
    the server, not of one adapter: a reference whose few repeats happened to agree closely
    still gets the tolerance its peers measured."""
    return max((r.noise for r in references), default=0.0)


def separation(a: Reference, b: Reference, floor: float = 0.0) -> tuple[bool, float, float]:
    """(apart, their distance, the distance needed) for two candidates."""
    distance = a.mean.distance(b.mean)
    needed = SEPARATION * (a.tolerance(floor) + b.tolerance(floor))
    return distance > needed, distance, needed


def overlap(a: Reference, b: Reference, floor: float = 0.0) -> tuple[bool, float, float]:
    """(overlapping, their distance, the distance needed): overlapping candidates lie within
    one another's tolerance, so an observation of either matches both and decides nothing."""
    distance = a.mean.distance(b.mean)
    needed = max(a.tolerance(floor), b.tolerance(floor))
    return distance <= needed, distance, needed


def distinct(candidates: Sequence[Reference], floor: float = 0.0, *, strict: bool = True
             ) -> tuple[list[Reference], list[tuple[Reference, Reference, float, float]]]:
    """The candidates that can be told apart, in order: each one not separable from an
    earlier one (``separation``; with ``strict`` off, only one that overlaps it) is left out
    and listed as (left out, its twin, distance, distance needed). Callers decide what such a
    pair means (the same weights, or a reference recorded wrong); ``decide`` refuses to guess
    between overlapping ones."""
    kept: list[Reference] = []
    twins: list[tuple[Reference, Reference, float, float]] = []
    for candidate in candidates:
        for earlier in kept:
            if strict:
                apart, distance, needed = separation(earlier, candidate, floor)
            else:
                close, distance, needed = overlap(earlier, candidate, floor)
                apart = not close
            if not apart:
                twins.append((candidate, earlier, distance, needed))
                break
        else:
            kept.append(candidate)
    return kept, twins


def match(observation: Scores, candidates: Sequence[Reference],
          floor: float = 0.0) -> tuple[str | None, dict[str, float]]:
    """The candidate one observation matches, or None; with its distance to each."""
    distances = {c.label: observation.distance(c.mean) for c in candidates}
    within = [c.label for c in candidates if distances[c.label] <= c.tolerance(floor)]
    if len(within) == 1:
        return within[0], distances
    if within:  # only when candidates were not checked for separation
        return None, distances
    nearest = min(candidates, key=lambda c: distances[c.label])
    others = [d for label, d in distances.items() if label != nearest.label]
    if others and distances[nearest.label] * NEAREST_RATIO < min(others):
        return nearest.label, distances
    return None, distances


def decide(observe: Callable[[], Scores], candidates: Sequence[Reference], *,
           floor: float = 0.0, agree: int = AGREE,
           max_observations: int = MAX_OBSERVATIONS) -> Verdict:
    """Observe until ``agree`` observations match one candidate and none matched another;
    undecided after ``max_observations`` or as soon as two candidates were matched."""
    if not candidates:
        raise ValueError("no candidates")
    _kept, twins = distinct(candidates, floor, strict=False)
    if twins:
        # An observation within both tolerances matches neither (``match``): observing would
        # only end "undecided" after every observation, and hide why.
        raise Indistinct("; ".join(
            f"{a.label} and {b.label} answer alike (score distance {d:.3g}, the check needs "
            f"more than {n:.3g} to tell them apart)" for a, b, d, n in twins))
    counts: dict[str, int] = {}
    seen: list[dict[str, float]] = []
    tolerances = {c.label: c.tolerance(floor) for c in candidates}
    for n in range(1, max_observations + 1):
        label, distances = match(observe(), candidates, floor)
        seen.append(distances)
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
        if len(counts) > 1:
            break
        if label is not None and counts[label] >= agree:
            return Verdict("decided", label, n, tuple(seen), tolerances)
    return Verdict("undecided", None, len(seen), tuple(seen), tolerances)


def parse_scores(choices: Sequence[Mapping[str, Any]], texts: Sequence[str]) -> Scores:
    """Scores from a /v1/completions answer to ``echo`` + ``logprobs`` + ``max_tokens: 1``.

    vLLM returns, per choice, the prompt's tokens then the generated one; the first prompt
    token has no logprob (null) and the generated token is not part of the text.
    """
    if len(choices) != len(texts):
        raise CheckError(f"asked to score {len(texts)} texts, got {len(choices)} answers")
    rows = []
    for choice in sorted(choices, key=lambda c: int(c.get("index", 0))):
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if not isinstance(logprobs, list) or len(logprobs) < 3:
            raise CheckError("the server returned no prompt logprobs (echo + logprobs)")
        try:
            row = tuple(float(x) for x in logprobs[1:-1])
        except (TypeError, ValueError):
            raise CheckError("a prompt logprob was not a number") from None
        if not all(math.isfinite(x) for x in row):
            raise CheckError("a prompt logprob was not finite: the weights answer NaN or inf")
        rows.append(row)
    return Scores(tuple(rows))


def parse_greedy(tokens: Sequence[str], logprobs: Sequence[float]) -> Scores:
    """Scores from the greedy continuation of ``GREEDY_PROMPT``: its tokens and logprobs."""
    if not tokens or len(tokens) != len(logprobs):
        raise CheckError("the server returned no token logprobs for a greedy answer")
    if not all(math.isfinite(x) for x in logprobs):
        raise CheckError("a logprob was not finite: the weights answer NaN or inf")
    return Scores((tuple(float(x) for x in logprobs),), (tuple(tokens),))
