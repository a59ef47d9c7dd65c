"""Training: `train` = lock the run, `setup`, `fit`, `finish` (litgpt's finetune/full.py, torchtune's recipes).

`setup` builds what stays fixed for the run (a `Run`: accelerator, model, tokenizer, data loaders,
optimizer, LR schedule) in an order that leaves the run directory untouched by a refused start.
`fit` is nanoGPT's loop: one `while step < total_steps` loop with `if step % every == 0` blocks for
logging, evaluation, samples and checkpoints; a `Progress` is all it changes. SIGINT/SIGTERM finish
the current step, save, and exit. Runs on accelerate: one process, several GPUs, or `accelerate launch`.
"""

from __future__ import annotations

import math
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from finetune import checkpoint as ckpt
from finetune import (
    cpu_kernels,
    fast_paths,
    files,
    metrics,
    modeling,
    optimizer_state,
    run_state,
    run_status,
    schedules,
    state_dicts,
    trackers,
)
from finetune.batching import endless_batches, make_dataloader
from finetune.config import DEFAULT_STEPS, LOSS_SYNC_EVERY, GenerateConfig, RunConfig, TrainConfig, dump_yaml
from finetune.data_files import resolve_files
from finetune.errors import FinetuneError, install_hint
from finetune.loss_plot import LossPlotter
from finetune.perplexity import change_line, perplexity
from finetune.prepared import is_prepared_dir, load_prepared, read_manifest
from finetune.run_state import TrainingState
from finetune.runs import run_dir_for, run_lock
from finetune.token_cache import block_size_for, prepare_data

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from tqdm import tqdm
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from finetune.cache_entry import PreparedData

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


def build_optimizer(
    model: torch.nn.Module, name: str, lr: float, weight_decay: float, cuda: bool
) -> torch.optim.Optimizer:
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


def forward_loss(model: torch.nn.Module, batch) -> torch.Tensor:
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


def _val_batch(loader: DataLoader, index: int, device: torch.device):
    """Batch `index` of an unshuffled loader, built directly (batches are read out of order)."""
    from accelerate.utils import send_to_device

    start = index * loader.batch_size
    items = [loader.dataset[i] for i in range(start, min(start + loader.batch_size, len(loader.dataset)))]
    return send_to_device(loader.collate_fn(items), device)


def evaluate(model: torch.nn.Module, loader: DataLoader, max_batches: int, accelerator: Accelerator) -> float:
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


@dataclass
class Run:
    """What `setup` builds and the loop only reads: fixed for the whole run."""

    cfg: RunConfig  # as resolved: with the run's name and the data's block size
    run_dir: Path
    command: str  # what state.json records as the command that trained the run
    accelerator: Accelerator
    # What trains: the transformers model (a peft model under --lora), maybe wrapped for the chunked loss,
    # compiled, distributed; state_dicts.inner_model(accelerator.unwrap_model(model)) is the transformers model.
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    prepared: PreparedData
    train_loader: DataLoader
    train_sampler: Any  # the train loader's sampler: it sets each epoch's shuffle
    val_loader: Optional[DataLoader]  # unprepared: evaluate() splits its batches over the processes itself
    optimizer: torch.optim.Optimizer
    total_steps: int
    schedule: dict  # the LR schedule (schedules.segment), as state.json records it
    vocab_size: int  # the tokenizer's rows of the embeddings: what checkpoints hold
    padded_rows: int  # the embeddings' rows while training (vocab_size, or padded for tensor cores)
    wrapper_prefix: str  # what the loss wrapper adds to parameter names (optimizer_state.portable)
    sync_every: int  # steps between reading the loss back to the host
    baseline_rss: int  # memory in use before the model was loaded (CPU peak memory is counted above it)
    resumed_from: Optional[Path]
    log: Callable[[str], None]  # the caller's log on rank 0, silent on the others
    scheduler: Any = None  # LambdaLR, built once the resume point's step is known
    resumed_rng: Optional[dict] = None  # generator states to restore just before the first step
    flops_per_token: float = 0.0
    device_peak_flops: Optional[float] = None  # None: MFU is not reported
    plot: LossPlotter = field(default_factory=LossPlotter)  # loss.png, drawn by a helper process (loss_plot.py)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def cuda(self) -> bool:
        return self.accelerator.device.type == "cuda"

    @property
    def optimizer_saved(self) -> bool:
        # DeepSpeed's ZeRO optimizer keeps its partitions in its own checkpoint format, which
        # torch.distributed.checkpoint cannot gather: its checkpoints hold the weights only.
        return self.accelerator.distributed_type.name != "DEEPSPEED"

    @property
    def sharded_weights(self) -> bool:
        # Under FSDP and ZeRO-3 each rank holds a shard of every weight: a forward pass (sampling)
        # needs all ranks, so they all sample together and rank 0 writes.
        name = self.accelerator.distributed_type.name
        deepspeed = self.accelerator.state.deepspeed_plugin if name == "DEEPSPEED" else None
        return name == "FSDP" or getattr(deepspeed, "zero_stage", 0) == 3


