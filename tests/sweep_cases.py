"""The corruption sweep of issue 12: every file of a real run, export and prepared dataset, broken in turn.

For each tree a command reads, each file (found by walking the tree, so new files are covered
without editing this module) is damaged in each way in FAULTS, and the command is run on the damaged
copy. The rule every case checks:

  * a command that needs the damaged file exits 2 with exactly one stderr line, "error: ...",
    naming that file, with no traceback and no "unexpected" (the last-resort handler);
  * a command that does not need it succeeds, and its result equals the result on the intact tree;
  * either way, nothing on disk changes (sha256 of every file) beyond the new output a successful
    command is meant to write.

Which files each command needs is written down below as data (COMMANDS, RULES, OVERRIDES), so a
reader can check the rule and a new command or file gets a rule in one line. tests/test_sweep.py
runs the cases under pytest; tests/sweep_report.py runs them all and prints the failures by cause.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from conftest import SAMPLE, run_cli

# ---------------------------------------------------------------------------------------------
# The trees, built once: where each lives inside a case directory, and how it is made
# ---------------------------------------------------------------------------------------------

RUN_NAME = "r"
TREE_HOME = {  # tree -> its path inside every case directory (each case holds a copy of one tree)
    "run": f"runs/{RUN_NAME}",
    "export-safetensors": "export-safetensors",
    "export-onnx": "export-onnx",
    "prepared": "prepared",
}
LATEST = "checkpoint-000004"  # the run's latest checkpoint after TRAIN_STEPS
TRAIN_STEPS = 4
RESUME_STEPS = 6
# Small batches and blocks keep each step cheap; every kind of file a run holds is still written
# (two checkpoints, metrics with validation, samples).
TRAIN_FLAGS = [
    "--model",
    "tiny",
    "--save-every",
    2,
    "--eval-every",
    2,
    "--sample-every",
    2,
    "--log-every",
    1,
    "--batch-size",
    4,
    "--block-size",
    64,
]


def build_trees(root: Path) -> dict[str, Path]:
    """A 4-step tiny run with two checkpoints, its safetensors and ONNX exports, a prepared dataset."""
    root.mkdir(parents=True, exist_ok=True)
    run_cli("train", SAMPLE, *TRAIN_FLAGS, "--steps", TRAIN_STEPS, "--runs-dir", root / "runs", "--run-name", RUN_NAME)
    checkpoint = root / TREE_HOME["run"] / LATEST
    run_cli(
        "export",
        "--checkpoint",
        checkpoint,
        "--format",
        "safetensors",
        "--no-verify",
        "--output",
        root / TREE_HOME["export-safetensors"],
    )
    run_cli(
        "export",
        "--checkpoint",
        checkpoint,
        "--format",
        "onnx",
        "--no-verify",
        "--output",
        root / TREE_HOME["export-onnx"],
    )
    run_cli("prepare", SAMPLE, "--model", "tiny", "--output", root / TREE_HOME["prepared"])
    return {tree: root / home for tree, home in TREE_HOME.items()}


# ---------------------------------------------------------------------------------------------
# What each command reads: the rule for every (command, file, fault)
# ---------------------------------------------------------------------------------------------

ERROR, OK, EITHER = "error", "ok", "either"  # EITHER: exit 2 naming the file, or success with the intact result

# Roles: how a command uses a file, and so what each fault must give (RULES below).
NEEDED = "needed"  # read, and the command cannot work without it
OPTIONAL = "optional"  # read when present; its absence is normal, bad contents are an error
UNUSED = "unused"  # never read: any damage is harmless
REWRITTEN = "rewritten"  # written again without being read (a resumed run's config.yaml)
LOG = "log"  # an append-only log: a torn last line, or none at all, is normal after a crash

# "json-value" is any other wrong JSON (an object lacking a needed key, a number...): hypothesis draws it.
CONTENT_FAULTS = ("truncate", "empty", "random", "json-list", "json-string", "json-keys", "json-value")
RULES = {
    NEEDED: {fault: ERROR for fault in (*CONTENT_FAULTS, "missing", "dir-for-file")},
    OPTIONAL: {**{fault: ERROR for fault in CONTENT_FAULTS}, "missing": OK, "dir-for-file": ERROR},
    UNUSED: {fault: OK for fault in (*CONTENT_FAULTS, "missing", "dir-for-file")},
    REWRITTEN: {**{fault: OK for fault in CONTENT_FAULTS}, "missing": OK, "dir-for-file": ERROR},
    LOG: {
        **{fault: ERROR for fault in CONTENT_FAULTS},
        "truncate": OK,
        "empty": OK,
        "missing": OK,
        "dir-for-file": ERROR,
    },
}


@dataclass(frozen=True)
class Command:
    """A command that reads one tree: its arguments, the files it needs, and what it may write."""

    tree: str
    argv: Callable[[Path], list]  # case directory -> `finetune ...` arguments
    reads: tuple[tuple[str, str], ...]  # (glob on the path inside the tree, role); first match wins; else UNUSED
    writes_into: tuple[str, ...] = ()  # directories of the tree it adds files to (a file in their place is an error)
    outputs: tuple[str, ...] = ()  # globs (inside the case directory) a successful run may create or change
    result: Callable[[Path, object], object] = lambda case, result: result.stdout  # compared with the intact tree's


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files_digest(*names: str) -> Callable[[Path, object], dict]:
    return lambda case, result: {name: _sha(case / name) if (case / name).is_file() else None for name in names}


def _checkpoint_reads(checkpoint: str, resume: bool) -> tuple[tuple[str, str], ...]:
    """A checkpoint's files: the weights, config and tokenizer always; the training state only to resume."""
    state = NEEDED if resume else UNUSED
    return (
        (f"{checkpoint}/config.json", NEEDED),
        (f"{checkpoint}/model.safetensors", NEEDED),
        (f"{checkpoint}/tokenizer.json", NEEDED),
        (f"{checkpoint}/tokenizer_config.json", NEEDED),  # the end-of-text token: without it samples never stop
        (f"{checkpoint}/generation_config.json", OPTIONAL),  # transformers makes one from config.json
        # generate and export read state.json for the chat flag and the model card; absent is fine
        (f"{checkpoint}/training_state/state.json", NEEDED if resume else OPTIONAL),
        (f"{checkpoint}/training_state/*", state),
    )


