"""Make EXAONE 3.5's remote code import under the serving venv's transformers.

LG's checkpoints ship ``configuration_exaone.py`` and ``modeling_exaone.py`` that vLLM loads
with ``--trust-remote-code``; they were written against another transformers, and some of
the names they import have since moved. Run on the target host with the serving venv's
interpreter (the answer depends on that interpreter's transformers)::

    python -m serving.host.exaone_patch MODEL_DIR [--check] [--json]

Every module-level ``from X import ...`` / ``import X`` of each remote-code file is tried
here; a failing name found in another module listed in ``KNOWN_FALLBACKS`` is rewritten as
``try: <original> except ImportError: <same names, the moved ones from their new module>``.
The original bytes stay beside the file as ``<file>.orig`` and patching always starts from
them, so running again is a no-op and a new model revision is re-patched from its own text.

Exit codes: 0 done (or, with --check, "not needed"/"applied"); 1 with --check: "needed" or
"stale"; 2 usage or model-folder error; 3 a failing import with no known fallback (nothing
written); 4 the patched code failed verification (originals restored).

Standard library only (and serving.atomic, which is too): this file runs in the serving venv,
which has none of the project's other dependencies.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from serving.atomic import write_file

REMOTE_CODE_FILES = ("configuration_exaone.py", "modeling_exaone.py")
ORIG_SUFFIX = ".orig"
MARKER_PREFIX = "# exaone-serving: patched imports"
_MARKER_RE = re.compile(
    re.escape(MARKER_PREFIX)
    + r" for transformers (?P<version>\S+)"
    + r" \(original: (?P<orig>\S+), sha256 (?P<sha>[0-9a-f]{64})\)"
)
_CODING_RE = re.compile(r"^[ \t\f]*#.*?coding[:=][ \t]*[-\w.]+")

# Symbol -> modules it can be imported from now, tried in order. Only relocations: the same
# object under the same name. Each entry is checked against the serving venv by the tests.
KNOWN_FALLBACKS: dict[str, tuple[str, ...]] = {
    # EXAONE 3.5's modeling_exaone.py imports these from transformers.modeling_utils; 5.19
    # defines them in utils.generic and its modeling_utils no longer imports them.
    "check_model_inputs": ("transformers.utils.generic",),
    "maybe_autocast": ("transformers.utils.generic",),
    # 4.5x-era modeling code imports it from utils.generic; 5.19 moved it.
    "OutputRecorder": ("transformers.utils.output_capturing",),
    # transformers 4.x re-exported these from modeling_utils; 5.19 does not.
    "PretrainedConfig": ("transformers.configuration_utils", "transformers"),
    "GenerationMixin": ("transformers.generation", "transformers"),
    "Conv1D": ("transformers.pytorch_utils",),
    "apply_chunking_to_forward": ("transformers.pytorch_utils",),
    "prune_linear_layer": ("transformers.pytorch_utils",),
}

STATE_NOT_NEEDED = "not needed"
STATE_NEEDED = "needed"
STATE_APPLIED = "applied"
STATE_STALE = "stale"
STATE_BLOCKED = "blocked"
STATE_FAILED = "failed"
STATE_ERROR = "error"

EXIT_OK = 0
EXIT_CHECK_ACTION = 1
EXIT_USAGE = 2
EXIT_NO_FALLBACK = 3
EXIT_VERIFY = 4

# (module, name) -> None when ``from module import name`` works here, else the error text;
# name None means ``import module``.
Probe = Callable[[str, str | None], str | None]


class PatchError(Exception):
    """A model folder this tool cannot work on (exit 2)."""


# --- pure part: text in, text out -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImportSite:
    """One module-level import statement."""

    line: int
    end_line: int
    col: int  # UTF-8 byte offsets, as ast gives them
    end_col: int
    module: str | None  # None for ``import X``
    names: tuple[tuple[str, str | None], ...]

    def statement(self, name: str, asname: str | None) -> str:
        alias = f" as {asname}" if asname else ""
        if self.module is None:
            return f"import {name}{alias}"
        return f"from {self.module} import {name}{alias}"


@dataclasses.dataclass(frozen=True)
class Fix:
    site: ImportSite
    name: str
    asname: str | None
    new_module: str

    @property
    def old_import(self) -> str:
        return self.site.statement(self.name, self.asname)


@dataclasses.dataclass(frozen=True)
class Unresolved:
    line: int
    statement: str
    error: str


@dataclasses.dataclass(frozen=True)
class Plan:
    fixes: tuple[Fix, ...]
    unresolved: tuple[Unresolved, ...]


def import_sites(source: str) -> list[ImportSite]:
    """Module-level absolute imports; those nested in ``if``/``try`` and relative ones are left."""
    sites = []
    for node in ast.parse(source.removeprefix("\ufeff")).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            module: str | None = node.module
        elif isinstance(node, ast.Import):
            module = None
        else:
            continue
        assert node.end_lineno is not None and node.end_col_offset is not None
        names = tuple((alias.name, alias.asname) for alias in node.names)
        sites.append(ImportSite(node.lineno, node.end_lineno, node.col_offset,
                                node.end_col_offset, module, names))
    return sites


def plan_imports(
    source: str, probe: Probe, fallbacks: Mapping[str, Sequence[str]] = KNOWN_FALLBACKS
) -> Plan:
    """Which imported names fail under ``probe``, and where each failing one lives now."""
    fixes: list[Fix] = []
    unresolved: list[Unresolved] = []
    for site in import_sites(source):
        for name, asname in site.names:
            if site.module is None or name == "*":
                module = site.module if site.module is not None else name
                error = probe(module, None)
                if error is not None:
                    unresolved.append(Unresolved(site.line, site.statement(name, asname), error))
                continue
            error = probe(site.module, name)
            if error is None:
                continue
            new_module = next(
                (m for m in fallbacks.get(name, ()) if m != site.module and probe(m, name) is None),
                None,
            )
            if new_module is None:
                unresolved.append(Unresolved(site.line, site.statement(name, asname), error))
            else:
                fixes.append(Fix(site, name, asname, new_module))
    return Plan(tuple(fixes), tuple(unresolved))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def marker_line(transformers_version: str, orig_name: str, orig_sha256: str) -> str:
    return (f"{MARKER_PREFIX} for transformers {transformers_version} "
            f"(original: {orig_name}, sha256 {orig_sha256})")


def find_marker(text: str) -> re.Match[str] | None:
    for line in text.splitlines()[:3]:
        match = _MARKER_RE.match(line)
        if match:
            return match
    return None


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def _names(names: Sequence[tuple[str, str | None]]) -> str:
    return ", ".join(f"{name} as {asname}" if asname else name for name, asname in names)


def _replacement(site: ImportSite, fixes: Sequence[Fix], lines: list[str], nl: str) -> list[str]:
    first = lines[site.line - 1].encode()
    last = lines[site.end_line - 1].encode()
    prefix = first[: site.col].decode()
    if site.line == site.end_line:
        segment = first[site.col : site.end_col].decode()
    else:
        middle = "".join(lines[site.line : site.end_line - 1])
        segment = (first[site.col :].decode() + middle + last[: site.end_col].decode())
    rest = last[site.end_col :].decode().rstrip("\r\n").strip()
    comment = ""
    if rest.startswith(";"):
        rest = rest[1:].strip()
    elif rest.startswith("#"):
        comment, rest = "  " + rest, ""

    out = []
    if prefix.strip():  # an earlier statement on the same line: ``import os; from x import y``
        out.append(prefix.rstrip().rstrip(";").rstrip() + nl)
    out.append("try:" + nl)
    body = segment.splitlines()
    out.extend("    " + text + nl for text in body[:-1])
    out.append("    " + body[-1] + comment + nl)
    out.append("except ImportError:" + nl)
    moved = {(fix.name, fix.asname) for fix in fixes}
    kept = [alias for alias in site.names if alias not in moved]
    if kept:
        out.append(f"    from {site.module} import {_names(kept)}{nl}")
    by_module: dict[str, list[tuple[str, str | None]]] = {}
    for fix in fixes:
        by_module.setdefault(fix.new_module, []).append((fix.name, fix.asname))
    out.extend(f"    from {module} import {_names(names)}{nl}"
               for module, names in by_module.items())
    if rest:
        out.append(rest + nl)
    return out


def render(original: str, plan: Plan, *, transformers_version: str, orig_name: str) -> str:
    """``original`` with each failing import wrapped and a marker line; unchanged if no fixes.

    Statements keep their order; lines after the marker and after each rewritten import shift.
    """
    if plan.unresolved:
        raise ValueError("imports without a fallback cannot be rendered")
    if not plan.fixes:
        return original
    bom = "\ufeff" if original.startswith("\ufeff") else ""
    text = original[len(bom):]
    nl = _newline(text)
    lines = text.splitlines(keepends=True)
    by_site: dict[ImportSite, list[Fix]] = {}
    for fix in plan.fixes:
        by_site.setdefault(fix.site, []).append(fix)
    for site in sorted(by_site, key=lambda s: s.line, reverse=True):
        lines[site.line - 1 : site.end_line] = _replacement(site, by_site[site], lines, nl)
    # After a shebang and a coding declaration, which must stay on lines 1-2.
    at = 0
    for i in range(min(2, len(lines))):
        if (i == 0 and lines[0].startswith("#!")) or _CODING_RE.match(lines[i]):
            at = i + 1
        else:
            break
    sha = sha256_hex(original.encode())
    lines.insert(at, marker_line(transformers_version, orig_name, sha) + nl)
    patched = bom + "".join(lines)
    ast.parse(patched.removeprefix("\ufeff"))
    return patched


@dataclasses.dataclass(frozen=True)
class FileReport:
    name: str
    state: str
    plan: Plan  # its line numbers are those of ``source_name``
    original: bytes
    desired: bytes | None  # None when blocked
    current: bytes
    source_name: str  # the file the original text was read from: ``name`` or its .orig

    @property
    def must_write(self) -> bool:
        return self.desired is not None and self.desired != self.current


def assess(
    name: str, current: bytes, backup: bytes | None, probe: Probe, transformers_version: str,
    fallbacks: Mapping[str, Sequence[str]] = KNOWN_FALLBACKS,
) -> FileReport:
    """The state of one remote-code file and what it should hold (``backup``: its ``.orig``).

    A file without the marker is the original (a new revision when it differs from the
    backup); a file with it is derived from the backup, the one source patches start from.
    """
    text = _decode(name, current)
    marked = find_marker(text) is not None
    if marked:
        if backup is None:
            raise PatchError(f"{name} carries the patch marker but {name}{ORIG_SUFFIX} is missing: "
                             "restore the model's original files and run again")
        original = backup
    else:
        original = current
    plan = plan_imports(_parse_checked(name, _decode(name, original)), probe, fallbacks)
    source_name = name + ORIG_SUFFIX if marked else name
    if plan.unresolved:
        return FileReport(name, STATE_BLOCKED, plan, original, None, current, source_name)
    desired = render(_decode(name, original), plan, transformers_version=transformers_version,
                     orig_name=name + ORIG_SUFFIX).encode()
    if not marked:
        state = STATE_NEEDED if plan.fixes else STATE_NOT_NEEDED
    else:
        state = STATE_APPLIED if plan.fixes and desired == current else STATE_STALE
    return FileReport(name, state, plan, original, desired, current, source_name)


def _decode(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PatchError(f"{name} is not UTF-8: {exc}") from None


def _parse_checked(name: str, text: str) -> str:
    try:
        ast.parse(text.removeprefix("\ufeff"))
    except SyntaxError as exc:
        python = sys.version.split()[0]
        raise PatchError(f"{name} does not parse with Python {python}: {exc}") from None
    return text


def overall_state(states: Sequence[str]) -> str:
    for state in (STATE_BLOCKED, STATE_STALE, STATE_NEEDED, STATE_APPLIED):
        if state in states:
            return state
    return STATE_NOT_NEEDED


# --- this interpreter -------------------------------------------------------------------------


def probe_import(module: str, name: str | None) -> str | None:
    """None if ``from module import name`` (``import module``: None) works in this interpreter."""
    try:
        # Some remote-code dependencies print on import; stdout is for --json.
        with contextlib.redirect_stdout(sys.stderr):
            loaded = importlib.import_module(module)
            if name is None or hasattr(loaded, name):
                return None
            try:  # ``from package import submodule``
                importlib.import_module(f"{module}.{name}")
                return None
            except ModuleNotFoundError as exc:
                if exc.name != f"{module}.{name}":
                    raise
    except Exception as exc:  # an import can fail with anything its module raises
        return f"{type(exc).__name__}: {exc}"
    where = getattr(loaded, "__file__", None)
    return (f"ImportError: cannot import name {name!r} from {module!r}"
            + (f" ({where})" if where else ""))


def transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        raise PatchError(f"transformers is not installed for {sys.executable}: run this with "
                         "the serving venv's python") from None


_VERIFY = """\
import json, sys
from transformers import AutoConfig
config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
print(json.dumps({"model_type": config.model_type, "class": type(config).__name__}))
"""


def verify(model_dir: Path, timeout: float = 600) -> tuple[dict[str, Any] | None, str]:
    """Load the config through the remote code in a fresh interpreter: (result, error)."""
    with tempfile.TemporaryDirectory(prefix="exaone-patch-verify-") as home:
        # Offline, and a throwaway module cache: the service's cache stays as it is.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": home,
               "HF_MODULES_CACHE": os.path.join(home, "modules")}
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _VERIFY, str(model_dir.resolve())],
                                  cwd=home, env=env, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return None, f"AutoConfig.from_pretrained did not finish within {timeout:.0f} s"
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return None, f"AutoConfig.from_pretrained failed (exit {done.returncode}):\n{tail}"
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None, f"unexpected output from the verification: {done.stdout[-500:]!r}"
    if result.get("model_type") != "exaone":
        return None, f"AutoConfig gave model_type {result.get('model_type')!r}, not 'exaone'"
    return result, ""


# --- the command ------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    state: str
    changed: bool
    exit_code: int
    reports: list[FileReport]
    version: str
    messages: list[str] = dataclasses.field(default_factory=list)
    error: str = ""
    verified: dict[str, Any] | None = None


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def run(model_dir: Path, *, check: bool, probe: Probe = probe_import,
        verifier: Callable[[Path], tuple[dict[str, Any] | None, str]] = verify) -> Outcome:
    version = transformers_version()
    if not model_dir.is_dir():
        raise PatchError(f"{model_dir} is not a folder")
    reports = []
    for name in REMOTE_CODE_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        backup_path = model_dir / (name + ORIG_SUFFIX)
        backup = backup_path.read_bytes() if backup_path.is_file() else None
        reports.append(assess(name, path.read_bytes(), backup, probe, version))
    if not reports:
        raise PatchError(f"no {' or '.join(REMOTE_CODE_FILES)} in {model_dir}")
    state = overall_state([r.state for r in reports])

    if state == STATE_BLOCKED:
        messages = [
            f"{model_dir / r.source_name}:{u.line}: `{u.statement}` fails under transformers "
            f"{version}: {u.error}"
            for r in reports for u in r.plan.unresolved
        ]
        messages.append("No file was written. If the name moved, add its new module to "
                        "KNOWN_FALLBACKS in serving/host/exaone_patch.py; otherwise pin a vLLM "
                        "(transformers) or model revision whose remote code imports cleanly.")
        return Outcome(state, False, EXIT_NO_FALLBACK, reports, version, messages,
                       error=messages[0])
    if check:
        code = EXIT_CHECK_ACTION if state in (STATE_NEEDED, STATE_STALE) else EXIT_OK
        return Outcome(state, False, code, reports, version)

    to_write = [r for r in reports if r.must_write]
    if not to_write:
        return Outcome(state, False, EXIT_OK, reports, version)
    for report in to_write:
        path = model_dir / report.name
        backup_path = model_dir / (report.name + ORIG_SUFFIX)
        mode = _mode(path)
        if not backup_path.is_file() or backup_path.read_bytes() != report.original:
            write_file(backup_path, report.original, mode)
        assert report.desired is not None
        write_file(path, report.desired, mode)
    result, error = verifier(model_dir)
    if result is None:
        for report in to_write:
            path = model_dir / report.name
            write_file(path, (model_dir / (report.name + ORIG_SUFFIX)).read_bytes(),
                         _mode(path))
        message = (f"{error}\nThe remote code was restored from the {ORIG_SUFFIX} copies "
                   f"(unpatched).")
        return Outcome(STATE_FAILED, True, EXIT_VERIFY, reports, version, [message],
                       error=message)
    after = [STATE_APPLIED if r.plan.fixes else STATE_NOT_NEEDED for r in reports]
    return Outcome(overall_state(after), True, EXIT_OK, reports, version, verified=result)


def file_state(outcome: Outcome, report: FileReport) -> str:
    """The file's state after the run (before it, for --check and when nothing was written)."""
    if outcome.changed and outcome.state != STATE_FAILED:
        return STATE_APPLIED if report.plan.fixes else STATE_NOT_NEEDED
    return report.state