@dataclass
class Progress:
    """All the loop changes. The first five are what a checkpoint saves and a resume starts from."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` consumed
    val_loss: Optional[float] = None  # the last validation loss
    initial_val_loss: Optional[float] = None  # before any update (step 0): the "before" of the final line
    train_loss: float = math.nan  # the last training loss read back to the host
    pending_losses: list = field(default_factory=list)  # step losses not read back yet (sync_every > 1)
    nonfinite_streak: int = 0  # consecutive steps skipped for a non-finite loss
    last_checkpoint: Optional[Path] = None
    window_start: float = 0.0  # throughput is measured since the last metrics record
    window_tokens: int = 0
    stopped_by: Optional[str] = None  # "SIGINT" / "SIGTERM"


def train(cfg: RunConfig, log: Callable[[str], None] = print, command: Optional[str] = None) -> TrainResult:
    """Run training as configured; returns where the run and its last checkpoint are."""
    run_dir = run_dir_for(cfg)
    with run_lock(run_dir):
        run, progress = setup(cfg, run_dir, log, command)
        # status.json says "running", then how the run ended (finetune runs reads it); rank 0 writes.
        status = run_status.recording(run_dir, progress, run.total_steps, run.command) if run.is_main else nullcontext()
        with status, run.plot:  # the plot's last drawing also comes when the run fails (loss_plot.LossPlotter)
            fit(run, progress)
            return finish(run, progress)


# ---------------------------------------------------------------------------------------------
# setup: every check first, the run directory changed last
# ---------------------------------------------------------------------------------------------


def setup(cfg: RunConfig, run_dir: Path, log: Callable[[str], None], command: Optional[str]) -> tuple[Run, Progress]:
    """Everything before the first step. Each check runs before anything it would spare is loaded or printed."""
    from accelerate.utils import set_seed

    t = cfg.train
    data_files = resolve_files(cfg.data.paths)
    val_files = resolve_files([cfg.data.val_file]) if cfg.data.val_file else None
    resume_from, saved = _check_resume(cfg, run_dir)
    reporting = trackers.resolve(t.report_to)
    accelerator = _make_accelerator(t.precision, trackers.accelerator_options(reporting, run_dir))
    say = log if accelerator.is_main_process else (lambda _msg: None)
    set_seed(t.seed)
    tokenizer, prepared_dir = _load_tokenizer(cfg, accelerator, data_files, resume_from)
    model_source = _model_source(cfg, resume_from)
    prepared = _load_data(cfg, accelerator, tokenizer, model_source, data_files, val_files, prepared_dir, say)
    resolved = replace(
        cfg, train=replace(t, run_name=run_dir.name), data=replace(cfg.data, block_size=prepared.block_size)
    )
    changes: list[str] = []
    if saved is not None:
        changes = run_state.compare_for_resume(saved.config, resolved.to_dict(), saved.data_key, prepared.key)
    baseline_rss = metrics.current_rss()
    lm = _load_model(cfg, tokenizer, model_source, resume_from)
    model, vocab_size, padded_rows, wrapper_prefix = _fast_paths(cfg, lm, accelerator, say)
    model, optimizer, train_loader, train_sampler, val_loader = _loaders_and_optimizer(
        t, prepared, tokenizer, model, accelerator, say
    )
    steps_per_epoch = max(1, math.ceil(len(train_loader) / t.grad_accum))
    total_steps = t.steps or (math.ceil(t.epochs * steps_per_epoch) if t.epochs else DEFAULT_STEPS)
    run = Run(
        cfg=resolved,
        run_dir=run_dir,
        command=command or "finetune.train(...) (Python API)",
        accelerator=accelerator,
        model=model,
        tokenizer=tokenizer,
        prepared=prepared,
        train_loader=train_loader,
        train_sampler=train_sampler,
        val_loader=val_loader,
        optimizer=optimizer,
        total_steps=total_steps,
        schedule=schedules.segment(t.schedule, t.warmup, 0, total_steps),
        vocab_size=vocab_size,
        padded_rows=padded_rows,
        wrapper_prefix=wrapper_prefix,
        sync_every=t.loss_sync_every or LOSS_SYNC_EVERY["cuda" if accelerator.device.type == "cuda" else "cpu"],
        baseline_rss=baseline_rss,
        resumed_from=resume_from,
        log=say,
    )
    progress = _resume(run, saved, changes) if saved is not None else Progress()
    # The scheduler is stepped by hand once per optimizer step (not prepared by accelerate, which
    # would step it once per process), so the schedule counts optimizer steps.
    run.scheduler = schedules.scheduler_from(optimizer, run.schedule, t.lr, progress.step)
    _start_run_dir(run, progress.step)
    _announce(run, steps_per_epoch)
    for line in trackers.start(accelerator, reporting, run_dir, resolved.to_dict(), progress.step, saved is not None):
        say(f"reporting to {line}")
    if run.is_main:
        run.plot = LossPlotter(run_dir, warn=say)
    run.flops_per_token = metrics.flops_per_token(lm, prepared.block_size)
    if run.cuda:
        import torch

        run.device_peak_flops = metrics.peak_flops(torch.cuda.get_device_name(0))
    return run, progress


def _check_resume(cfg: RunConfig, run_dir: Path) -> tuple[Optional[Path], Optional[TrainingState]]:
    """The checkpoint to resume and its state, checked before anything is printed or loaded."""
    t = cfg.train
    resume_from = run_state.resume_point(run_dir, t.resume, t.overwrite)
    if not t.overwrite:
        _check_run_files(run_dir)
    saved: Optional[TrainingState] = None
    if resume_from is not None:
        saved = TrainingState.read(resume_from)  # a damaged state.json is named before the other files are checked
        ckpt.verify_checkpoint(resume_from, for_resume=True)
        run_state.refuse_changed_settings(saved.config, cfg.to_dict())
    return resume_from, saved


def _make_accelerator(precision: str, tracking: dict) -> Accelerator:
    """The Accelerator; `tracking` holds its --report-to arguments (trackers.accelerator_options)."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration

    # cpu=True on a machine without CUDA is what lets `accelerate launch` start gloo (MULTI_CPU) processes.
    return Accelerator(
        mixed_precision=resolve_precision(precision),
        cpu=not torch.cuda.is_available(),
        # With pinned batches (batching.make_dataloader), host-to-GPU copies overlap the previous step.
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        **tracking,
    )


