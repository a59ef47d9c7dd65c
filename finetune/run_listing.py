"""`finetune runs`: what each run in --runs-dir is, read so that no damaged file stops the listing.

A run is summed up from its own files (runs.py has the layout): config.yaml (the model, the planned
steps), status.json (how it ended, run_status.py), the run lock (running now, locking.py),
metrics.jsonl (steps done, validation perplexity), its checkpoints (the latest one's state.json, read
through run_state.py) and the bytes it holds. Each file is read on its own: one that is missing,
damaged or unreadable leaves its columns empty and adds one line to the run's `problems`, and the
other runs and columns are listed as usual. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from finetune import checkpoint as ckpt
from finetune import files, locking, metrics, run_status
from finetune.config import DEFAULT_STEPS, RunConfig, load_yaml
from finetune.errors import FinetuneError
from finetune.run_state import TrainingState

# What the status column says beyond run_status's four: a run whose status.json still says "running"
# with nobody holding its lock, and a run written before status.json existed that did not reach its end.
KILLED, INCOMPLETE = "killed", "incomplete"
START_HINT = "start one with `finetune train DATA` (try: finetune train sample_data/recipes.txt --model tiny)"
T = TypeVar("T")


@dataclass
class Validation:
    """The validation perplexities metrics.jsonl holds: the first, the best and the last, with their steps."""

    count: int = 0
    first: Optional[float] = None
    first_step: Optional[int] = None
    best: Optional[float] = None
    best_step: Optional[int] = None
    last: Optional[float] = None
    last_step: Optional[int] = None


@dataclass
class RunSummary:
    """One row of the table (and of `--json`)."""

    name: str
    path: str
    model: Optional[str] = None
    steps_done: Optional[int] = None
    steps_planned: Optional[int] = None
    status: Optional[str] = None  # run_status's four, KILLED or INCOMPLETE; None: unknown
    signal: Optional[str] = None  # SIGINT / SIGTERM for a stopped run
    pid: Optional[int] = None  # the process training a running run
    error: Optional[str] = None  # the error line of a failed run
    started: Optional[str] = None
    ended: Optional[str] = None
    validation: Validation = field(default_factory=Validation)
    last_checkpoint: Optional[str] = None
    size_bytes: int = 0
    problems: list[str] = field(default_factory=list)  # one line per file that could not be read


@dataclass
class CheckpointInfo:
    name: str
    step: int
    size_bytes: int
    latest: bool
    problem: Optional[str] = None


@dataclass
class RunDetail:
    """`finetune runs NAME`: the row, and what started the run, its settings, checkpoints and samples."""

    summary: RunSummary
    command: Optional[str] = None
    config: Optional[dict] = None  # config.yaml: the run's resolved settings
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)  # paths of the samples files, oldest first


@dataclass
class Listing:
    """Every run of a runs directory, and its subdirectories that are not runs."""

    runs_dir: str
    runs: list[RunSummary]
    not_runs: list[str]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def looks_like_run(path: Path) -> bool:
    """A directory training wrote to: it holds any of a run's own files (a damaged run is still a run)."""
    names = ("config.yaml", metrics.FILE_NAME, run_status.FILE_NAME, "latest")
    return any((path / name).exists() for name in names) or bool(ckpt.list_checkpoints(path))


def list_runs(runs_dir: str) -> Listing:
    """The runs under `runs_dir`, by name; a missing directory has none. Only an unusable `runs_dir` raises."""
    root = Path(runs_dir)
    if not root.exists():
        return Listing(runs_dir, [], [])
    if not root.is_dir():
        raise FinetuneError(f"--runs-dir {runs_dir} is a file, not a directory; point it at the directory of your runs")
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise files.os_error(root, exc, "runs directory") from None
    # A directory that cannot even be looked into is listed as a run, with the reason as its problem.
    runs = [p for p in children if _attempt([], lambda p=p: looks_like_run(p), True)]
    strays = [str(p) for p in children if p not in runs]
    return Listing(runs_dir, [summarize(p) for p in runs], strays)


def find(runs_dir: str, name: str) -> Path:
    """The directory of the run `name`, or one line saying why there is none."""
    root = Path(runs_dir)
    run_dir = root / name
    if name in ("", ".", "..") or "/" in name or not run_dir.is_dir():
        names = _attempt([], lambda: sorted(p.name for p in root.iterdir() if p.is_dir() and looks_like_run(p)), [])
        there = f"runs in {root}/: {', '.join(names)}" if names else f"{root}/ has no runs yet; {START_HINT}"
        raise FinetuneError(f"no run named '{name}'; {there}")
    if not _attempt([], lambda: looks_like_run(run_dir), True):
        raise FinetuneError(
            f"{run_dir} is not a run (it holds no config.yaml, metrics.jsonl, status.json or checkpoint); "
            f"`finetune runs --runs-dir {runs_dir}` lists the runs"
        )
    return run_dir