def to_json(outcome: Outcome) -> dict[str, Any]:
    files: dict[str, Any] = {}
    for report in outcome.reports:
        entry: dict[str, Any] = {
            "state": file_state(outcome, report),
            "fixed": [[fix.old_import, fix.new_module] for fix in report.plan.fixes],
        }
        if report.plan.unresolved:
            entry["unresolved"] = [{"file": report.source_name, **dataclasses.asdict(u)}
                                   for u in report.plan.unresolved]
        files[report.name] = entry
    data: dict[str, Any] = {"state": outcome.state, "changed": outcome.changed, "files": files,
                            "transformers": outcome.version}
    if outcome.error:
        data["error"] = outcome.error
    if outcome.verified is not None:
        data["verified"] = outcome.verified
    return data


def to_text(outcome: Outcome, model_dir: Path, *, check: bool) -> str:
    out = [f"{model_dir}: {outcome.state} (transformers {outcome.version})"]
    for report in outcome.reports:
        out.append(f"  {report.name}: {file_state(outcome, report)}")
        out.extend(f"    {report.source_name} line {fix.site.line}: {fix.old_import} -> "
                   f"{fix.new_module}" for fix in report.plan.fixes)
    if outcome.changed and outcome.state != STATE_FAILED:
        written = ", ".join(r.name for r in outcome.reports if r.must_write)
        out.append(f"wrote {written}; originals kept as *{ORIG_SUFFIX}")
        if outcome.verified:
            out.append(f"verified: AutoConfig.from_pretrained -> {outcome.verified['class']} "
                       f"(model_type {outcome.verified['model_type']})")
    elif not check and outcome.exit_code == EXIT_OK:
        out.append("unchanged")
    elif check and outcome.exit_code == EXIT_CHECK_ACTION:
        out.append(f"run `python -m serving.host.exaone_patch {model_dir}` to patch")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.host.exaone_patch",
        description="Rewrite EXAONE remote-code imports that fail under this interpreter's "
                    "transformers (originals kept as *.orig).")
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    parser.add_argument("--check", action="store_true", help="report the state; write nothing")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    try:
        outcome = run(args.model_dir, check=args.check)
    except PatchError as exc:
        if args.json:
            print(json.dumps({"state": STATE_ERROR, "changed": False, "files": {},
                              "transformers": None, "error": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(to_json(outcome), sort_keys=True))
    else:
        print(to_text(outcome, args.model_dir, check=args.check))
    for message in outcome.messages:
        print(message, file=sys.stderr)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