def _load_tokenizer(
    cfg: RunConfig, accelerator: Accelerator, data_files: list[Path], resume_from: Optional[Path]
) -> tuple[PreTrainedTokenizerBase, Optional[Path]]:
    """The checkpoint's tokenizer when resuming; learned from the data for from-scratch presets; else the
    model's own. Also the prepared-data directory (`finetune prepare`'s output) when that is the data."""
    scratch = modeling.is_scratch_preset(cfg.model.name)
    with accelerator.main_process_first():
        prepared_dir = data_files[0] if len(data_files) == 1 and is_prepared_dir(data_files[0]) else None
        if resume_from is not None:
            tokenizer = modeling.load_tokenizer(str(resume_from))
        elif prepared_dir is not None and scratch:
            tokenizer = modeling.load_tokenizer(str(prepared_dir / "tokenizer"))
        else:
            tokenizer = modeling.new_run_tokenizer(cfg, data_files)
    return tokenizer, prepared_dir


def _model_source(cfg: RunConfig, resume_from: Optional[Path]) -> str:
    """Where the weights come from: the checkpoint when resuming, except for LoRA runs, whose
    checkpoints hold only the adapter: their base model comes from model.name."""
    if cfg.model.lora and modeling.is_scratch_preset(cfg.model.name):
        raise FinetuneError(
            "--lora adapts a pretrained model; with a from-scratch preset train all weights (drop --lora)"
        )
    return str(resume_from) if resume_from is not None and not cfg.model.lora else cfg.model.name


def _load_data(
    cfg: RunConfig,
    accelerator: Accelerator,
    tokenizer: PreTrainedTokenizerBase,
    model_source: str,
    data_files: list[Path],
    val_files: Optional[list[Path]],
    prepared_dir: Optional[Path],
    say: Callable[[str], None],
) -> PreparedData:
    """The token blocks (or supervised examples), from the cache when it holds them."""
    model_config = modeling.load_model_config(model_source, cfg.model.trust_remote_code)
    context = modeling.context_length(model_config)
    if prepared_dir is not None:
        block_size = cfg.data.block_size or read_manifest(prepared_dir)["block_size"]
    else:
        block_size = block_size_for(cfg.data.block_size, context)
    if block_size > context:
        raise FinetuneError(
            f"--block-size {block_size} exceeds the model's context of {context} tokens; "
            f"use --block-size {context} or less"
        )
    with accelerator.main_process_first():
        prepared = (
            load_prepared(prepared_dir, tokenizer, cfg.data.block_size, log=say)
            if prepared_dir
            else prepare_data(data_files, tokenizer, block_size, cfg.data, val_files=val_files, log=say)
        )
    return prepared


def _load_model(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, model_source: str, resume_from: Optional[Path]
) -> PreTrainedModel:
    """The transformers model to train: built, loaded or resumed, with LoRA adapters when asked."""
    import torch

    t = cfg.train
    resume_fix = run_state.earlier_checkpoint_fix(resume_from) if resume_from is not None else None
    if modeling.is_scratch_preset(cfg.model.name) and resume_from is None:
        model = modeling.build_scratch_model(cfg.model.name, tokenizer, t.seed)
    else:
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
    if cfg.model.lora:
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
    if resume_from is not None and cfg.model.lora:  # a full checkpoint's weights were checked as they loaded
        modeling.require_finite(model, resume_from, resume_fix)
    return model