def _generate(*source) -> Callable[[Path], list]:
    """`finetune generate` from `source` (a Path is taken inside the case directory), short and seeded."""
    return lambda case: [
        "generate",
        *[case / s if isinstance(s, Path) else s for s in source],
        "--max-new-tokens",
        4,
        "--seed",
        1,
        "--prompt",
        "Title:",
    ]


RUN = Path(TREE_HOME["run"])
COMMANDS = {
    "generate-checkpoint": Command(
        tree="run",
        argv=_generate("--checkpoint", RUN / LATEST),
        reads=_checkpoint_reads(LATEST, resume=False),
    ),
    "generate-run": Command(
        tree="run",
        argv=_generate("--run", RUN_NAME, "--runs-dir", Path("runs")),
        # the `latest` pointer; without it, the newest complete checkpoint (which is the same one)
        reads=(("latest", OPTIONAL), *_checkpoint_reads(LATEST, resume=False)),
    ),
    "export-checkpoint": Command(
        tree="run",
        argv=lambda case: ["export", "--checkpoint", case / RUN / LATEST, "--output", case / "out", "--no-verify"],
        # config.yaml feeds the model card only when state.json has no config; here it has one
        reads=_checkpoint_reads(LATEST, resume=False),
        outputs=("out", "out/**"),
        result=_files_digest("out/model.safetensors", "out/config.json", "out/tokenizer.json"),
    ),
    "resume": Command(
        tree="run",
        argv=lambda case: [
            "train",
            SAMPLE,
            *TRAIN_FLAGS,
            "--steps",
            RESUME_STEPS,
            "--runs-dir",
            case / "runs",
            "--run-name",
            RUN_NAME,
        ],
        reads=(
            ("latest", OPTIONAL),
            ("metrics.jsonl", LOG),
            ("config.yaml", REWRITTEN),
            *_checkpoint_reads(LATEST, resume=True),
        ),
        writes_into=("samples",),
        outputs=(
            f"{RUN}/checkpoint-{RESUME_STEPS:06d}",
            f"{RUN}/checkpoint-{RESUME_STEPS:06d}/**",
            f"{RUN}/latest",
            f"{RUN}/metrics.jsonl",
            f"{RUN}/loss.png",  # redrawn from metrics.jsonl at the end
            f"{RUN}/status.json",  # running, then finished (run_status.py)
            f"{RUN}/config.yaml",
            f"{RUN}/samples/samples-{RESUME_STEPS:06d}.txt",
        ),
        result=_files_digest(f"{RUN}/checkpoint-{RESUME_STEPS:06d}/model.safetensors"),
    ),
    "generate-model": Command(  # a safetensors export is a plain Hugging Face model directory
        tree="export-safetensors",
        argv=_generate("--model", Path(TREE_HOME["export-safetensors"])),
        reads=(
            ("config.json", NEEDED),
            ("model.safetensors", NEEDED),
            ("tokenizer.json", NEEDED),
            ("tokenizer_config.json", NEEDED),
            ("generation_config.json", OPTIONAL),
        ),
    ),
    "generate-onnx": Command(  # ONNX Runtime, numpy and tokenizers only: no config or tokenizer_config
        tree="export-onnx",
        argv=_generate("--onnx", Path(TREE_HOME["export-onnx"])),
        reads=(("finetune_onnx.json", NEEDED), ("model.onnx", NEEDED), ("tokenizer.json", NEEDED)),
    ),
    "train-prepared": Command(
        tree="prepared",
        argv=lambda case: [
            "train",
            case / TREE_HOME["prepared"],
            "--model",
            "tiny",
            "--steps",
            1,
            "--runs-dir",
            case / "runs-p",
            "--run-name",
            "p",
            "--sample-every",
            0,
            "--save-every",
            0,
        ],
        reads=(("*", NEEDED),),  # tokens, block indices, manifest, metadata, tokenizer: all of it
        outputs=("runs-p", "runs-p/**"),
        result=_files_digest("runs-p/p/checkpoint-000001/model.safetensors"),
    ),
}