def summarize(run_dir: Path) -> RunSummary:
    """One run's row; never raises: what cannot be read stays None and is named in `problems`."""
    summary = RunSummary(name=run_dir.name, path=str(run_dir))
    problems = summary.problems
    config = _attempt(problems, lambda: read_config(run_dir), None)
    status = _attempt(problems, lambda: run_status.read(run_dir), None)
    records = _attempt(problems, lambda: _metrics(run_dir), [])
    checkpoints = _attempt(problems, lambda: ckpt.list_checkpoints(run_dir), [])
    latest = _attempt(problems, lambda: ckpt.latest_checkpoint(run_dir, strict=False), None)
    if latest is not None:
        _attempt(problems, lambda: _check_checkpoint(latest), None)
        summary.last_checkpoint = latest.name
    summary.model = _get(config, "model", "name")
    summary.validation = validation_of(records)
    summary.steps_done = _steps_done(records, checkpoints, status)
    summary.steps_planned = status.total_steps if status else _planned_steps(config)
    summary.size_bytes = size_of(run_dir)
    holder = _attempt(problems, lambda: locking.holder_pid(run_dir), None)
    _set_status(summary, status, holder)
    return summary


def describe(runs_dir: str, name: str) -> RunDetail:
    """`finetune runs NAME`; raises only when there is no such run."""
    run_dir = find(runs_dir, name)
    summary = summarize(run_dir)
    detail = RunDetail(summary=summary)
    problems = summary.problems
    detail.config = _attempt([], lambda: read_config(run_dir), None)  # its problem is in the summary already
    latest = _attempt([], lambda: ckpt.latest_checkpoint(run_dir, strict=False), None)
    for path in _attempt([], lambda: ckpt.list_checkpoints(run_dir), []):
        found: list[str] = []
        _attempt(found, lambda path=path: _check_checkpoint(path), None)
        step = int(ckpt.CHECKPOINT_RE.match(path.name).group(1))
        detail.checkpoints.append(CheckpointInfo(path.name, step, size_of(path), path == latest, *found[:1]))
    if latest is not None:
        state = _attempt([], lambda: TrainingState.read_optional(str(latest)), None)
        detail.command = state.command if state is not None else None
    if detail.command is None:  # no checkpoint yet (or an unreadable one): the command status.json recorded
        status = _attempt([], lambda: run_status.read(run_dir), None)
        detail.command = status.command if status is not None else None
    samples = run_dir / "samples"
    found_samples = _attempt(problems, lambda: sorted(samples.glob("samples-*.txt")) if samples.is_dir() else [], [])
    detail.samples = [str(p) for p in found_samples]
    return detail