def _fast_paths(
    cfg: RunConfig, lm: PreTrainedModel, accelerator: Accelerator, say: Callable[[str], None]
) -> tuple[torch.nn.Module, int, int, str]:
    """Fast paths (fast_paths.py, cpu_kernels.py): each on by default with CUDA, off on CPU, each with a flag.

    Returns the module that trains, the vocabulary size, the embeddings' rows (padded) and the
    prefix the loss wrapper adds to parameter names (how this run's optimizer names and sizes
    parameters differently from a checkpoint: optimizer_state.portable).
    """
    import torch

    t, cuda = cfg.train, accelerator.device.type == "cuda"
    if cuda and t.tf32:
        fast_paths.enable_tf32()
    use_chunked_loss = _use_chunked_loss(t, lm, cfg.model.lora, cuda, say)
    # Padding needs the chunked loss, which keeps the padded ids out of the softmax.
    vocab_size = (
        fast_paths.pad_vocabulary(lm)
        if use_chunked_loss and fast_paths.resolve(t.pad_vocab, cuda)
        else lm.get_input_embeddings().weight.shape[0]
    )
    modeling.freeze_parameters(lm, t.freeze_layers, t.train_only_blocks)  # after padding, which makes new embeddings
    model = fast_paths.with_chunked_loss(lm, vocab_size) if use_chunked_loss else lm
    wrapper_prefix = fast_paths.LOSS_WRAPPER_PREFIX if use_chunked_loss else ""
    padded_rows = lm.get_input_embeddings().weight.shape[0]
    if fast_paths.resolve(t.compile, cuda):
        model = torch.compile(model)  # compile fuses dropout and GELU itself: no CPU kernels with it
    elif t.cpu_kernels if t.cpu_kernels is not None else not cuda:
        swapped = cpu_kernels.apply(lm)
        if swapped:
            say(f"CPU fast paths: {', '.join(swapped)} (--no-cpu-kernels turns them off)")
    return model, vocab_size, padded_rows, wrapper_prefix


def _use_chunked_loss(
    t: TrainConfig, lm: PreTrainedModel, adapter: bool, cuda: bool, say: Callable[[str], None]
) -> bool:
    use = fast_paths.resolve(t.fused_loss, cuda) and fast_paths.supports_chunked_loss(lm) and not adapter
    if t.fused_loss and not use:
        say(
            "warning: --fused-loss is not available for this model (LoRA or an unlisted architecture); "
            "using the model's own loss"
        )
    return use


def _loaders_and_optimizer(
    t: TrainConfig,
    prepared: PreparedData,
    tokenizer: PreTrainedTokenizerBase,
    model: torch.nn.Module,
    accelerator: Accelerator,
    say: Callable[[str], None],
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader, Any, Optional[DataLoader]]:
    """The data loaders, the train sampler and the optimizer; the model and train loader prepared by accelerate."""
    pad = modeling.pad_id(tokenizer)
    train_loader = make_dataloader(prepared.train, t.batch_size, t.seed, shuffle=True, pad_id=pad)
    # The unprepared loader's sampler: it sets each epoch's shuffle (batching.endless_batches).
    train_sampler = train_loader.sampler
    val_loader = (
        make_dataloader(prepared.val, t.batch_size, t.seed, shuffle=False, pad_id=pad)
        if prepared.val is not None
        else None
    )
    optimizer = build_optimizer(model, t.optimizer, t.lr, t.weight_decay, cuda=accelerator.device.type == "cuda")
    # The validation loader stays unprepared: evaluate() splits its batches over the processes
    # itself, without the repeated samples accelerate pads the last batch with.
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None and len(val_loader) > t.eval_batches:
        say(
            f"validation: {t.eval_batches} of the {len(val_loader)} validation batches, evenly spaced over the split "
            f"(train.eval_batches: {t.eval_batches}; raise it in a --config file to validate on more)"
        )
    return model, optimizer, train_loader, train_sampler, val_loader


def _resume(run: Run, saved: TrainingState, changes: list[str]) -> Progress:
    """Continue from the checkpoint: its optimizer state, scaler, counters and LR schedule.

    The generator states are only read here: fit() restores them last, just before the first step.
    """
    t, checkpoint = run.cfg.train, run.resumed_from
    to_local = partial(
        optimizer_state.localized,
        wrapper_prefix=run.wrapper_prefix,
        padded_rows=run.padded_rows,
        true_rows=run.vocab_size,
    )
    if not run_state.restore_optimizer(
        saved, checkpoint, run.model, run.optimizer, run.world > 1, run.is_main, to_local
    ):
        run.log("warning: this checkpoint has no optimizer state (saved under DeepSpeed); the optimizer starts afresh")
    # The restored optimizer holds the saved settings: this run's --weight-decay applies from here
    # (its --lr through the scheduler). Group 0 holds the decayed weights (build_optimizer).
    run.optimizer.param_groups[0]["weight_decay"] = t.weight_decay
    run_state.load_scaler(checkpoint, run.accelerator.scaler)
    run.resumed_rng = run_state.load_rng_state(checkpoint)
    progress = Progress(
        step=saved.step,
        tokens_seen=saved.tokens_seen,
        epoch=saved.epoch,
        batches_in_epoch=saved.batches_in_epoch,
        val_loss=saved.val_loss,
        initial_val_loss=metrics.initial_val_loss(run.run_dir / metrics.FILE_NAME),  # not evaluated again
        last_checkpoint=checkpoint,
    )
    run.schedule, plan = run_state.resumed_schedule(saved, t, progress.step, run.total_steps)
    run.log(
        f"resuming run '{run.run_dir.name}' from {checkpoint.name} (step {progress.step})"
        + (f"; changed: {', '.join(changes)}" if changes else "")
        + plan
    )
    if saved.num_processes != run.world:
        run.log(
            f"warning: the run was saved with {saved.num_processes} processes and resumes with "
            f"{run.world}; the data order after this point differs from an uninterrupted run"
        )
    return progress


