"""The training loop: flat, on accelerate (one process, several GPUs, or `accelerate launch`).

Shape (nanoGPT's train.py is the model): set up data, model, optimizer and schedule; then one
`while step < total_steps` loop with `if step % every == 0` blocks for logging, evaluation,
samples and checkpoints. SIGINT/SIGTERM finish the current step, save, and exit.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from finetune import checkpoint as ckpt
from finetune import cpu_kernels, fast_paths, files, modeling, optimizer_state, schedules, speed, state_dicts
from finetune.batching import endless_batches, make_dataloader
from finetune.config import GenerateConfig, RunConfig, dump_yaml
from finetune.data_files import resolve_files
from finetune.errors import FinetuneError, install_hint
from finetune.prepared import is_prepared_dir, load_prepared, read_manifest
from finetune.token_cache import block_size_for, prepare_data

DEFAULT_STEPS = 1000
MAX_NONFINITE_STEPS = 3  # consecutive non-finite losses before the run stops


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Optional[Path]
    step: int
    val_loss: Optional[float]
    interrupted_by: Optional[str] = None  # "SIGINT" / "SIGTERM" when stopped by a signal

    @property
    def exit_code(self) -> int:
        return {"SIGINT": 130, "SIGTERM": 143}.get(self.interrupted_by or "", 0)


PLAIN_TEXT_SUFFIXES = {".txt", ".md", ""}
MAX_DEFAULT_RUN_NAME = 80  # a file name may be longer than a directory name (plus its lock file) can be


def default_run_name(paths: list[str]) -> str:
    """Named after the first data file: 'stories.txt' -> 'stories', 'notes.csv' -> 'notes-csv'.

    Plain text keeps its stem, like a user would name it; other formats add their extension, so
    notes.csv and notes.jsonl beside each other are two runs, not one run whose data "changed".
    """
    first = Path(paths[0].rstrip("/"))
    suffix = first.suffix.lower()
    stem = first.stem if suffix in PLAIN_TEXT_SUFFIXES else f"{first.stem}-{suffix.lstrip('.')}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")
    return name[:MAX_DEFAULT_RUN_NAME].rstrip("-.") or "run1"


def resolve_precision(requested: str) -> str:
    """accelerate's mixed_precision value: bf16 where supported, fp16 on older GPUs, fp32 on CPU."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "auto":
        if not cuda:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not cuda:
        raise FinetuneError("--precision fp16 needs a CUDA GPU; use --precision fp32 (or bf16) on CPU")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise FinetuneError("this GPU does not support bf16; use --precision fp16 or auto")
    return {"fp32": "no"}.get(requested, requested)


