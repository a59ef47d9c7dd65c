"""What a checkpoint holds besides the weights, and how a run resumes from it.

    checkpoint-000200/training_state/
      state.json     TrainingState: counters, the run's settings, its data key, the LR schedule
      optimizer.pt   the optimizer state (optimizer_state.FORMAT, or optimizer.state_dict() in older runs)
      scheduler.pt   the LR scheduler's state (written for inspection; resuming rebuilds the schedule)
      scaler.pt      the fp16 loss scaler's state, when there is one
      rng.pt         Python, NumPy, torch (and CUDA) generator states

Resuming picks the checkpoint (resume_point), refuses settings that would make it another
experiment (refuse_changed_settings, compare_for_resume), restores the optimizer in whichever
format wrote it, continues or extends the LR schedule (resumed_schedule) and restores the random
generators last. How the files get onto disk atomically is checkpoint.py's business.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from finetune import checkpoint as ckpt
from finetune import optimizer_state, schedules
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    import torch

    from finetune.config import TrainConfig

STATE_FILE = "state.json"
# The keys every resume reads, with the JSON type each must have.
RESUME_KEYS = {"step": int, "tokens_seen": int, "epoch": int, "batches_in_epoch": int, "config": dict, "data_key": dict}


@dataclasses.dataclass(kw_only=True)
class TrainingState:
    """state.json, field for field and in the file's key order (runs written by earlier versions resume).

    `read` guarantees the six counters and records resuming needs; the others keep what an older
    file lacks at the value its absence always meant. generate and export read a checkpoint with
    `read_optional`, where any field may be missing (None).
    """

    step: Optional[int] = None
    tokens_seen: Optional[int] = None
    epoch: Optional[int] = None
    batches_in_epoch: Optional[int] = None  # how far into `epoch` the data iterator was
    val_loss: Optional[float] = None  # the last validation loss, if the run validated
    num_processes: int = 1
    config: Optional[dict] = None  # RunConfig.to_dict() of the run's resolved settings
    data_key: Optional[dict] = None  # the token cache key of its data (cache_keys.cache_key)
    command: Optional[str] = None  # the command line that trained it (the model card quotes it)
    data_mode: Optional[str] = None  # "packed" or "supervised" (generate: does the model expect a prompt?)
    chat: bool = False  # trained on chat conversations: prompts get the chat template
    optimizer_saved: bool = True  # False under DeepSpeed, whose checkpoints hold the weights only
    optimizer_format: Optional[str] = None  # optimizer_state.FORMAT; absent in checkpoints of state_dict()
    schedule: Any = None  # schedules.segment(); absent in checkpoints from before it existed

    @classmethod
    def _from_json(cls, values: dict) -> TrainingState:
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    @classmethod
    def read(cls, checkpoint: Path) -> TrainingState:
        """A checkpoint's state for resuming: every key resuming reads present, each of the right type."""
        from finetune import files

        path = checkpoint / ckpt.STATE_DIR / STATE_FILE
        fix = f"resume from an earlier checkpoint with --resume {checkpoint.parent}/checkpoint-NNNNNN"
        values = files.read_json(path, "checkpoint file", fix, expect=dict, required=tuple(RESUME_KEYS))
        for key, kind in RESUME_KEYS.items():
            if not isinstance(values[key], kind) or isinstance(values[key], bool):
                raise FinetuneError(
                    f"checkpoint file {path} holds {key!r} as a JSON {type(values[key]).__name__}, "
                    f"expected {'an object' if kind is dict else 'an integer'}; {fix}"
                )
        if not all(isinstance(values["config"].get(section), dict) for section in ("model", "data", "train")):
            raise FinetuneError(
                f"checkpoint file {path} lacks the model, data and train sections of its 'config'; {fix}"
            )
        return cls._from_json(values)

    @classmethod
    def read_optional(cls, source: Optional[str]) -> TrainingState:
        """What generate and export read: any field may be missing; a model directory or hub id has none."""
        from finetune.files import read_json
        from finetune.modeling import file_fix

        if source is None:
            return cls()
        path = Path(source) / ckpt.STATE_DIR / STATE_FILE
        if not path.exists() and not path.is_symlink():  # a model directory: no training state
            return cls()
        return cls._from_json(read_json(path, "checkpoint file", file_fix(Path(source))))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def write_state_files(
    state_dir: Path,
    state: TrainingState,
    optimizer: Optional[dict],
    scheduler: dict,
    scaler: Optional[dict],
    rng: dict,
) -> None:
    """Fill a checkpoint's training_state/ (state.json last: a directory holding it is complete)."""
    step = state.step
    state_dir.mkdir()
    if state.optimizer_saved:
        ckpt.save_torch_file(optimizer, state_dir / "optimizer.pt")
    ckpt.pause_point("optimizer-written", step)
    ckpt.save_torch_file(scheduler, state_dir / "scheduler.pt")
    if scaler is not None:
        ckpt.save_torch_file(scaler, state_dir / "scaler.pt")
    ckpt.save_torch_file(rng, state_dir / "rng.pt")
    ckpt.pause_point("rng-written", step)
    (state_dir / STATE_FILE).write_text(state.to_json())
    ckpt.pause_point("state-written", step)