def _start_run_dir(run: Run, step: int) -> None:
    """Every check has passed (config, data, tokenizer, checkpoint files): only now does the run
    directory change, so a refused start leaves it as it was."""
    t = run.cfg.train
    if run.is_main:
        kept_metrics = None if t.overwrite else metrics.records_until(run.run_dir / metrics.FILE_NAME, step)
        _prepare_run_dir(run.run_dir, run.cfg, t.overwrite, kept_metrics)
    run.accelerator.wait_for_everyone()


# accelerate's mixed_precision values, as the run header says them
PRECISION_WORDS = {"no": "fp32", "bf16": "bf16 mixed", "fp16": "fp16 mixed", "fp8": "fp8 mixed"}


def _announce(run: Run, steps_per_epoch: int) -> None:
    """The run header: what trains, where, at which precision, and how much data a step and the run take."""
    t = run.cfg.train
    n_params = modeling.count_parameters(run.model)
    n_trainable = modeling.count_trainable(run.model)
    effective_batch = t.batch_size * t.grad_accum * run.world
    trainable = f" ({n_trainable / 1e6:.2f}M trainable)" if n_trainable != n_params else ""
    precision = PRECISION_WORDS.get(run.accelerator.mixed_precision, run.accelerator.mixed_precision)
    split = (
        f" ({t.batch_size} per device x {t.grad_accum} accumulation x {run.world} processes)"
        if t.grad_accum > 1 or run.world > 1
        else ""
    )
    run.log(
        f"run '{run.run_dir.name}': {run.cfg.model.name}, {n_params / 1e6:.1f}M parameters{trainable}, "
        f"on {_device_words(run)}, precision {precision}; {run.total_steps} steps of {effective_batch} blocks{split} "
        f"of {run.prepared.block_size} tokens = {effective_batch * run.prepared.block_size:,} tokens per step; "
        f"~{run.total_steps / steps_per_epoch:.1f} epochs (passes over the training data)"
    )


def _device_words(run: Run) -> str:
    """'CPU', 'GPU (NVIDIA H200)', '4 GPUs (NVIDIA H200)': not accelerate's 'cpu' / 'cuda:0'."""
    if not run.cuda:
        return run.accelerator.device.type.upper()
    import torch

    count = f"{run.world} GPUs" if run.world > 1 else "GPU"
    return f"{count} ({torch.cuda.get_device_name(run.accelerator.device)})"


def _check_run_files(run_dir: Path) -> None:
    """The run's own files are what this run will append to and replace: damaged ones are named up front."""
    metrics_path = run_dir / metrics.FILE_NAME
    if metrics_path.exists() or metrics_path.is_symlink():
        metrics.read(metrics_path)
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
        metrics.rewrite(run_dir / metrics.FILE_NAME, kept_metrics)


# ---------------------------------------------------------------------------------------------
# fit: the loop
# ---------------------------------------------------------------------------------------------