# Cases the roles do not decide alone, each with its reason.
OVERRIDES = {
    # generate and export read only optional fields of state.json (the chat flag, model-card facts):
    # a state.json without the training counters may be refused, or ignored.
    ("generate-checkpoint", f"{LATEST}/training_state/state.json", "json-keys"): EITHER,
    ("generate-run", f"{LATEST}/training_state/state.json", "json-keys"): EITHER,
    ("export-checkpoint", f"{LATEST}/training_state/state.json", "json-keys"): EITHER,
}

# Keys a reader of the file needs; the json-keys fault writes the file's object without them.
# A JSON file not listed here has no key that every reader needs, so json-keys does not apply.
REQUIRED_KEYS = {
    "config.json": ("model_type",),
    "state.json": ("step", "tokens_seen", "epoch", "batches_in_epoch", "config", "data_key"),
    "finetune_onnx.json": ("file", "dtype", "inputs", "eos_token_id", "pad_token_id"),
    "finetune_prepared.json": ("model", "tokenizer", "block_size"),
    "meta.json": ("block_size", "num_tokens", "num_documents", "dtype", "key"),
}


def role_of(command: Command, relative: str) -> str:
    for pattern, role in command.reads:
        if fnmatch.fnmatchcase(relative, pattern):
            return role
    return UNUSED


def expected(command_name: str, tree_root: Path, relative: str, fault: str) -> str:
    """ERROR, OK or EITHER for this command on this tree with `relative` damaged by `fault`."""
    command = COMMANDS[command_name]
    override = OVERRIDES.get((command_name, relative, fault))
    if override:
        return override
    if fault == "file-for-dir":  # the directory's files are all gone: an error if any is needed, or it is written to
        if relative in command.writes_into:
            return ERROR
        inside = [p.relative_to(tree_root).as_posix() for p in (tree_root / relative).rglob("*") if p.is_file()]
        return ERROR if any(RULES[role_of(command, f)]["missing"] == ERROR for f in inside) else OK
    return RULES[role_of(command, relative)][fault]


# ---------------------------------------------------------------------------------------------
# The faults
# ---------------------------------------------------------------------------------------------


