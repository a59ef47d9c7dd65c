"""The training loop: flat, on accelerate (one process, several GPUs, or `accelerate launch`).

Shape (nanoGPT's train.py is the model): set up data, model, optimizer and schedule; then one
`while step < total_steps` loop with `if step % every == 0` blocks for logging, evaluation,
samples and checkpoints. SIGINT/SIGTERM finish the current step, save, and exit.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from finetune import checkpoint as ckpt
from finetune import data as data_lib
from finetune import modeling
from finetune.config import GenerateConfig, RunConfig, dump_yaml
from finetune.errors import FinetuneError

DEFAULT_STEPS = 1000
MAX_NONFINITE_STEPS = 3  # consecutive non-finite losses before the run stops
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


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


def default_run_name(paths: list[str]) -> str:
    """Named after the first data file ('stories.txt' -> 'stories'), like a user would name it."""
    first = Path(paths[0].rstrip("/"))
    stem = first.stem if first.suffix else first.name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")
    return name or "run1"


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


def build_optimizer(model, lr: float, weight_decay: float, fused: bool):
    """AdamW; biases, norms and other 1-D parameters get no weight decay (standard GPT practice)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


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


def _log_to(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _cycle(loader, sampler, epoch: int):
    """Endless batches; each pass over the data reshuffles via the sampler's epoch."""
    while True:
        sampler.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def evaluate(model, loader, max_batches: int, accelerator) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            loss = model(input_ids=batch, labels=batch).loss.detach().float().reshape(1)
            gathered = accelerator.gather_for_metrics(loss)
            total += gathered.sum().item()
            count += gathered.numel()
    model.train()
    return total / max(count, 1)


def train(cfg: RunConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Run training as configured; returns where the run and its last checkpoint are."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    t = cfg.train
    files = data_lib.resolve_files(cfg.data.paths)
    val_files = data_lib.resolve_files([cfg.data.val_file]) if cfg.data.val_file else None
    run_name = t.run_name or default_run_name(cfg.data.paths)
    run_dir = Path(t.runs_dir) / run_name
    if ckpt.list_checkpoints(run_dir) and not t.overwrite:
        raise FinetuneError(
            f"run '{run_name}' already has checkpoints in {run_dir}; pass --overwrite to start it over "
            f"or --run-name NEW for a separate run"
        )

    accelerator = Accelerator(mixed_precision=resolve_precision(t.precision))
    is_main = accelerator.is_main_process
    say = log if is_main else (lambda _msg: None)
    set_seed(t.seed)

    # Tokenizer: learned from the data for from-scratch presets, else the model's own.
    cache_dir = data_lib.cache_root(cfg.data.cache_dir)
    scratch = modeling.is_scratch_preset(cfg.model.name)
    with accelerator.main_process_first():
        if scratch:
            docs = data_lib.iter_documents(files, cfg.data.eos_string, cfg.data.line_by_line, cfg.data.encoding)
            tokenizer = modeling.train_scratch_tokenizer(cfg.model.name, docs, data_lib.files_digest(files), cache_dir)
        else:
            tokenizer = modeling.load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    model_config = modeling.load_model_config(cfg.model.name, cfg.model.trust_remote_code)
    context = modeling.context_length(model_config)
    block_size = cfg.data.block_size or min(1024, context)
    if block_size > context:
        raise FinetuneError(f"--block-size {block_size} exceeds the model's context of {context} tokens; use --block-size {context} or less")

    with accelerator.main_process_first():
        prepared = data_lib.prepare_data(
            files, tokenizer, block_size,
            line_by_line=cfg.data.line_by_line, val_fraction=cfg.data.val_fraction, val_files=val_files,
            eos_string=cfg.data.eos_string, encoding=cfg.data.encoding, cache_dir=cfg.data.cache_dir, log=say,
        )

    if scratch:
        model = modeling.build_scratch_model(cfg.model.name, tokenizer, t.seed)
    else:
        model = modeling.load_pretrained_model(cfg.model.name, cfg.model.trust_remote_code, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    train_loader = data_lib.make_dataloader(prepared.train, t.batch_size, t.seed, shuffle=True, drop_last=False)
    train_sampler = train_loader.sampler
    val_loader = (
        data_lib.make_dataloader(prepared.val, t.batch_size, t.seed, shuffle=False, drop_last=False)
        if prepared.val is not None else None
    )
    optimizer = build_optimizer(model, t.lr, t.weight_decay, fused=accelerator.device.type == "cuda")
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    steps_per_epoch = max(1, math.ceil(len(train_loader) / t.grad_accum))
    total_steps = t.steps or (math.ceil(t.epochs * steps_per_epoch) if t.epochs else DEFAULT_STEPS)
    warmup_steps = int(t.warmup * total_steps) if t.warmup < 1 else int(t.warmup)
    # The scheduler is stepped by hand once per optimizer step (not prepared by accelerate, which
    # would step it once per process), so the schedule counts optimizer steps.
    scheduler = get_scheduler(SCHEDULES[t.schedule], optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)

    resolved = replace(cfg, train=replace(t, run_name=run_name), data=replace(cfg.data, block_size=prepared.block_size))
    if is_main:
        if t.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        try:
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            ckpt.remove_leftovers(run_dir)
            dump_yaml(resolved, run_dir / "config.yaml")
        except OSError as exc:
            raise FinetuneError(f"cannot write to run directory {run_dir}: {exc.strerror or exc}; choose a writable --runs-dir") from None
    accelerator.wait_for_everyone()

    n_params = modeling.count_parameters(model)
    world = accelerator.num_processes
    effective_batch = t.batch_size * t.grad_accum * world
    say(
        f"run '{run_name}': {cfg.model.name}, {n_params / 1e6:.1f}M parameters, {accelerator.device}, "
        f"precision {accelerator.mixed_precision}; {total_steps} steps of {effective_batch} blocks "
        f"({t.batch_size} per device x {t.grad_accum} accumulation x {world} processes) = "
        f"{effective_batch * prepared.block_size:,} tokens per step; ~{total_steps / steps_per_epoch:.1f} epochs"
    )

    metrics_path = run_dir / "metrics.jsonl"
    step, tokens_seen = 0, 0
    val_loss: Optional[float] = None
    last_checkpoint: Optional[Path] = None
    nonfinite_streak = 0
    batches = _cycle(train_loader, train_sampler, epoch=0)
    epoch = 0

    def save() -> Path:
        state = {"step": step, "tokens_seen": tokens_seen, "epoch": epoch, "val_loss": val_loss}
        unwrapped = accelerator.unwrap_model(model)
        state_dict = accelerator.get_state_dict(model)

        def write_contents(tmp: Path) -> None:
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            state_dir = tmp / ckpt.STATE_DIR
            state_dir.mkdir()
            torch.save(optimizer.state_dict(), state_dir / "optimizer.pt")
            torch.save(scheduler.state_dict(), state_dir / "scheduler.pt")
            (state_dir / "state.json").write_text(json.dumps(state, indent=1))

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
            texts = generate_texts(accelerator.unwrap_model(model), tokenizer, gen_cfg)
        model.train()
        body = f"\n{'=' * 20}\n".join(texts)
        (run_dir / "samples" / f"samples-{step:06d}.txt").write_text(body + "\n", encoding="utf-8")

    bar = tqdm(total=total_steps, disable=not is_main, dynamic_ncols=True, desc="training")
    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    with StopSignals() as signals:
        while step < total_steps:
            loss_sum = torch.zeros((), device=accelerator.device)
            for micro in range(t.grad_accum):
                epoch, batch = next(batches)
                # Skip the gradient all-reduce on all but the last micro-step (DDP).
                sync = nullcontext() if micro == t.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    loss = model(input_ids=batch, labels=batch).loss / t.grad_accum
                    accelerator.backward(loss)
                loss_sum += loss.detach()
                window_tokens += batch.numel() * world
            if t.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            train_loss = accelerator.reduce(loss_sum, reduction="mean").item()
            if not math.isfinite(train_loss):
                nonfinite_streak += 1
                optimizer.zero_grad(set_to_none=True)
                if nonfinite_streak >= MAX_NONFINITE_STEPS:
                    bar.close()
                    raise FinetuneError(
                        f"the loss was not finite for {MAX_NONFINITE_STEPS} steps in a row (step {step}); "
                        f"lower --lr or use --precision fp32/bf16; checkpoints written so far are intact"
                    )
                continue
            nonfinite_streak = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += batch.numel() * world * t.grad_accum

            elapsed = time.perf_counter() - window_start
            lr = scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{window_tokens / max(elapsed, 1e-9):,.0f}")
            if is_main and (step % t.log_every == 0 or step == total_steps):
                _log_to(metrics_path, {
                    "step": step, "epoch": epoch, "loss": round(train_loss, 6), "lr": lr,
                    "tokens_seen": tokens_seen, "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 1),
                })
                window_start, window_tokens = time.perf_counter(), 0

            if val_loader is not None and t.eval_every and (step % t.eval_every == 0 or step == total_steps):
                val_loss = evaluate(model, val_loader, t.eval_batches, accelerator)
                perplexity = math.exp(min(val_loss, 50))
                if is_main:
                    _log_to(metrics_path, {"step": step, "val_loss": round(val_loss, 6), "val_perplexity": round(perplexity, 4)})
                    bar.write(f"step {step}: validation loss {val_loss:.4f}, perplexity {perplexity:.2f}")

            if is_main and t.sample_every and step % t.sample_every == 0:
                write_samples()

            done = step == total_steps
            if (t.save_every and step % t.save_every == 0) or done or signals.received:
                last_checkpoint = save()
            if signals.received:
                break
    bar.close()

    if signals.received:
        say(
            f"stopped by {signals.received} at step {step}; saved {last_checkpoint}. "
            f"Continue with the same `finetune train` command and --run-name {run_name}"
        )
    elif is_main:
        say(f"done: {step} steps; checkpoint {last_checkpoint}")
    accelerator.end_training()
    return TrainResult(run_dir, last_checkpoint, step, val_loss, signals.received)