def fit(run: Run, progress: Progress) -> None:
    """Train until total_steps (or a signal): one optimizer step per pass, then whatever falls due."""
    from tqdm.auto import tqdm

    t, total_steps = run.cfg.train, run.total_steps
    bar = tqdm(
        total=total_steps,
        initial=min(progress.step, total_steps),
        disable=not run.is_main,
        dynamic_ncols=True,
        desc="training",
    )
    run.model.train()
    progress.window_start, progress.window_tokens = time.perf_counter(), 0
    batches = endless_batches(
        run.train_loader, run.train_sampler, progress.epoch, progress.batches_in_epoch, run.accelerator
    )
    if run.resumed_rng is not None:
        # Last, so nothing before the first step (model loading, iterator set-up) draws from the restored streams.
        run_state.restore_rng_state(run.resumed_rng)
    # The bar is closed however the loop ends, so an error's message starts on its own line.
    with bar, StopSignals() as signals:
        if progress.step == 0 and run.val_loader is not None and t.eval_every:
            validate_before_training(run, progress, bar)
        while progress.step < total_steps and not signals.received:
            step_loss, step_tokens = _forward_backward(run, progress, batches)
            if run.sync_every > 1:
                # No host sync inside the step: losses are read back every sync_every steps.
                progress.pending_losses.append(step_loss)
            elif _skip_nonfinite_step(run, progress, step_loss):
                continue
            progress.nonfinite_streak = 0
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.tokens_seen += step_tokens
            step = progress.step
            if progress.pending_losses and (
                step % run.sync_every == 0 or step % t.log_every == 0 or step == total_steps or signals.received
            ):
                _read_pending_losses(progress)

            lr, tokens_per_s, mfu = _throughput(run, progress)
            bar.update(1)
            _show_on_bar(bar, progress.train_loss, lr, tokens_per_s, mfu)
            if run.is_main and (step % t.log_every == 0 or step == total_steps):
                log_metrics(run, progress, lr, tokens_per_s, mfu)

            if run.val_loader is not None and t.eval_every and (step % t.eval_every == 0 or step == total_steps):
                validate(run, progress, bar)

            if t.sample_every and step % t.sample_every == 0 and (run.is_main or run.sharded_weights):
                write_samples(run, progress)

            if (t.save_every and step % t.save_every == 0) or step == total_steps or signals.received:
                progress.last_checkpoint = save_checkpoint(run, progress)
        last = progress.last_checkpoint
        if (
            signals.received
            and progress.step > 0
            and (last is None or last.name != ckpt.checkpoint_name(progress.step))
        ):
            progress.last_checkpoint = save_checkpoint(run, progress)  # a signal before the first step completed
    progress.stopped_by = signals.received


def _forward_backward(run: Run, progress: Progress, batches: Iterator) -> tuple[torch.Tensor, int]:
    """One optimizer step's micro-steps, gradients clipped; the step's loss (mean over the processes,
    still on the device) and the tokens the step trains on, over all processes."""
    import torch

    t, accelerator, model = run.cfg.train, run.accelerator, run.model
    loss_sum = torch.zeros((), device=accelerator.device)
    for micro in range(t.grad_accum):
        progress.epoch, progress.batches_in_epoch, batch = next(batches)
        # Skip the gradient all-reduce on all but the last micro-step (DDP).
        sync = nullcontext() if micro == t.grad_accum - 1 else accelerator.no_sync(model)
        with sync:
            loss = forward_loss(model, batch) / t.grad_accum
            accelerator.backward(loss)
        loss_sum += loss.detach()
        progress.window_tokens += _num_tokens(batch) * run.world
    if t.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
    step_loss = accelerator.reduce(loss_sum, reduction="mean").detach()
    return step_loss, _num_tokens(batch) * run.world * t.grad_accum


def _skip_nonfinite_step(run: Run, progress: Progress, step_loss: torch.Tensor) -> bool:
    """Read the loss back; a non-finite one drops the step's gradients (the run stops after a few in a row).

    The fp16 scaler's overflow steps keep a finite loss, so they never count here.
    """
    progress.train_loss = step_loss.item()
    if math.isfinite(progress.train_loss):
        return False
    progress.nonfinite_streak += 1
    run.optimizer.zero_grad(set_to_none=True)
    if progress.nonfinite_streak >= MAX_NONFINITE_STEPS:
        last = progress.last_checkpoint
        kept = f"; the last good checkpoint is {last}" if last else ""
        raise FinetuneError(
            f"the loss was not finite for {MAX_NONFINITE_STEPS} steps in a row (at step {progress.step + 1}); "
            f"lower --lr or use --precision fp32/bf16{kept}"
        )
    return True


def _read_pending_losses(progress: Progress) -> None:
    import torch

    values = torch.stack(progress.pending_losses).float().tolist()
    progress.pending_losses.clear()
    step = progress.step
    if not all(math.isfinite(v) for v in values):
        raise FinetuneError(
            f"the loss was not finite between steps {step - len(values) + 1} and {step}; lower --lr or use "
            f"--precision fp32/bf16 (the last good checkpoint is kept; --loss-sync-every 1 skips bad steps instead)"
        )
    progress.train_loss = values[-1]


def _throughput(run: Run, progress: Progress) -> tuple[float, float, Optional[float]]:
    """The LR now, and tokens per second and MFU (None without a known peak) since the last metrics record."""
    elapsed = time.perf_counter() - progress.window_start
    lr = run.scheduler.get_last_lr()[0]
    tokens_per_s = progress.window_tokens / max(elapsed, 1e-9)
    peak = run.device_peak_flops
    mfu = tokens_per_s * run.flops_per_token / peak if peak else None
    return lr, tokens_per_s, mfu


def _show_on_bar(bar: tqdm, loss: float, lr: float, tokens_per_s: float, mfu: Optional[float]) -> None:
    bar.set_postfix(
        loss=f"{loss:.3f}",
        lr=f"{lr:.1e}",
        tok_s=f"{tokens_per_s:,.0f}",
        **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}),
    )