def read_config(run_dir: Path) -> Optional[dict]:
    """config.yaml as a dict of sections, or None when the run has none."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    try:
        values = load_yaml(path)
    except OSError as exc:
        raise files.os_error(path, exc, "run config") from None
    except FinetuneError as exc:
        raise FinetuneError(f"run {exc}") from None
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise FinetuneError(
            f"run config file {path} is not a mapping of model/data/train sections; "
            f"fix it (the next `finetune train` of this run rewrites it)"
        )
    return values


def validation_of(records: list[dict]) -> Validation:
    """The first, best (lowest) and last validation perplexity of metrics.jsonl's records; the first is the one
    before training (step 0, metrics.INITIAL_VAL_PERPLEXITY) when the run measured it."""
    points = []
    for r in records:
        value = r.get("val_perplexity", r.get(metrics.INITIAL_VAL_PERPLEXITY))
        if _is_number(value) and _is_int(r.get("step")):
            points.append((r["step"], float(value)))
    if not points:
        return Validation()
    best_step, best = min(points, key=lambda point: point[1])
    return Validation(len(points), points[0][1], points[0][0], best, best_step, points[-1][1], points[-1][0])


def size_of(path: Path) -> int:
    """Bytes in the files under `path` (links not followed); files vanishing meanwhile (pruning) are skipped."""
    total = 0
    for directory, _, names in os.walk(path, onerror=lambda _exc: None):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


def _attempt(problems: list[str], read: Callable[[], T], fallback: T) -> T:
    """read(), or `fallback` with the reason added to `problems` (a FinetuneError's line, or the OS error's)."""
    try:
        return read()
    except FinetuneError as exc:
        problems.append(str(exc))
    except OSError as exc:
        problems.append(str(files.os_error(None, exc)))
    return fallback


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / metrics.FILE_NAME
    return metrics.read(path) if path.exists() or path.is_symlink() else []


def _check_checkpoint(path: Path) -> None:
    """A checkpoint generate and export can load: its files whole, and its state.json readable."""
    try:
        ckpt.verify_checkpoint(path, for_resume=False)
    except (KeyError, TypeError, IndexError, AttributeError):  # a safetensors header of the wrong shape
        raise FinetuneError(f"checkpoint {path} has a damaged weights file; use another checkpoint") from None
    TrainingState.read_optional(str(path))


def _steps_done(records: list[dict], checkpoints: list[Path], status: Optional[run_status.RunStatus]) -> Optional[int]:
    """The furthest step metrics.jsonl, a checkpoint or status.json records."""
    steps = [r["step"] for r in records if _is_int(r.get("step"))]
    steps += [int(ckpt.CHECKPOINT_RE.match(p.name).group(1)) for p in checkpoints]
    steps += [status.step] if status is not None else []
    return max(steps) if steps else None


def _planned_steps(config: Optional[dict]) -> Optional[int]:
    """A run without status.json: its --steps, or the default when neither --steps nor --epochs was set."""
    steps, epochs = _get(config, "train", "steps"), _get(config, "train", "epochs")
    if _is_int(steps):
        return steps
    return DEFAULT_STEPS if config is not None and epochs is None else None


def _set_status(summary: RunSummary, status: Optional[run_status.RunStatus], holder: Optional[int]) -> None:
    """The lock says whether a process trains the run now; status.json says how it ended otherwise."""
    if status is not None:
        summary.started, summary.ended = status.started, status.ended
    if holder is not None:
        summary.status, summary.pid = run_status.RUNNING, holder if holder > 0 else None
    elif status is None:
        done, planned = summary.steps_done, summary.steps_planned
        reached = done is not None and planned is not None and done >= planned and summary.last_checkpoint
        summary.status = run_status.FINISHED if reached else INCOMPLETE
    elif status.status == run_status.RUNNING:
        summary.status = KILLED
    else:
        summary.status, summary.signal, summary.error = status.status, status.signal, status.error


def _get(config: Optional[dict], section: str, key: str) -> Any:
    return (config or {}).get(section, {}).get(key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Showing
# ---------------------------------------------------------------------------------------------

COLUMNS = ("run", "model", "steps", "status", "best val ppl", "last val ppl", "last checkpoint", "size")
MAX_MODEL_WIDTH = 28


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def status_words(summary: RunSummary) -> str:
    """The status column: 'finished', 'stopped (SIGINT)', 'running (pid 4242)', 'failed', 'killed'..."""
    if summary.status == run_status.STOPPED and summary.signal:
        return f"stopped ({summary.signal})"
    if summary.status == run_status.RUNNING and summary.pid:
        return f"running (pid {summary.pid})"
    return summary.status or "unknown"


def _steps_words(summary: RunSummary) -> str:
    done = "?" if summary.steps_done is None else str(summary.steps_done)
    planned = "?" if summary.steps_planned is None else str(summary.steps_planned)
    return f"{done}/{planned}"


def _perplexity(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _short_model(model: Optional[str]) -> str:
    """A model name, or the end of a long local path."""
    if model is None:
        return "?"
    return model if len(model) <= MAX_MODEL_WIDTH else "..." + model[-(MAX_MODEL_WIDTH - 3) :]


def table(listing: Listing) -> str:
    """The runs as an aligned table; a run with problems is marked `!` and its problems follow the table."""
    if not listing.runs:
        strays = f" (only directories that are not runs: {', '.join(listing.not_runs)})" if listing.not_runs else ""
        return f"no runs in {listing.runs_dir}/ yet{strays}; {START_HINT}"
    rows = [COLUMNS]
    for run in listing.runs:
        v = run.validation
        rows.append(
            (
                run.name + (" !" if run.problems else ""),
                _short_model(run.model),
                _steps_words(run),
                status_words(run),
                "-" if v.best is None else f"{v.best:.2f} (step {v.best_step})",
                _perplexity(v.last),
                run.last_checkpoint or "-",
                human_size(run.size_bytes),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    for run in listing.runs:
        lines += [f"! {run.name}: {problem}" for problem in run.problems]
    if listing.not_runs:
        lines.append(f"not runs (no config.yaml, metrics or checkpoints), ignored: {', '.join(listing.not_runs)}")
    lines.append("`finetune runs NAME` shows one run in detail")
    return "\n".join(lines)


def detail_text(detail: RunDetail) -> str:
    """`finetune runs NAME` as text: a few labelled lines, then the settings, checkpoints and samples."""
    s, v = detail.summary, detail.summary.validation
    fields = [("status", _status_sentence(s))]
    if s.started:
        fields.append(("started", _when(s.started) + (f", ended {_when(s.ended)}" if s.ended else "")))
    fields.append(("model", s.model or "?"))
    fields.append(("command", detail.command or "? (no readable checkpoint records it)"))
    if v.count:
        fields.append(
            (
                "validation",
                f"perplexity {v.first:.2f} at step {v.first_step}, best {v.best:.2f} at step {v.best_step}, "
                f"last {v.last:.2f} at step {v.last_step} ({v.count} evaluations)",
            )
        )
    else:
        fields.append(("validation", "none recorded"))
    fields.append(("size", human_size(s.size_bytes)))
    fields += [("problem", problem) for problem in s.problems]
    lines = [f"run '{s.name}' in {s.path}"] + [f"{label:<11} {text}" for label, text in fields]
    for section in (
        _settings_lines(detail.config, s.path),
        _checkpoint_lines(detail.checkpoints, s.problems),
        _samples_lines(detail.samples),
    ):
        lines += ["", *section]
    return "\n".join(lines)


def _when(iso: str) -> str:
    """status.json's 2026-11-28T09:30:05Z as 2026-11-28 09:30:05 UTC."""
    return iso.replace("T", " ").replace("Z", " UTC")