def build_optimizer(model, name: str, lr: float, weight_decay: float, cuda: bool):
    """Trainable parameters only; biases, norms and other 1-D parameters get no weight decay."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if name == "adamw":
        # fused: one kernel for all parameters (CUDA) or one pass per parameter (CPU) instead of six
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    if name == "adamw8bit":
        if not cuda:
            raise FinetuneError(
                "--optimizer adamw8bit needs a CUDA GPU; use --optimizer adamw (or adafactor to save memory)"
            )
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise FinetuneError(
                f"--optimizer adamw8bit needs bitsandbytes; install it with: {install_hint('qlora')}"
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=(0.9, 0.95))
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


class StopSignals:
    """First SIGINT/SIGTERM: ask the loop to save and stop. A second SIGINT aborts at once."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received:  # second signal: the user wants out now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _current_rss() -> int:
    import resource

    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_bytes(baseline_rss: int) -> int:
    """Peak memory used by training: CUDA allocations, or on CPU the peak RSS above the pre-model baseline."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss)


def _log_to(path: Path, record: dict) -> None:
    files.append_line(path, json.dumps(record), "metrics file")


def forward_loss(model, batch):
    """Mean next-token cross-entropy (the model shifts labels itself); -100 labels are not learned."""
    if isinstance(batch, dict):  # supervised examples: padded, with masked labels
        return model(**batch).loss
    return model(input_ids=batch, labels=batch).loss


def _num_tokens(batch) -> int:
    return batch["input_ids"].numel() if isinstance(batch, dict) else batch.numel()


def _predicted_tokens(batch) -> int:
    """Tokens whose next-token loss is counted: each row's labels after the first (the model
    shifts them), except masked (-100) ones."""
    if isinstance(batch, dict):
        return int((batch["labels"][:, 1:] != -100).sum())
    return batch.shape[0] * (batch.shape[1] - 1)


def eval_batch_indices(available: int, cap: int) -> list[int]:
    """All batches, or `cap` of them evenly spaced over the split (not only its beginning)."""
    if available <= cap:
        return list(range(available))
    return [i * available // cap for i in range(cap)]


def _val_batch(loader, index: int, device):
    """Batch `index` of an unshuffled loader, built directly (batches are read out of order)."""
    from accelerate.utils import send_to_device

    start = index * loader.batch_size
    items = [loader.dataset[i] for i in range(start, min(start + loader.batch_size, len(loader.dataset)))]
    return send_to_device(loader.collate_fn(items), device)


def evaluate(model, loader, max_batches: int, accelerator) -> float:
    """Mean loss per predicted token over the validation batches eval_batch_indices picks.

    Weighted by tokens (a mean of per-batch means would weigh a short last batch like a full one).
    Each process takes every n-th batch, and the processes add up their loss sums and token
    counts. Every process runs as many forward passes (one repeats a batch, counted zero times),
    because under FSDP a forward pass needs all of them.
    """
    import torch

    picked = eval_batch_indices(len(loader), max_batches)
    world, rank = accelerator.num_processes, accelerator.process_index
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    model.eval()
    with torch.no_grad():
        for first in range(0, len(picked), world):
            mine = first + rank
            batch = _val_batch(loader, picked[min(mine, len(picked) - 1)], accelerator.device)
            loss = forward_loss(model, batch).detach().double()
            count = _predicted_tokens(batch) if mine < len(picked) else 0
            if count:  # a batch with no predicted token has a NaN mean loss: it adds nothing
                totals += torch.stack(
                    [loss * count, torch.tensor(float(count), dtype=torch.float64, device=loss.device)]
                )
    model.train()
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1].clamp(min=1)).item()


def _earlier_checkpoint_fix(checkpoint: Path) -> str:
    """What to do when `checkpoint` cannot be resumed: the checkpoint before it, or start over."""
    earlier = [p for p in ckpt.list_checkpoints(checkpoint.parent) if p.name < checkpoint.name]
    return (
        f"resume from an earlier checkpoint with --resume {earlier[-1]}" if earlier else "start over with --overwrite"
    )


def _resume_point(run_dir: Path, resume: str, overwrite: bool) -> Optional[Path]:
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


def run_dir_for(cfg: RunConfig) -> Path:
    t = cfg.train
    run_name = t.run_name or default_run_name(cfg.data.paths or [name.split("/")[-1] for name in cfg.data.datasets])
    return Path(t.runs_dir) / run_name


# Set by `finetune train --num-processes N` for the processes it launches: the launcher holds the
# run's lock for them (the value is the run directory it locked).
LOCK_HELD_ENV = "FINETUNE_RUN_LOCK_HELD_BY_LAUNCHER"


def run_lock(run_dir: Path):
    """The run's lock, for the whole training process; taken before anything in the run is read or touched.

    Under several processes the ranks share one run: rank 0 holds the lock for all of them (the
    others must not ask for it, they would find it taken). When `finetune train --num-processes`
    launched us, the launcher already holds it.
    """
    from finetune import locking

    if os.environ.get("RANK", "0") != "0":
        return nullcontext()
    if os.environ.get(LOCK_HELD_ENV) == str(run_dir.resolve()) and locking.holder_pid(run_dir) is not None:
        return nullcontext()
    return locking.exclusive(run_dir, f"run '{run_dir.name}'", "use another --run-name")


@contextmanager
def launcher_lock(cfg: RunConfig):
    """Hold the run's lock while `finetune train --num-processes N` runs its processes."""
    run_dir = run_dir_for(cfg)
    with run_lock(run_dir):
        previous = os.environ.get(LOCK_HELD_ENV)
        os.environ[LOCK_HELD_ENV] = str(run_dir.resolve())
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(LOCK_HELD_ENV, None)
            else:
                os.environ[LOCK_HELD_ENV] = previous