def log_metrics(run: Run, progress: Progress, lr: float, tokens_per_s: float, mfu: Optional[float]) -> None:
    """A training record in metrics.jsonl and the trackers (rank 0); the throughput window starts again."""
    record = {
        "step": progress.step,
        "epoch": progress.epoch,
        "loss": round(progress.train_loss, 6),
        "lr": lr,
        "tokens_seen": progress.tokens_seen,
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_memory_mb": round(metrics.peak_memory_bytes(run.baseline_rss) / 1e6, 1),
        **({"mfu": round(mfu, 4)} if mfu is not None else {}),
    }
    metrics.append(run.run_dir / metrics.FILE_NAME, record)
    trackers.log(run.accelerator, record)
    progress.window_start, progress.window_tokens = time.perf_counter(), 0


def _validation_record(step: int, val_loss: float) -> dict:
    """A validation pass as metrics.jsonl and the trackers record it."""
    return {"step": step, "val_loss": round(val_loss, 6), "val_perplexity": round(perplexity(val_loss), 4)}


def validate(run: Run, progress: Progress, bar: tqdm) -> None:
    """The validation loss (every rank: evaluate() is collective), recorded and shown by rank 0."""
    t = run.cfg.train
    progress.val_loss = evaluate(run.model, run.val_loader, t.eval_batches, run.accelerator)
    ppl = perplexity(progress.val_loss)
    if run.is_main:
        record = _validation_record(progress.step, progress.val_loss)
        metrics.append(run.run_dir / metrics.FILE_NAME, record)
        trackers.log(run.accelerator, record)
        run.plot.redraw()
        bar.write(f"step {progress.step}: validation loss {progress.val_loss:.4f}, perplexity {ppl:.2f}")


def validate_before_training(run: Run, progress: Progress, bar: tqdm) -> None:
    """Step 0: the validation loss of the model as loaded, before any update (no RNG is drawn: eval mode).

    Recorded under keys of its own (metrics.INITIAL_VAL_LOSS); a resumed run reads it back from metrics.jsonl.
    """
    progress.initial_val_loss = evaluate(run.model, run.val_loader, run.cfg.train.eval_batches, run.accelerator)
    initial = perplexity(progress.initial_val_loss)
    if run.is_main:
        record = _validation_record(0, progress.initial_val_loss)
        metrics.append(
            run.run_dir / metrics.FILE_NAME,
            {
                "step": 0,
                metrics.INITIAL_VAL_LOSS: record["val_loss"],
                metrics.INITIAL_VAL_PERPLEXITY: record["val_perplexity"],
            },
        )
        # Trackers show it as the first validation point (val/loss at step 0); so does loss.png.
        trackers.log(run.accelerator, record)
        run.plot.redraw()
        bar.write(
            f"step 0 (before training): validation loss {progress.initial_val_loss:.4f}, perplexity {initial:.2f}"
        )


def write_samples(run: Run, progress: Progress) -> None:
    """Two unconditional samples in samples/samples-<step>.txt (under sharded weights every rank samples)."""
    import torch

    from finetune.generation import SAMPLE_DELIMITER, generate_texts

    gen_cfg = GenerateConfig(
        prompts=[""], n=2, max_new_tokens=run.cfg.train.sample_tokens, temperature=0.8, stream=False
    )
    # Sampling draws random numbers; fork the RNG so it does not change the training run.
    with torch.random.fork_rng(devices=[]):
        sampler_model = state_dicts.inner_model(run.accelerator.unwrap_model(run.model))
        texts = generate_texts(
            sampler_model,
            run.tokenizer,
            gen_cfg,
            suppress_ids=list(range(run.vocab_size, run.padded_rows)),
            synced=run.sharded_weights,
        )
    run.model.train()
    if run.is_main:
        body = f"\n{SAMPLE_DELIMITER}\n".join(texts)
        path = run.run_dir / "samples" / f"samples-{progress.step:06d}.txt"
        files.write_atomic(path, body + "\n", "training samples", durable=False)
        if run.cfg.train.print_samples:
            print_above_bar(samples_for_screen(texts, progress.step, path))


# Control characters an early model may sample (a carriage return, an escape sequence) would garble the screen.
SCREEN_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def samples_for_screen(texts: list[str], step: int, path: Path) -> str:
    """The samples as gpt-2-simple printed them while training: each under a ======== SAMPLE n ======== line."""
    lines = [f"samples at step {step} (saved in {path}):"]
    for number, text in enumerate(texts, start=1):
        lines += [f"======== SAMPLE {number} ========", SCREEN_UNSAFE.sub("\ufffd", text.rstrip("\n"))]
    return "\n".join([*lines, "=" * 26])


def print_above_bar(text: str) -> None:
    """Print on the screen while the progress bar runs: tqdm clears the bar, prints, then redraws it."""
    from tqdm.auto import tqdm

    tqdm.write(text)


