"""The run directory: checkpoints written atomically, the `latest` pointer, keep-last-K.

    runs/<name>/
      config.yaml  metrics.jsonl  samples/  latest
      checkpoint-000200/   config.json model.safetensors tokenizer files generation_config.json
                           training_state/ (state.json, optimizer.pt, scheduler.pt, rng.pt)

A checkpoint is written into `.tmp-checkpoint-NNNNNN`, its files are fsynced, then the directory
is renamed into place; `latest` is replaced (also via rename) only after that. A crash at any
moment therefore leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from finetune.errors import FinetuneError
from finetune.files import fix_modes, fsync_dir, fsync_tree, read_json, write_atomic, write_problem, writing

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{6,})$")
TMP_PREFIX = ".tmp-"
STATE_DIR = "training_state"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path, strict: bool = True) -> Optional[Path]:
    """The checkpoint named by `latest`, or the newest complete one if the pointer is missing.

    `latest` is only ever replaced whole (write_atomic), so one that names no checkpoint of this run
    was damaged or edited: `strict` refuses it rather than silently sampling or resuming from
    another checkpoint than the user expects.
    """
    from finetune import files

    pointer = run_dir / "latest"
    checkpoints = list_checkpoints(run_dir)
    newest = checkpoints[-1] if checkpoints else None
    if not pointer.exists() and not pointer.is_symlink():
        return newest
    fix = (
        f"delete it to use the newest checkpoint ({newest.name})" if newest else "delete it"
    ) + ", or pass --checkpoint DIR"
    try:
        name = files.read_text(pointer, "run file", fix).strip()
    except FinetuneError:
        if strict:
            raise
        return newest
    candidate = run_dir / name
    if CHECKPOINT_RE.match(name) and candidate.is_dir():
        return candidate
    if strict:
        shown = name if len(name) <= 40 and name.isprintable() else name[:40].encode("unicode_escape").decode() + "..."
        raise FinetuneError(
            f"run file {pointer} names {shown!r}, which is not a checkpoint directory of this run; {fix}"
        )
    return newest


def remove_leftovers(run_dir: Path) -> None:
    """Delete partial saves left by a crash (they were never named by `latest`)."""
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text, "run file")


def refuse_training_output(
    output: Path,
    source: Optional[Path] = None,
    run_dir: Optional[Path] = None,
    runs_dir: Optional[Path] = None,
    writer: str = "an export",
) -> None:
    """An output (export, prepared data) never goes over, into or around a checkpoint, a run or the runs directory.

    --overwrite deletes the output directory first: pointed at a checkpoint, it would delete the
    weights and training state being exported; inside one, pruning old checkpoints deletes it.
    """
    out = output.resolve()
    guarded = [("checkpoint", source.resolve())] if source is not None else []
    if run_dir is not None:
        guarded.append(("run directory", run_dir.resolve()))
    if runs_dir is not None and runs_dir.is_dir():
        guarded.append(("runs directory", runs_dir.resolve()))
    for parent in (out, *out.parents):  # any other run or checkpoint the output would sit in
        if is_checkpoint_dir(parent):
            guarded.append(("checkpoint", parent))
        elif is_run_dir(parent):
            guarded.append(("run directory", parent))
    inside = _training_dir_inside(out)
    if inside is not None:
        guarded.append(("checkpoint" if is_checkpoint_dir(inside) else "run directory", inside))
    for kind, path in guarded:
        relation = (
            "is"
            if out == path
            else "lies inside"
            if path in out.parents
            else "contains"
            if out in path.parents
            else None
        )
        if relation:
            raise FinetuneError(
                f"--output {output} {relation} the {kind} {path}, which {writer} must not write over; "
                f"choose an output outside your runs, e.g. --output exports/NAME"
            )


def _training_dir_inside(root: Path, depth: int = 3) -> Optional[Path]:
    """A checkpoint or run directory within `depth` levels under `root` (which --overwrite would delete)."""
    import os

    if not root.is_dir():
        return None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if STATE_DIR in dirnames or ("config.yaml" in filenames and is_run_dir(here)):
            return here
        if len(here.relative_to(root).parts) >= depth:
            dirnames[:] = []
    return None


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------


def start_output_dir(output: Path, overwrite: bool = False, offer_overwrite: bool = True) -> Path:
    """A fresh temporary directory beside `output` (renamed into place by finish_output_dir).

    An existing non-empty `output` is never touched unless `overwrite`; until the rename, a crash
    leaves only the temporary directory behind.
    """
    if output.exists() and not output.is_dir():  # a user's file: --overwrite must not replace it with a directory
        raise FinetuneError(f"--output {output} is a file, not a directory; choose a directory path for --output")
    occupied = output.is_dir() and any(output.iterdir())
    if occupied and not overwrite:
        hint = " or pass --overwrite" if offer_overwrite else ""
        raise FinetuneError(f"output directory {output} already exists and is not empty; choose another --output{hint}")
    tmp = output.with_name(f"{TMP_PREFIX}{output.name}")
    with writing(output, "output directory"):
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    return tmp


def finish_output_dir(tmp: Path, output: Path) -> None:
    """Move a finished `tmp` into place; a replaced `output` is kept aside until the move succeeded."""
    fix_modes(tmp)  # safetensors writes through a private (0600) temp file: a server user could not read it
    old = output.with_name(f"{TMP_PREFIX}old-{output.name}")
    with writing(output, "output directory"):
        shutil.rmtree(old, ignore_errors=True)
        if output.exists():
            os.replace(output, old)
        try:
            os.replace(tmp, output)
        except BaseException:
            if old.exists():
                os.replace(old, output)
            raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def is_run_dir(path: Path) -> bool:
    """A run directory: config.yaml with checkpoints, a `latest` pointer or metrics beside it."""
    return (path / "config.yaml").is_file() and (
        (path / "latest").is_file() or (path / "metrics.jsonl").is_file() or bool(list_checkpoints(path))
    )


def is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint: it holds training_state/, or is a checkpoint-NNNNNN directory of a run."""
    return (path / STATE_DIR).is_dir() or (CHECKPOINT_RE.match(path.name) is not None and is_run_dir(path.parent))