# ---------------------------------------------------------------------------------------------
# Where a run continues from
# ---------------------------------------------------------------------------------------------


def resume_point(run_dir: Path, resume: str, overwrite: bool) -> Optional[Path]:
    """The checkpoint to continue from, or None to start from the base model."""
    existing = ckpt.list_checkpoints(run_dir)
    if overwrite:
        return None
    if resume == "latest":
        return ckpt.latest_checkpoint(run_dir) if existing else None
    if resume == "fresh":
        if existing:
            raise FinetuneError(
                f"run '{run_dir.name}' already has checkpoints; --resume fresh would discard them: "
                f"add --overwrite to start over, or use a new --run-name"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise FinetuneError(f"--resume {resume}: no such checkpoint directory; use latest, fresh or a checkpoint path")
    return path


def earlier_checkpoint_fix(checkpoint: Path) -> str:
    """What to do when `checkpoint` cannot be resumed: the checkpoint before it, or start over."""
    earlier = [p for p in ckpt.list_checkpoints(checkpoint.parent) if p.name < checkpoint.name]
    return (
        f"resume from an earlier checkpoint with --resume {earlier[-1]}" if earlier else "start over with --overwrite"
    )


# ---------------------------------------------------------------------------------------------
# What may change on resume
# ---------------------------------------------------------------------------------------------

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
# Where the run and its data live, how this command was asked to start and what it prints: not the experiment.
IGNORED_ON_RESUME = {
    ("train", "overwrite"),
    ("train", "resume"),
    ("train", "run_name"),
    ("train", "runs_dir"),
    ("data", "paths"),
    ("data", "cache_dir"),
    ("train", "print_samples"),  # what the screen shows, not what is trained
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


def resumed_schedule(saved_state: TrainingState, t: TrainConfig, step: int, total_steps: int) -> tuple[dict, str]:
    """The LR schedule from the resume point on, and what the resume line says about it.

    - The run had not finished its schedule: the schedule continues, with this run's --schedule,
      --warmup and end (--steps); unchanged, it gives every step the LR of an uninterrupted run.
    - It had finished (it reached its --steps) and --steps is larger now: the added steps get a
      schedule of their own, a fresh warmup to --lr then the decay to the new end, as if they were
      a new run started from these weights (a decay stretched to the new end would leave them ~0).
    """
    saved_cfg = saved_state.config["train"]
    saved = saved_state.schedule
    if not schedules.is_segment(saved):  # a checkpoint written before "schedule" existed
        saved = schedules.segment(
            saved_cfg.get("schedule", t.schedule),
            saved_cfg.get("warmup", t.warmup),
            0,
            saved_cfg.get("steps") or total_steps,
        )
    if step >= total_steps:
        return saved, f"; it already reached step {step} of {total_steps}: pass a larger --steps to train further"
    if step >= saved["end"]:
        fresh = schedules.segment(t.schedule, t.warmup, step, total_steps)
        return fresh, (
            f"; the {total_steps - step} added steps get their own LR schedule: {fresh['warmup_steps']} warmup "
            f"steps to --lr {t.lr:g}, then {t.schedule} decay to step {total_steps}"
        )
    current = schedules.segment(t.schedule, t.warmup, saved["start"], total_steps)
    if current == saved and saved_cfg.get("lr") == t.lr:
        return current, ""
    return current, (
        f"; the LR from step {step + 1} on follows the new settings ({t.schedule} schedule from step "
        f"{current['start']} to {total_steps}, {current['warmup_steps']} warmup steps, peak --lr {t.lr:g})"
    )


# ---------------------------------------------------------------------------------------------
# Restoring what the checkpoint saved
# ---------------------------------------------------------------------------------------------


def restore_optimizer(
    state: TrainingState,
    checkpoint: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    distributed: bool,
    is_main: bool,
    to_local: Callable[[dict], dict],
) -> bool:
    """Load the checkpoint's optimizer state in the format it was written in; False when it holds none.

    Collective under several processes (rank 0 reads the file and broadcasts it): every rank calls it.
    """
    path = checkpoint / ckpt.STATE_DIR / "optimizer.pt"
    if not state.optimizer_saved:
        return False
    if state.optimizer_format == optimizer_state.FORMAT:
        for group in optimizer.param_groups:  # saved groups hold the scheduler's key: the load matches keys
            group.setdefault("initial_lr", group["lr"])
        optimizer_state.restore_from_file(model, optimizer, path, distributed, is_main, to_local=to_local)
    else:  # written before optimizer_format existed: optimizer.state_dict() of a single process or DDP
        optimizer.load_state_dict(ckpt.load_torch_file(path))
    return True


def load_scaler(checkpoint: Path, scaler) -> None:
    """The fp16 loss scaler's state, when the checkpoint has one (a run saved without fp16 has none)."""
    path = checkpoint / ckpt.STATE_DIR / "scaler.pt"
    if scaler is not None and path.is_file():
        scaler.load_state_dict(ckpt.load_torch_file(path))


def load_rng_state(checkpoint: Path) -> dict:
    return ckpt.load_torch_file(checkpoint / ckpt.STATE_DIR / "rng.pt")


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