def save_checkpoint(run: Run, progress: Progress) -> Path:
    """Save a checkpoint of this step; every rank calls it (the gathers are collective), rank 0 writes.

    Weights holding NaN/inf are refused rather than saved over the last good checkpoint.
    """
    import torch

    accelerator, model, step = run.accelerator, run.model, progress.step
    unwrapped = state_dicts.inner_model(accelerator.unwrap_model(model))
    state_dict = state_dicts.inner_state_dict(accelerator.get_state_dict(model), unwrapped)
    state_dict = state_dicts.drop_tied_aliases(
        state_dicts.unpad_state_dict(state_dict, unwrapped, run.vocab_size), unwrapped
    )
    finite = all(torch.isfinite(p).all() for p in state_dict.values() if p.is_floating_point())
    if run.world > 1:  # under FSDP only rank 0 holds the gathered weights: all ranks must stop together
        finite = (
            accelerator.reduce(torch.tensor(float(finite), device=accelerator.device), reduction="sum").item()
            == run.world
        )
    if not finite:
        raise FinetuneError(
            f"the weights hold NaN/inf at step {step}; not saving them over the last good checkpoint. "
            f"Lower --lr or use --precision fp32/bf16, then resume"
        )
    state = _training_state(run, progress)
    # Collective under FSDP (every rank gives its shard); only rank 0 writes the result.
    full_optimizer = optimizer_state.gather(model, run.optimizer, run.world > 1) if run.optimizer_saved else None
    if run.is_main and full_optimizer is not None:
        full_optimizer = optimizer_state.portable(full_optimizer, run.wrapper_prefix, run.padded_rows, run.vocab_size)
    rng = run_state.capture_rng_state()
    path = None
    if run.is_main:
        contents = partial(_write_checkpoint, run, unwrapped, state_dict, state, full_optimizer, rng)
        path = ckpt.save_checkpoint(run.run_dir, step, contents, run.cfg.train.keep)
        print_above_bar(f"step {step}: saved {path}")
    accelerator.wait_for_everyone()
    return path or run.run_dir / ckpt.checkpoint_name(step)


def _training_state(run: Run, progress: Progress) -> TrainingState:
    """What state.json records for this step."""
    return TrainingState(
        step=progress.step,
        tokens_seen=progress.tokens_seen,
        epoch=progress.epoch,
        batches_in_epoch=progress.batches_in_epoch,
        val_loss=progress.val_loss,
        num_processes=run.world,
        config=run.cfg.to_dict(),
        data_key=run.prepared.key,
        command=run.command,
        data_mode=run.prepared.mode,
        chat=run.prepared.chat,
        optimizer_saved=run.optimizer_saved,
        optimizer_format=optimizer_state.FORMAT,
        schedule=run.schedule,
    )


def _write_checkpoint(
    run: Run,
    model: PreTrainedModel,
    state_dict: dict,
    state: TrainingState,
    full_optimizer: Optional[dict],
    rng: dict,
    tmp: Path,
) -> None:
    """Fill the checkpoint's temporary directory (rank 0): weights, tokenizer, then training_state/."""
    if run.cfg.model.lora:  # peft writes adapter_config.json + adapter_model.safetensors
        # From the gathered state dict: under FSDP the model's own tensors are shards.
        model.save_pretrained(tmp, state_dict=state_dict)
    else:
        padded_size, model.config.vocab_size = model.config.vocab_size, run.vocab_size
        try:  # checkpoints never carry the padding rows
            model.save_pretrained(tmp, state_dict=state_dict)
        finally:
            model.config.vocab_size = padded_size
    ckpt.pause_point("model-written", state.step)
    run.tokenizer.save_pretrained(tmp)
    ckpt.pause_point("tokenizer-written", state.step)
    scaler = run.accelerator.scaler
    run_state.write_state_files(
        tmp / ckpt.STATE_DIR,
        state,
        full_optimizer,
        run.scheduler.state_dict(),
        scaler.state_dict() if scaler is not None else None,
        rng,
    )


def finish(run: Run, progress: Progress) -> TrainResult:
    """Say how the run ended and take the processes down together."""
    if progress.stopped_by:
        run.log(
            f"stopped by {progress.stopped_by} at step {progress.step}; saved {progress.last_checkpoint}. "
            f"Resume with the same `finetune train` command "
            f"(run '{run.run_dir.name}' continues from its latest checkpoint)"
        )
    elif run.is_main:
        run.log(f"done: {progress.step} steps; checkpoint {progress.last_checkpoint}")
    if run.plot.close():
        run.log(f"loss plot: {run.plot.path}")
    before_after = change_line(progress.initial_val_loss, progress.val_loss)
    if before_after and run.is_main and not progress.stopped_by:  # the last line: did fine-tuning help?
        run.log(before_after)
    # All ranks reach the end together before end_training destroys the process group: a rank
    # tearing its gloo/NCCL connections down while another still uses them aborts ("terminate
    # called without an active exception").
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return TrainResult(run.run_dir, progress.last_checkpoint, progress.step, progress.val_loss, progress.stopped_by)