def is_runs_root(path: Path) -> bool:
    """A directory holding runs (`runs/`)."""
    try:
        return path.is_dir() and any(is_run_dir(child) for child in path.iterdir() if child.is_dir())
    except OSError:
        return False


def misplaced_run_dir(path: Path) -> Optional[str]:
    """Why `path`, passed where a model or checkpoint directory is expected, is a run or runs directory."""
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        if is_run_dir(path):
            latest = latest_checkpoint(path, strict=False)
            inside = f", or --checkpoint {latest} for its latest checkpoint" if latest else ""
            return (
                f"{path} is a run directory, not a model or checkpoint; pass --run {path.name} "
                f"--runs-dir {path.parent}{inside}"
            )
        if is_runs_root(path):
            return f"{path} holds runs, it is not a model or checkpoint; pass --runs-dir {path} --run NAME"
    return None


def save_checkpoint(run_dir: Path, step: int, write_contents, keep: int) -> Path:
    """Write a checkpoint atomically; `write_contents(tmp_dir)` fills the directory.

    Disk-full and permission errors become a FinetuneError; the previous checkpoint stays intact.
    """
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f"{TMP_PREFIX}{final.name}"
    if final.is_dir():
        # Renamed directories are complete, and a step's weights never change, so an existing
        # checkpoint of this step (a resumed run stopped before training on) is already right.
        write_text_atomic(run_dir / "latest", final.name + "\n")
        return final
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pause_point("tmp-created", step)
        write_contents(tmp)
        fsync_tree(tmp)
        pause_point("fsynced", step)
        fix_modes(tmp)  # safetensors writes model.safetensors through a private (0600) temp file
        os.replace(tmp, final)
        fsync_dir(run_dir)
        pause_point("renamed", step)
        write_text_atomic(run_dir / "latest", final.name + "\n")
        pause_point("latest-written", step)
    except Exception as exc:
        problem = exc if isinstance(exc, FinetuneError) else write_problem(exc, tmp)
        if problem is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir, strict=False)
        kept = f"; the previous checkpoint {previous.name} is intact" if previous else ""
        cause = problem if isinstance(problem, FinetuneError) else (problem.strerror or problem)
        raise FinetuneError(
            f"could not write checkpoint {final.name} in {run_dir}: {cause}{kept}; "
            f"free disk space or make the run directory writable"
        ) from None
    prune_checkpoints(run_dir, keep)
    pause_point("pruned", step)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; never delete the one `latest` names."""
    latest = latest_checkpoint(run_dir, strict=False)
    checkpoints = list_checkpoints(run_dir)
    for path in checkpoints[: max(0, len(checkpoints) - keep)]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)


def pause_point(stage: str, step: int) -> None:
    """Test hook: with FINETUNE_TEST_PAUSE_AT=<stage>@<step>, stop here so a test can kill the process.

    It lets the crash-safety tests choose the exact moment of a SIGKILL during a save.
    """
    wanted = os.environ.get("FINETUNE_TEST_PAUSE_AT")
    if wanted and wanted == f"{stage}@{step}":
        print(f"PAUSED {wanted}", flush=True)
        time.sleep(3600)


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why a safetensors file is unusable (truncated, bad header), or None if it is whole.

    The format is an 8-byte header length, a JSON header with each tensor's byte range, then the
    data; a file shorter than the furthest range was cut off (a crash, a full disk, a bad copy).
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or header_len <= 0 or 8 + header_len > size:
                return f"its header is cut off ({size} bytes)"
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:
        return f"its header is unreadable ({exc})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + end
    if size != expected:
        return f"it has {size:,} bytes where its header promises {expected:,} (truncated)"
    return None


def verify_checkpoint(checkpoint: Path, for_resume: bool) -> None:
    """Fail with the name of the bad file when a checkpoint is incomplete or corrupt."""
    hint = (
        f"; resume from an earlier checkpoint with --resume {checkpoint.parent}/checkpoint-NNNNNN"
        if for_resume
        else "; use another checkpoint (--checkpoint DIR)"
    )
    config = checkpoint / "config.json"
    if not config.is_file():
        config = checkpoint / "adapter_config.json"  # a LoRA checkpoint: the adapter, not the base model
    if not config.is_file():
        problem = misplaced_run_dir(checkpoint)
        raise FinetuneError(problem or f"checkpoint {checkpoint} has no config.json{hint}")
    read_json(config, "checkpoint file", hint[2:])
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        raise FinetuneError(f"checkpoint {checkpoint} has no weights file (model.safetensors){hint}")
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            raise FinetuneError(f"checkpoint file {path} is corrupt: {problem}{hint}")
    if for_resume:
        required = ["state.json", "scheduler.pt", "rng.pt"]
        state_path = checkpoint / STATE_DIR / "state.json"
        if read_json(state_path, "checkpoint file", hint[2:]).get("optimizer_saved", True):
            required.append("optimizer.pt")
        for name in required:
            if not (checkpoint / STATE_DIR / name).is_file():
                raise FinetuneError(f"checkpoint {checkpoint} lacks {STATE_DIR}/{name}, so it cannot be resumed{hint}")
            # Checked now, before anything is loaded or printed: the files themselves are read much later.
            problem = _torch_file_problem(checkpoint / STATE_DIR / name) if name.endswith(".pt") else None
            if problem:
                raise FinetuneError(f"checkpoint file {checkpoint / STATE_DIR / name} is corrupt: {problem}{hint}")


def _torch_file_problem(path: Path) -> Optional[str]:
    """Why a torch.save file is unusable (empty, cut off, damaged), or None if its archive is whole.

    torch.save writes a zip archive whose entries carry CRCs: checking them reads the bytes but
    unpickles nothing.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"it is not a complete torch file ({exc})"
    return f"its entry {damaged} is damaged" if damaged else None


