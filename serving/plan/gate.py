"""One validation before any change, wherever a change starts: `serving validate`,
`fab validate`, `fab deploy` (and every host task) and the Pulumi program ask the same
question here. The spec's own rules ran when it was loaded; this adds what needs more than
the schema: whether the stack fits its GPUs (``serving.plan``) and whether a cloud stack
still carries example values (``serving.stack.examples``).
"""

from __future__ import annotations

from pathlib import Path

from serving.plan.cli import fit_problems
from serving.stack import examples, stackfile
from serving.stack.errors import Problem, SpecError
from serving.stack.spec import Spec


def problems(spec: Spec, *, where: str | None = None, root: Path = stackfile.ROOT,
             allow_examples: bool = False) -> list[Problem]:
    """Why ``spec`` must not be created or rolled out; empty when it may.
    ``allow_examples`` checks the shape alone (the checked-in example stacks)."""
    where = where or f"Pulumi.{spec.stack}.yaml"
    found = [] if allow_examples else examples.problems(spec, where)
    return found + fit_problems(spec, where=where, root=root)


def require(spec: Spec, **kwargs: object) -> None:
    """``problems`` as a SpecError (every problem at once), or nothing."""
    found = problems(spec, **kwargs)  # type: ignore[arg-type]
    if found:
        raise SpecError(found)
