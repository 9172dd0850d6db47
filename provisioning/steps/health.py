"""Step `health`: the gate a host must pass before the rollout moves on.

Runs on the host against its own vLLM (``serving.host.health``): /health within the deadline,
/v1/models lists exactly the base model and the adapter set, and one completion per model,
each adapter answering differently from the base model.
"""

from __future__ import annotations

import time

from provisioning.bundle import host_python
from provisioning.remote import RemoteError
from provisioning.steps.converge import PLANNED, StepError, StepResult, Target
from provisioning.steps.model import stack_file

PASSED = "passed"


class HealthGate:
    name = "health"

    def run(self, t: Target) -> StepResult:
        started = time.monotonic()
        if t.dry:
            return StepResult(self.name, PLANNED, 0.0, "dry run: not checked")
        timeout = t.settings.health_timeout_s
        t.say(f"health: waiting up to {timeout:g} s for vLLM's /health on the host, then one "
              "answer per model (a cold start loads the weights and compiles)")
        try:
            out = t.host.json(
                host_python("serving.host.health", "--config", stack_file(t),
                            "--timeout-s", str(timeout)),
                sudo=True, timeout_s=timeout + 120)
        except RemoteError as exc:
            raise StepError(self.name, str(exc)) from None
        answers = out.get("answers", {})
        for model, text in answers.items():
            t.say(f"health: {model} answers {text!r}")
        t.facts["answers"] = answers
        return StepResult(self.name, PASSED, time.monotonic() - started,
                          f"ready after {out.get('ready_s')} s, {len(answers)} models answer")