STATE_KEYS = {"step": int, "tokens_seen": int, "epoch": int, "batches_in_epoch": int, "config": dict, "data_key": dict}


def read_training_state(checkpoint: Path) -> dict:
    """state.json, checked to hold every key resuming reads, each of the right type."""
    from finetune import files

    path = checkpoint / STATE_DIR / "state.json"
    fix = f"resume from an earlier checkpoint with --resume {checkpoint.parent}/checkpoint-NNNNNN"
    state = files.read_json(path, "checkpoint file", fix, expect=dict, required=tuple(STATE_KEYS))
    for key, kind in STATE_KEYS.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise FinetuneError(
                f"checkpoint file {path} holds {key!r} as a JSON {type(state[key]).__name__}, "
                f"expected {'an object' if kind is dict else 'an integer'}; {fix}"
            )
    if not all(isinstance(state["config"].get(section), dict) for section in ("model", "data", "train")):
        raise FinetuneError(f"checkpoint file {path} lacks the model, data and train sections of its 'config'; {fix}")
    return state


def save_torch_file(obj, path: Path) -> None:
    """torch.save that reports a failed write (e.g. a full disk) as OSError, like every other write."""
    import errno

    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as exc:  # torch's zip writer turns a short write into a RuntimeError
        if shutil.disk_usage(path.parent).free < (1 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise OSError(errno.EIO, f"writing {path.name} failed ({str(exc).splitlines()[0]})") from None


def load_torch_file(path: Path):
    """torch.load restricted to tensors and plain containers (never arbitrary pickled objects)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise FinetuneError(
            f"checkpoint file {path} is corrupt ({str(exc).splitlines()[0][:120]}); "
            f"resume from an earlier checkpoint with --resume DIR"
        ) from None


def capture_rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states, as tensors and plain lists."""
    import random

    import numpy as np
    import torch

    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Settings that define the experiment: resuming with a different value would silently train a
# different model, so it is refused. Everything else (steps, cadence, lr...) may change on resume.
EXPERIMENT_KEYS = {
    ("model", "name"): "model",
    ("model", "lora"): "--lora",
    ("model", "lora_r"): "--lora-r",
    ("model", "lora_targets"): "--lora-targets",
    ("model", "load_in_4bit"): "--load-in-4bit",
    ("data", "line_by_line"): "--line-by-line",
    ("data", "eos_string"): "EOS string",
    ("train", "batch_size"): "--batch-size",
    ("train", "grad_accum"): "--grad-accum",
    ("train", "seed"): "--seed",
}
DATA_KEY_NAMES = {
    "train": "the training data's contents",
    "val": "the validation file's contents",
    "tokenizer": "the tokenizer",
    "block_size": "--block-size",
    "line_by_line": "--line-by-line",
    "val_fraction": "--val-fraction",
    "eos_string": "EOS string",
}
# Settings a resume cannot honour: the checkpoint carries the old value with it.
REFUSED_ON_RESUME = {
    ("train", "optimizer"): (
        "--optimizer",
        "the checkpoint's optimizer state belongs to the optimizer it was saved with",
    ),
    ("model", "lora_alpha"): ("--lora-alpha", "the adapter keeps the scale it was saved with"),
    ("model", "lora_dropout"): ("--lora-dropout", "the adapter keeps the dropout it was saved with"),
    ("train", "freeze_layers"): (
        "--freeze-layers",
        "the checkpoint's optimizer state covers the parameters trained so far",
    ),
    ("train", "train_only_blocks"): (
        "--train-only-blocks",
        "the checkpoint's optimizer state covers the parameters trained so far",
    ),
}
# Where the run and its data live, and how this command was asked to start: not the experiment.
IGNORED_ON_RESUME = {
    ("train", "overwrite"),
    ("train", "resume"),
    ("train", "run_name"),
    ("train", "runs_dir"),
    ("data", "paths"),
    ("data", "cache_dir"),
}


def refuse_changed_settings(saved: dict, current: dict) -> None:
    """Raise naming the first setting a resume cannot take. They are all plain settings (no derived
    value among them), so training checks them first, before any data or model is loaded."""
    refused = {key: (label, "") for key, label in EXPERIMENT_KEYS.items()} | REFUSED_ON_RESUME
    for (section, key), (label, reason) in refused.items():
        before, after = saved[section].get(key), current[section].get(key)
        if before != after:
            raise FinetuneError(
                f"cannot resume: {label} changed ({before!r} -> {after!r}) since the checkpoint"
                f"{'; ' + reason if reason else ''}; "
                f"use a new --run-name for a new experiment, or --overwrite to restart this one"
            )


def compare_for_resume(saved: dict, current: dict, saved_data_key: dict, data_key: dict) -> list[str]:
    """Raise naming the first difference a resume cannot take; return the accepted ones as text.

    Every accepted change takes effect from the resume point (training.py applies --lr, --warmup,
    --schedule, --steps and --weight-decay to the restored optimizer and schedule; the rest is read
    each step), so listing it as changed is true.
    """
    refuse_changed_settings(saved, current)
    for key, label in DATA_KEY_NAMES.items():
        if saved_data_key.get(key) != data_key.get(key):
            raise FinetuneError(
                f"cannot resume: {label} changed since the checkpoint; "
                f"use a new --run-name for a new experiment, or --overwrite to restart this one"
            )
    changes = []
    for section, values in current.items():
        for key, after in values.items():
            before = saved.get(section, {}).get(key)
            refused = (section, key) in EXPERIMENT_KEYS or (section, key) in REFUSED_ON_RESUME
            if (section, key) not in IGNORED_ON_RESUME and not refused and before != after:
                changes.append(f"{section}.{key} {before!r} -> {after!r}")
    return changes


def find_run(runs_dir: str, name: Optional[str], other_sources: str = "pass --checkpoint DIR") -> Path:
    """A run by name, or the most recently updated run when no name is given.

    other_sources: what else the command accepts, for the hint when there is no run.
    """
    root = Path(runs_dir)
    if name:
        run_dir = root / name
        if not run_dir.is_dir():
            available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            listing = f"; runs in {root}/: {', '.join(available)}" if available else f"; {root}/ has no runs yet"
            raise FinetuneError(f"no run named '{name}'{listing}")
        return run_dir
    runs = [p for p in root.iterdir() if p.is_dir() and list_checkpoints(p)] if root.is_dir() else []
    if not runs:
        raise FinetuneError(
            f"no trained runs in {root}/; train one with `finetune train DATA`, point --runs-dir at "
            f"the directory holding your runs, or {other_sources}"
        )
    return max(runs, key=lambda p: (p / "latest").stat().st_mtime if (p / "latest").exists() else p.stat().st_mtime)


def checkpoint_for_run(run_dir: Path) -> Path:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FinetuneError(
            f"run '{run_dir.name}' has no checkpoint yet; let training reach --save-every steps, or finish"
        )
    return checkpoint