def _random_bytes(path: Path, relative: str) -> None:
    """Same length, seeded by the name; never valid UTF-8 or JSON, with a line break early on so a text
    file's garbage is not mistaken for one torn last line."""
    size = path.stat().st_size
    data = bytearray(random.Random(relative).randbytes(size))
    if size:
        data[0] = 0xFF
    if size > 3:
        data[size // 3] = ord("\n")
    path.write_bytes(bytes(data))


def _json_value(path: Path, value) -> None:
    text = json.dumps(value)
    path.write_text(text + "\n" if path.suffix == ".jsonl" else text)


def _without_required_keys(path: Path) -> None:
    value = json.loads(path.read_text())
    for key in REQUIRED_KEYS[path.name]:
        value.pop(key, None)
    _json_value(path, value)


def _dir_for_file(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _file_for_dir(path: Path) -> None:
    shutil.rmtree(path)
    path.write_text("not a directory\n")


FAULTS: dict[str, Callable[[Path, str], None]] = {
    "truncate": lambda path, rel: os.truncate(path, path.stat().st_size // 2),
    "empty": lambda path, rel: os.truncate(path, 0),
    "random": _random_bytes,
    "json-list": lambda path, rel: _json_value(path, [1, 2, 3]),
    "json-string": lambda path, rel: _json_value(path, "not an object"),
    "json-keys": lambda path, rel: _without_required_keys(path),
    "missing": lambda path, rel: path.unlink(),
    "dir-for-file": lambda path, rel: _dir_for_file(path),
    "file-for-dir": lambda path, rel: _file_for_dir(path),
}


def faults_for(path: Path) -> list[str]:
    """The faults that apply to a file or directory of a tree."""
    if path.is_dir():
        return ["file-for-dir"]
    names = ["truncate", "empty", "random", "missing", "dir-for-file"]
    if path.suffix in (".json", ".jsonl"):
        names += ["json-list", "json-string"]
        if path.name in REQUIRED_KEYS:
            names.append("json-keys")
    return names


# ---------------------------------------------------------------------------------------------
# Cases: enumerate, run, judge
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    command: str
    relative: str  # inside the tree
    fault: str

    @property
    def id(self) -> str:
        return f"{self.command}:{self.relative}:{self.fault}"


def entries(tree_root: Path) -> list[str]:
    """Every file and directory of a tree (the root excepted), by walking it."""
    return sorted(p.relative_to(tree_root).as_posix() for p in tree_root.rglob("*"))


def all_cases(trees: dict[str, Path], commands: Optional[list[str]] = None) -> Iterator[Case]:
    for name in commands or COMMANDS:
        root = trees[COMMANDS[name].tree]
        for relative in entries(root):
            for fault in faults_for(root / relative):
                yield Case(name, relative, fault)


Snapshot = dict[str, tuple]


def snapshot(root: Path) -> Snapshot:
    """Every path under `root` with its kind and, for files, the sha256 of its contents."""
    found: Snapshot = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[relative] = ("link", os.readlink(path))
        elif path.is_dir():
            found[relative] = ("dir",)
        elif path.is_file():
            found[relative] = ("file", _sha(path))
        else:
            found[relative] = ("other",)
    return found


def disk_changes(before: Snapshot, after: Snapshot, allowed: tuple[str, ...]) -> list[str]:
    """Paths added, removed or changed, except those matching the allowed globs."""
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    return [p for p in changed if not any(fnmatch.fnmatchcase(p, pattern) for pattern in allowed)]


# Causes of failure, as the report groups them.
TRACEBACK = "traceback/unexpected"
SILENT = "exit 0 silently wrong"
WRONG_NAME = "wrong file named"
DISK = "disk changed"
MULTILINE = "multi-line"
REFUSED = "refused a file it does not need"
OTHER_EXIT = "other exit code"
CAUSES = (TRACEBACK, SILENT, WRONG_NAME, DISK, MULTILINE, REFUSED, OTHER_EXIT)


@dataclass
class Outcome:
    case: Case
    expected: str
    exit_code: int
    stderr: str
    problems: list[tuple[str, str]] = field(default_factory=list)  # (cause, detail)

    @property
    def passed(self) -> bool:
        return not self.problems


class Sweep:
    """The built trees, their snapshots, and each command's result on the intact tree (computed once)."""

    def __init__(self, trees: dict[str, Path], workdir: Path):
        self.trees = trees
        self.workdir = workdir
        self.snapshots = {name: snapshot(root) for name, root in trees.items()}
        self._baselines: dict[str, object] = {}
        self._count = 0

    def _case_dir(self, tree: str) -> tuple[Path, Path]:
        """A fresh case directory holding a copy of `tree` at its home; (case dir, tree root)."""
        self._count += 1
        case = self.workdir / f"case-{self._count}"
        root = case / TREE_HOME[tree]
        shutil.copytree(self.trees[tree], root, symlinks=True)
        return case, root

    def _invoke(self, command: Command, case: Path):
        """Run the command from inside the case directory, so a stray relative write shows up in its snapshot."""
        previous = os.getcwd()
        os.chdir(case)
        try:
            return run_cli(*command.argv(case), expect=None)
        finally:
            os.chdir(previous)

    def baseline(self, name: str):
        """The command's result on the intact tree; it must succeed there, or the sweep means nothing."""
        if name not in self._baselines:
            command = COMMANDS[name]
            case, _ = self._case_dir(command.tree)
            try:
                result = self._invoke(command, case)
                if result.exit_code != 0:
                    raise AssertionError(f"{name} fails on the intact {command.tree} tree:\n{result.output}")
                self._baselines[name] = command.result(case, result)
            finally:
                shutil.rmtree(case, ignore_errors=True)
        return self._baselines[name]

    def run(self, case: Case, damage: Optional[Callable[[Path], None]] = None) -> Outcome:
        """Copy the tree, damage one entry (with FAULTS[case.fault], or `damage`), run the command, judge it."""
        command = COMMANDS[case.command]
        home = TREE_HOME[command.tree]
        case_dir, root = self._case_dir(command.tree)
        try:
            want = expected(case.command, root, case.relative, case.fault)
            before = {
                parent.as_posix(): ("dir",) for parent in (Path(home), *Path(home).parents) if parent != Path(".")
            }
            before.update({f"{home}/{p}": v for p, v in self.snapshots[command.tree].items()})
            target = root / case.relative
            for stale in [
                p for p in before if p == f"{home}/{case.relative}" or p.startswith(f"{home}/{case.relative}/")
            ]:
                del before[stale]
            damage(target) if damage else FAULTS[case.fault](target, case.relative)
            if target.exists():
                before[f"{home}/{case.relative}"] = ("dir",) if target.is_dir() else ("file", _sha(target))
            result = self._invoke(command, case_dir)
            outcome = Outcome(case, want, result.exit_code, result.stderr)
            self._judge(outcome, command, result, case_dir, target)
            allowed = command.outputs if result.exit_code == 0 else ()
            changes = disk_changes(before, snapshot(case_dir), allowed)
            if changes:
                outcome.problems.append((DISK, ", ".join(changes[:5]) + (" ..." if len(changes) > 5 else "")))
            return outcome
        finally:
            shutil.rmtree(case_dir, ignore_errors=True)

    def _judge(self, outcome: Outcome, command: Command, result, case_dir: Path, target: Path) -> None:
        problems = outcome.problems
        text = result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        first_error = next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "")
        if (
            "Traceback" in text
            or "unexpected" in text
            or result.exit_code == 1
            or (result.exception is not None and not isinstance(result.exception, SystemExit))
        ):
            problems.append((TRACEBACK, first_error[:300]))
            return
        if result.exit_code == 0:
            if outcome.expected == ERROR:
                problems.append((SILENT, f"exit 0 although the command reads {target.name}"))
            elif command.result(case_dir, result) != self.baseline(outcome.case.command):
                problems.append((SILENT, "exit 0 with a result different from the intact tree's"))
            return
        if result.exit_code != 2:
            problems.append((OTHER_EXIT, f"exit {result.exit_code}: {first_error[:300]}"))
            return
        if outcome.expected == OK:
            problems.append((REFUSED, first_error[:300]))
            return
        if len(lines) != 1 or not lines[0].startswith("error:"):
            problems.append((MULTILINE, f"{len(lines)} stderr lines: " + " | ".join(line[:120] for line in lines[-3:])))
        if not names(first_error, target):
            problems.append((WRONG_NAME, first_error[:300]))


def names(line: str, target: Path) -> bool:
    """Whether an error line names the damaged file or directory: its name, and the directory holding it
    (so "config.json" in a generic hint about some other file does not count)."""
    return target.name in line and target.parent.name in line


def group(outcomes: list[Outcome]) -> dict[str, list[Outcome]]:
    """Failing outcomes by cause (an outcome with several causes appears under each)."""
    groups: dict[str, list[Outcome]] = {cause: [] for cause in CAUSES}
    for outcome in outcomes:
        for cause in dict.fromkeys(cause for cause, _ in outcome.problems):
            groups[cause].append(outcome)
    return groups


def describe(outcome: Outcome) -> str:
    details = "; ".join(f"{cause}: {detail}" for cause, detail in outcome.problems)
    return f"{outcome.case.id} (expected {outcome.expected}, exit {outcome.exit_code}) -> {details}"