def _status_sentence(s: RunSummary) -> str:
    at = f"step {s.steps_done if s.steps_done is not None else '?'} of {s.steps_planned or '?'}"
    again = "run the same `finetune train` command again to continue"
    sentences = {
        run_status.FINISHED: f"finished at {at}",
        run_status.STOPPED: f"stopped by {s.signal or 'a signal'} at {at}; {again}",
        run_status.FAILED: f"failed at {at}: {s.error or 'no error recorded'}",
        run_status.RUNNING: f"running{f' (pid {s.pid})' if s.pid else ''}, at {at}",
        KILLED: f"ended at about {at} without recording how (killed, out of memory, or the machine stopped); {again}",
        INCOMPLETE: f"not finished ({at}; written before finetune recorded how runs end)",
    }
    return sentences.get(s.status or "", "unknown")


def _settings_lines(config: Optional[dict], path: str) -> list[str]:
    """The settings that differ from the defaults (config.yaml holds them all)."""
    if config is None:
        return ["settings: ? (no readable config.yaml)"]
    defaults = RunConfig().to_dict()
    changed = [
        (f"{section}.{key}", value)
        for section, values in config.items()
        for key, value in values.items()
        if defaults.get(section, {}).get(key, object()) != value
    ]
    width = max((len(name) for name, _ in changed), default=0)
    return [f"settings not at their default (all of them are in {path}/config.yaml):"] + [
        f"  {name.ljust(width)}  {value}" for name, value in changed
    ]


def _checkpoint_lines(checkpoints: list[CheckpointInfo], problems: list[str]) -> list[str]:
    if not checkpoints:
        return ["checkpoints: none yet (one is saved every --save-every steps and at the end)"]
    sizes = [human_size(info.size_bytes) for info in checkpoints]
    steps = [f"step {info.step}" for info in checkpoints]
    size_width, step_width = max(map(len, sizes)), max(map(len, steps))
    lines = ["checkpoints:"]
    for info, size, step in zip(checkpoints, sizes, steps):
        problem = "the problem above" if info.problem in problems else info.problem
        notes = ("  latest" if info.latest else "") + (f"  unreadable: {problem}" if info.problem else "")
        lines.append(f"  {info.name}  {step.ljust(step_width)}  {size.rjust(size_width)}{notes}")
    return lines


def _samples_lines(samples: list[str], shown: int = 5) -> list[str]:
    if not samples:
        return ["samples: none (written every --sample-every steps)"]
    more = f" (the last {shown} of {len(samples)})" if len(samples) > shown else ""
    return [f"samples{more}:"] + [f"  {path}" for path in samples[-shown:]]


def to_json(value: Any) -> dict:
    """A Listing or RunDetail as plain JSON values (`--json`)."""
    return dataclasses.asdict(value)