def train(cfg: RunConfig, log: Callable[[str], None] = print, command: Optional[str] = None) -> TrainResult:
    """Run training as configured; returns where the run and its last checkpoint are."""
    run_dir = run_dir_for(cfg)
    with run_lock(run_dir):
        return _train_locked(cfg, run_dir, log, command)


def _train_locked(cfg: RunConfig, run_dir: Path, log: Callable[[str], None], command: Optional[str]) -> TrainResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t = cfg.train
    data_files = resolve_files(cfg.data.paths)
    val_files = resolve_files([cfg.data.val_file]) if cfg.data.val_file else None
    run_name = run_dir.name
    resume_from = _resume_point(run_dir, t.resume, t.overwrite)
    if not t.overwrite:
        _check_run_files(run_dir)  # now, before anything is printed or loaded
    saved_state: Optional[dict] = None
    if resume_from is not None:
        saved_state = ckpt.read_training_state(resume_from)  # first: verify_checkpoint reads it unguarded
        ckpt.verify_checkpoint(resume_from, for_resume=True)
        ckpt.refuse_changed_settings(saved_state["config"], cfg.to_dict())  # before anything is printed

    # cpu=True on a machine without CUDA is what lets `accelerate launch` start gloo (MULTI_CPU) processes.
    from accelerate import DataLoaderConfiguration

    accelerator = Accelerator(
        mixed_precision=resolve_precision(t.precision),
        cpu=not torch.cuda.is_available(),
        # With pinned batches (batching.make_dataloader), host-to-GPU copies overlap the previous step.
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
    )
    is_main = accelerator.is_main_process
    say = log if is_main else (lambda _msg: None)
    set_seed(t.seed)

    # Tokenizer: the checkpoint's when resuming; learned from the data for from-scratch presets;
    # else the model's own.
    scratch = modeling.is_scratch_preset(cfg.model.name)
    with accelerator.main_process_first():
        prepared_dir = data_files[0] if len(data_files) == 1 and is_prepared_dir(data_files[0]) else None
        if resume_from is not None:
            tokenizer = modeling.load_tokenizer(str(resume_from))
        elif prepared_dir is not None and scratch:
            tokenizer = modeling.load_tokenizer(str(prepared_dir / "tokenizer"))
        elif scratch:
            tokenizer = modeling.tokenizer_from_data(cfg, data_files)
        else:
            tokenizer = modeling.load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    adapter = cfg.model.lora
    model_source = str(resume_from) if resume_from is not None and not adapter else cfg.model.name
    resume_fix = _earlier_checkpoint_fix(resume_from) if resume_from is not None else None
    if adapter and scratch:
        raise FinetuneError(
            "--lora adapts a pretrained model; with a from-scratch preset train all weights (drop --lora)"
        )
    model_config = modeling.load_model_config(model_source, cfg.model.trust_remote_code)
    context = modeling.context_length(model_config)
    if prepared_dir is not None:
        block_size = cfg.data.block_size or read_manifest(prepared_dir)["block_size"]
    else:
        block_size = block_size_for(cfg.data.block_size, context)
    if block_size > context:
        raise FinetuneError(
            f"--block-size {block_size} exceeds the model's context of {context} tokens; use --block-size {context} or less"
        )

    with accelerator.main_process_first():
        prepared = (
            load_prepared(prepared_dir, tokenizer, cfg.data.block_size, log=say)
            if prepared_dir
            else prepare_data(data_files, tokenizer, block_size, cfg.data, val_files=val_files, log=say)
        )
    resolved = replace(cfg, train=replace(t, run_name=run_name), data=replace(cfg.data, block_size=prepared.block_size))
    changes: list[str] = []
    if saved_state is not None:
        changes = ckpt.compare_for_resume(
            saved_state["config"], resolved.to_dict(), saved_state["data_key"], prepared.key
        )

    baseline_rss = _current_rss()
    if scratch and resume_from is None:
        model = modeling.build_scratch_model(cfg.model.name, tokenizer, t.seed)
    else:
        # The checkpoint when resuming, except for LoRA runs, whose checkpoints hold only the
        # adapter: their base model comes from model.name.
        model = modeling.load_pretrained_model(
            model_source,
            cfg.model.trust_remote_code,
            dtype=torch.float32,
            load_in_4bit=cfg.model.load_in_4bit,
            fix=resume_fix,
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the cache is useless in training and incompatible with recomputation
    if adapter:
        from finetune import lora

        if cfg.model.load_in_4bit:
            import peft

            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
        if resume_from is not None:
            model = lora.load_adapter_for_training(model, resume_from)
        else:
            model = lora.wrap_with_lora(
                model,
                cfg.model.lora_r,
                cfg.model.lora_alpha,
                cfg.model.lora_dropout,
                cfg.model.lora_targets,
                t.gradient_checkpointing,
            )
    if resume_from is not None and adapter:  # the adapter's weights: a full checkpoint's were checked as it loaded
        modeling.require_finite(model, resume_from, resume_fix)
    # Fast paths (fast_paths.py): each on by default with CUDA, off on CPU, each with a flag.
    cuda = accelerator.device.type == "cuda"
    if cuda and t.tf32:
        fast_paths.enable_tf32()
    use_chunked_loss = (
        fast_paths.resolve(t.fused_loss, cuda) and fast_paths.supports_chunked_loss(model) and not adapter
    )
    if t.fused_loss and not use_chunked_loss:
        say(
            "warning: --fused-loss is not available for this model (LoRA or an unlisted architecture); using the model's own loss"
        )
    lm = model  # the transformers model; `model` below is what trains (maybe wrapped, compiled, distributed)
    # Padding needs the chunked loss, which keeps the padded ids out of the softmax.
    vocab_size = (
        fast_paths.pad_vocabulary(lm)
        if use_chunked_loss and fast_paths.resolve(t.pad_vocab, cuda)
        else lm.get_input_embeddings().weight.shape[0]
    )
    modeling.freeze_parameters(lm, t.freeze_layers, t.train_only_blocks)  # after padding, which makes new embeddings
    if use_chunked_loss:
        model = fast_paths.with_chunked_loss(lm, vocab_size)
    # How this run's optimizer names and sizes parameters differently from a checkpoint (optimizer_state.portable).
    wrapper_prefix = fast_paths.LOSS_WRAPPER_PREFIX if use_chunked_loss else ""
    padded_rows = lm.get_input_embeddings().weight.shape[0]
    if fast_paths.resolve(t.compile, cuda):
        model = torch.compile(model)  # compile fuses dropout and GELU itself: no CPU kernels with it
    elif t.cpu_kernels if t.cpu_kernels is not None else not cuda:
        swapped = cpu_kernels.apply(lm)
        if swapped:
            say(f"CPU fast paths: {', '.join(swapped)} (--no-cpu-kernels turns them off)")
    sync_every = t.loss_sync_every or (10 if cuda else 1)

    pad = modeling.pad_id(tokenizer)
    train_loader = make_dataloader(prepared.train, t.batch_size, t.seed, shuffle=True, pad_id=pad)
    train_sampler = train_loader.sampler
    val_loader = (
        make_dataloader(prepared.val, t.batch_size, t.seed, shuffle=False, pad_id=pad)
        if prepared.val is not None
        else None
    )
    optimizer = build_optimizer(model, t.optimizer, t.lr, t.weight_decay, cuda=cuda)
    # The validation loader stays unprepared: evaluate() splits its batches over the processes
    # itself, without the repeated samples accelerate pads the last batch with.
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None and len(val_loader) > t.eval_batches:
        say(
            f"validation: {t.eval_batches} of the {len(val_loader)} validation batches, evenly spaced over the split "
            f"(train.eval_batches: {t.eval_batches}; raise it in a --config file to validate on more)"
        )

    steps_per_epoch = max(1, math.ceil(len(train_loader) / t.grad_accum))
    total_steps = t.steps or (math.ceil(t.epochs * steps_per_epoch) if t.epochs else DEFAULT_STEPS)
    schedule = schedules.segment(t.schedule, t.warmup, 0, total_steps)

    world = accelerator.num_processes
    step, tokens_seen, epoch, batches_in_epoch = 0, 0, 0, 0
    val_loss: Optional[float] = None
    rng_state = None
    if saved_state is not None:
        state_dir = resume_from / ckpt.STATE_DIR
        if not saved_state.get("optimizer_saved", True):
            say("warning: this checkpoint has no optimizer state (saved under DeepSpeed); the optimizer starts afresh")
        elif saved_state.get("optimizer_format") == optimizer_state.FORMAT:
            for group in optimizer.param_groups:  # saved groups hold the scheduler's key: the load matches keys
                group.setdefault("initial_lr", group["lr"])
            optimizer_state.restore_from_file(
                model,
                optimizer,
                state_dir / "optimizer.pt",
                world > 1,
                is_main,
                to_local=lambda state: optimizer_state.localized(state, wrapper_prefix, padded_rows, vocab_size),
            )
        else:  # written before optimizer_format existed: optimizer.state_dict() of a single process or DDP
            optimizer.load_state_dict(ckpt.load_torch_file(state_dir / "optimizer.pt"))
        # The restored optimizer holds the saved settings: this run's --weight-decay applies from here
        # (its --lr through the scheduler below). Group 0 holds the decayed weights (build_optimizer).
        optimizer.param_groups[0]["weight_decay"] = t.weight_decay
        if accelerator.scaler is not None and (state_dir / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(ckpt.load_torch_file(state_dir / "scaler.pt"))
        rng_state = ckpt.load_torch_file(state_dir / "rng.pt")  # read now, restored last (below)
        step, tokens_seen = saved_state["step"], saved_state["tokens_seen"]
        epoch, batches_in_epoch = saved_state["epoch"], saved_state["batches_in_epoch"]
        val_loss = saved_state.get("val_loss")
        schedule, plan = resumed_schedule(saved_state, t, step, total_steps)
        say(
            f"resuming run '{run_name}' from {resume_from.name} (step {step})"
            + (f"; changed: {', '.join(changes)}" if changes else "")
            + plan
        )
        if saved_state.get("num_processes", 1) != world:
            say(
                f"warning: the run was saved with {saved_state['num_processes']} processes and resumes with "
                f"{world}; the data order after this point differs from an uninterrupted run"
            )
    # The scheduler is stepped by hand once per optimizer step (not prepared by accelerate, which
    # would step it once per process), so the schedule counts optimizer steps.
    scheduler = schedules.scheduler_from(optimizer, schedule, t.lr, step)

    # Every check has passed (config, data, tokenizer, checkpoint files): only now does the run
    # directory change, so a refused start leaves it as it was.
    metrics_path = run_dir / "metrics.jsonl"
    if is_main:
        kept_metrics = None if t.overwrite else _metrics_until(metrics_path, step)
        _prepare_run_dir(run_dir, resolved, t.overwrite, kept_metrics)
    accelerator.wait_for_everyone()

    n_params = modeling.count_parameters(model)
    n_trainable = modeling.count_trainable(model)
    effective_batch = t.batch_size * t.grad_accum * world
    trainable = f" ({n_trainable / 1e6:.2f}M trainable)" if n_trainable != n_params else ""
    say(
        f"run '{run_name}': {cfg.model.name}, {n_params / 1e6:.1f}M parameters{trainable}, {accelerator.device}, "
        f"precision {accelerator.mixed_precision}; {total_steps} steps of {effective_batch} blocks "
        f"({t.batch_size} per device x {t.grad_accum} accumulation x {world} processes) = "
        f"{effective_batch * prepared.block_size:,} tokens per step; ~{total_steps / steps_per_epoch:.1f} epochs"
    )

    last_checkpoint: Optional[Path] = resume_from
    nonfinite_streak = 0
    batches = endless_batches(train_loader, train_sampler, epoch, batches_in_epoch, accelerator)
    if rng_state is not None:
        # Last, so nothing above (model loading, iterator set-up) draws from the restored streams.
        ckpt.restore_rng_state(rng_state)

    # DeepSpeed's ZeRO optimizer keeps its partitions in its own checkpoint format, which
    # torch.distributed.checkpoint cannot gather: its checkpoints hold the weights only.
    optimizer_saved = accelerator.distributed_type.name != "DEEPSPEED"
    # Under FSDP and ZeRO-3 each rank holds a shard of every weight: a forward pass (sampling) needs
    # all ranks, so they all sample together and rank 0 writes.
    deepspeed = accelerator.state.deepspeed_plugin if accelerator.distributed_type.name == "DEEPSPEED" else None
    sharded_weights = accelerator.distributed_type.name == "FSDP" or getattr(deepspeed, "zero_stage", 0) == 3

    def save() -> Path:
        unwrapped = state_dicts.inner_model(accelerator.unwrap_model(model))
        state_dict = state_dicts.inner_state_dict(accelerator.get_state_dict(model), unwrapped)
        state_dict = state_dicts.drop_tied_aliases(
            state_dicts.unpad_state_dict(state_dict, unwrapped, vocab_size), unwrapped
        )
        finite = all(torch.isfinite(p).all() for p in state_dict.values() if p.is_floating_point())
        if world > 1:  # under FSDP only rank 0 holds the gathered weights: all ranks must stop together
            finite = (
                accelerator.reduce(torch.tensor(float(finite), device=accelerator.device), reduction="sum").item()
                == world
            )
        if not finite:
            raise FinetuneError(
                f"the weights hold NaN/inf at step {step}; not saving them over the last good checkpoint. "
                f"Lower --lr or use --precision fp32/bf16, then resume"
            )
        state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "epoch": epoch,
            "batches_in_epoch": batches_in_epoch,
            "val_loss": val_loss,
            "num_processes": world,
            "config": resolved.to_dict(),
            "data_key": prepared.key,
            "command": command or "finetune.train(...) (Python API)",
            "data_mode": prepared.mode,
            "chat": prepared.chat,
            "optimizer_saved": optimizer_saved,
            "optimizer_format": optimizer_state.FORMAT,
            "schedule": schedule,
        }
        # Collective under FSDP (every rank gives its shard); only rank 0 writes the result.
        full_optimizer = optimizer_state.gather(model, optimizer, world > 1) if optimizer_saved else None
        if is_main and full_optimizer is not None:
            full_optimizer = optimizer_state.portable(full_optimizer, wrapper_prefix, padded_rows, vocab_size)
        rng = ckpt.capture_rng_state()

        def write_contents(tmp: Path) -> None:
            if adapter:  # peft writes adapter_config.json + adapter_model.safetensors
                # From the gathered state dict: under FSDP the model's own tensors are shards.
                unwrapped.save_pretrained(tmp, state_dict=state_dict)
            else:
                padded_size, unwrapped.config.vocab_size = unwrapped.config.vocab_size, vocab_size
                try:  # checkpoints never carry the padding rows
                    unwrapped.save_pretrained(tmp, state_dict=state_dict)
                finally:
                    unwrapped.config.vocab_size = padded_size
            ckpt.pause_point("model-written", step)
            tokenizer.save_pretrained(tmp)
            ckpt.pause_point("tokenizer-written", step)
            state_dir = tmp / ckpt.STATE_DIR
            state_dir.mkdir()
            if state["optimizer_saved"]:
                ckpt.save_torch_file(full_optimizer, state_dir / "optimizer.pt")
            ckpt.pause_point("optimizer-written", step)
            ckpt.save_torch_file(scheduler.state_dict(), state_dir / "scheduler.pt")
            if accelerator.scaler is not None:
                ckpt.save_torch_file(accelerator.scaler.state_dict(), state_dir / "scaler.pt")
            ckpt.save_torch_file(rng, state_dir / "rng.pt")
            ckpt.pause_point("rng-written", step)
            (state_dir / "state.json").write_text(json.dumps(state, indent=1))
            ckpt.pause_point("state-written", step)

        path = None
        if is_main:
            path = ckpt.save_checkpoint(run_dir, step, write_contents, t.keep)
        accelerator.wait_for_everyone()
        return path or run_dir / ckpt.checkpoint_name(step)

    def write_samples() -> None:
        from finetune.generation import generate_texts

        gen_cfg = GenerateConfig(prompts=[""], n=2, max_new_tokens=t.sample_tokens, temperature=0.8, stream=False)
        # Sampling draws random numbers; fork the RNG so it does not change the training run.
        with torch.random.fork_rng(devices=[]):
            sampler_model = state_dicts.inner_model(accelerator.unwrap_model(model))
            texts = generate_texts(
                sampler_model,
                tokenizer,
                gen_cfg,
                suppress_ids=list(range(vocab_size, padded_rows)),
                synced=sharded_weights,
            )
        model.train()
        if is_main:
            body = f"\n{'=' * 20}\n".join(texts)
            files.write_atomic(
                run_dir / "samples" / f"samples-{step:06d}.txt", body + "\n", "training samples", durable=False
            )

    pending_losses: list = []
    train_loss = float("nan")
    flops_per_token = speed.flops_per_token(lm, prepared.block_size)
    device_peak = speed.peak_flops(torch.cuda.get_device_name(0)) if cuda else None
    bar = tqdm(
        total=total_steps, initial=min(step, total_steps), disable=not is_main, dynamic_ncols=True, desc="training"
    )
    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    # The bar is closed however the loop ends, so an error's message starts on its own line.
    with bar, StopSignals() as signals:
        while step < total_steps and not signals.received:
            loss_sum = torch.zeros((), device=accelerator.device)
            for micro in range(t.grad_accum):
                epoch, batches_in_epoch, batch = next(batches)
                # Skip the gradient all-reduce on all but the last micro-step (DDP).
                sync = nullcontext() if micro == t.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    loss = forward_loss(model, batch) / t.grad_accum
                    accelerator.backward(loss)
                loss_sum += loss.detach()
                window_tokens += _num_tokens(batch) * world
            if t.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            step_loss = accelerator.reduce(loss_sum, reduction="mean").detach()
            if sync_every > 1:
                # No host sync inside the step: losses are read back every sync_every steps.
                pending_losses.append(step_loss)
            elif not math.isfinite(train_loss := step_loss.item()):
                # The fp16 scaler's overflow steps keep a finite loss, so they never count here.
                nonfinite_streak += 1
                optimizer.zero_grad(set_to_none=True)
                if nonfinite_streak >= MAX_NONFINITE_STEPS:
                    kept = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
                    raise FinetuneError(
                        f"the loss was not finite for {MAX_NONFINITE_STEPS} steps in a row (at step {step + 1}); "
                        f"lower --lr or use --precision fp32/bf16{kept}"
                    )
                continue
            nonfinite_streak = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += _num_tokens(batch) * world * t.grad_accum
            if pending_losses and (
                step % sync_every == 0 or step % t.log_every == 0 or step == total_steps or signals.received
            ):
                values = torch.stack(pending_losses).float().tolist()
                pending_losses.clear()
                if not all(math.isfinite(v) for v in values):
                    raise FinetuneError(
                        f"the loss was not finite between steps {step - len(values) + 1} and {step}; lower --lr or use "
                        f"--precision fp32/bf16 (the last good checkpoint is kept; --loss-sync-every 1 skips bad steps instead)"
                    )
                train_loss = values[-1]

            elapsed = time.perf_counter() - window_start
            lr = scheduler.get_last_lr()[0]
            bar.update(1)
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            mfu = tokens_per_s * flops_per_token / device_peak if device_peak else None
            bar.set_postfix(
                loss=f"{train_loss:.3f}",
                lr=f"{lr:.1e}",
                tok_s=f"{tokens_per_s:,.0f}",
                **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}),
            )
            if is_main and (step % t.log_every == 0 or step == total_steps):
                _log_to(
                    metrics_path,
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": round(train_loss, 6),
                        "lr": lr,
                        "tokens_seen": tokens_seen,
                        "tokens_per_s": round(tokens_per_s, 1),
                        "peak_memory_mb": round(peak_memory_bytes(baseline_rss) / 1e6, 1),
                        **({"mfu": round(mfu, 4)} if mfu is not None else {}),
                    },
                )
                window_start, window_tokens = time.perf_counter(), 0

            if val_loader is not None and t.eval_every and (step % t.eval_every == 0 or step == total_steps):
                val_loss = evaluate(model, val_loader, t.eval_batches, accelerator)
                perplexity = math.exp(min(val_loss, 50))
                if is_main:
                    _log_to(
                        metrics_path,
                        {"step": step, "val_loss": round(val_loss, 6), "val_perplexity": round(perplexity, 4)},
                    )
                    bar.write(f"step {step}: validation loss {val_loss:.4f}, perplexity {perplexity:.2f}")

            if t.sample_every and step % t.sample_every == 0 and (is_main or sharded_weights):
                write_samples()

            if (t.save_every and step % t.save_every == 0) or step == total_steps or signals.received:
                last_checkpoint = save()
        if (
            signals.received
            and step > 0
            and (last_checkpoint is None or last_checkpoint.name != ckpt.checkpoint_name(step))
        ):
            last_checkpoint = save()  # a signal before the first step completed

    if signals.received:
        say(
            f"stopped by {signals.received} at step {step}; saved {last_checkpoint}. "
            f"Resume with the same `finetune train` command (run '{run_name}' continues from its latest checkpoint)"
        )
    elif is_main:
        say(f"done: {step} steps; checkpoint {last_checkpoint}")
    # All ranks reach the end together before end_training destroys the process group: a rank
    # tearing its gloo/NCCL connections down while another still uses them aborts ("terminate
    # called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(run_dir, last_checkpoint, step, val_loss, signals.received)


def resumed_schedule(saved_state: dict, t, step: int, total_steps: int) -> tuple[dict, str]:
    """The LR schedule from the resume point on, and what the resume line says about it.

    - The run had not finished its schedule: the schedule continues, with this run's --schedule,
      --warmup and end (--steps); unchanged, it gives every step the LR of an uninterrupted run.
    - It had finished (it reached its --steps) and --steps is larger now: the added steps get a
      schedule of their own, a fresh warmup to --lr then the decay to the new end, as if they were
      a new run started from these weights (a decay stretched to the new end would leave them ~0).
    """
    saved_cfg = saved_state["config"]["train"]
    saved = saved_state.get("schedule")
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


def _metrics_until(path: Path, step: int) -> Optional[list[dict]]:
    """metrics.jsonl's records up to `step` (later steps are trained again), or None when nothing is to drop.

    A last line cut short by a crash is dropped (files.read_jsonl), never an error.
    """
    if not path.exists():
        return None
    text = files.read_text(path, "metrics file", "delete its damaged lines, or the file")
    records = files.read_jsonl(path, "metrics file", "delete its damaged lines, or the file")
    kept = [r for r in records if r.get("step", 0) <= step]
    whole = len(kept) == len([line for line in text.splitlines() if line.strip()]) and text.endswith("\n")
    return None if whole else kept


def _check_run_files(run_dir: Path) -> None:
    """The run's own files are what this run will append to and replace: damaged ones are named up front."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() or metrics.is_symlink():
        files.read_jsonl(metrics, "metrics file", "delete its damaged lines, or the file")
    config = run_dir / "config.yaml"
    if config.exists() and not config.is_file():
        raise FinetuneError(
            f"run file {config} is not a file; remove it (it is rewritten from this command's settings)"
        )
    samples = run_dir / "samples"
    if samples.exists() and not samples.is_dir():
        raise FinetuneError(f"{samples} is a file where the run keeps its samples directory; move it away")


def _prepare_run_dir(run_dir: Path, resolved: RunConfig, overwrite: bool, kept_metrics: Optional[list[dict]]) -> None:
    """The run directory's first changes, made once every check has passed."""
    with files.writing(run_dir, "run directory"):
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        ckpt.remove_leftovers(run_dir)
    dump_yaml(resolved, run_dir / "config.yaml")
    if kept_metrics is not None:
        files.write_atomic(
            run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept_metrics), "metrics file"
        )
