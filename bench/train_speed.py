"""Training throughput: finetune's loop vs HF Trainer, same model, batch, sequence, precision and data.

    python bench/train_speed.py --preset tiny                      # CPU: the tiny preset (target >= 1.3x)
    python bench/train_speed.py --preset gpt2 --device cuda        # GPU: GPT-2 124M, bf16, seq 1024, batch 16
    python bench/train_speed.py --preset tiny --before ../old      # also finetune as an earlier checkout has it
    python bench/train_speed.py --preset tiny --plot-every 5       # also: validation every 5 steps, loss.png on/off

`--before DIR` adds a row for the finetune of another checkout (e.g. `git worktree add ../old <commit>`), run by
that checkout's own copy of this script in alternating rounds with the others: a refactor shows it stayed in noise.

`--plot-every N` adds two rows that validate every N steps, one redrawing loss.png at each validation (as
training does) and one with the drawing switched off: the same tokens/s shows the plot stays off the hot path.

Each side runs in its own process (clean memory statistics) on the same token blocks. Tokens/s is
measured after warm-up steps (compilation, allocator growth) for both. GPU rows add MFU (nanoGPT's
6N + 12LHQT FLOPs per token against the device's dense bf16 peak) and peak allocated memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "recipes.txt"
PRESETS = {  # model, batch, sequence, steps, warm-up steps
    "tiny": ("tiny", 16, 128, 60, 10),
    "gpt2": ("gpt2-124m", 16, 1024, 60, 15),
}


def build_model_dir(name: str, root: Path) -> Path:
    """A random-weight model directory: the tiny preset (tokenizer learned from the sample) or GPT-2 124M."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune import learned_tokenizer, modeling
    from finetune.config import DataConfig
    from finetune.documents import training_texts

    texts = training_texts([SAMPLE], DataConfig())
    tokenizer = learned_tokenizer.train_scratch_tokenizer("tiny", texts, "bench", root / "cache")
    if name == "tiny":
        config = modeling.scratch_config("tiny", vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id)
    else:
        config = AutoConfig.for_model("gpt2", vocab_size=50257)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    target = root / name
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def run_ours(
    model_dir: Path,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    precision: str,
    root: Path,
    cpu_kernels=None,
    eval_every: int = 0,
    plot: bool = True,
) -> dict:
    from finetune.api import train

    run_dir = root / "runs"
    name = "ours" if cpu_kernels is None else "ours-plain"
    if eval_every:
        name = "ours-plot" if plot else "ours-noplot"
    if not plot:  # this process only: training asks for drawings, nothing draws
        from finetune.loss_plot import LossPlotter

        LossPlotter.redraw = lambda self: None
        LossPlotter.close = lambda self, wait=True: False
    train(
        str(SAMPLE),
        model=str(model_dir),
        steps=steps,
        batch_size=batch,
        block_size=seq,
        lr=1e-4,
        warmup=0,
        precision=precision,
        eval_every=eval_every,
        sample_every=0,
        save_every=0,
        log_every=1,
        runs_dir=str(run_dir),
        run_name=name,
        cache_dir=str(root / "cache"),
        log=lambda _m: None,
        overwrite=True,
        cpu_kernels=cpu_kernels,
    )
    records = [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
    steady = [m for m in records if "tokens_per_s" in m and m["step"] > warmup]
    return {
        # Equal tokens per step, so total tokens / total time is the harmonic mean of the step rates
        # (what the Trainer side measures); an arithmetic mean would favour the fast steps.
        "tokens_per_s": len(steady) / sum(1 / m["tokens_per_s"] for m in steady),
        "mfu": (sum(m["mfu"] for m in steady) / len(steady)) if "mfu" in steady[0] else None,
        # On CPU, finetune reports RSS growth and Trainer has no counterpart: compare memory on GPU only.
        "peak_memory_gb": steady[-1]["peak_memory_mb"] / 1e3 if "mfu" in steady[0] else None,
    }


def run_trainer(model_dir: Path, batch: int, seq: int, steps: int, warmup: int, precision: str, root: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from finetune import metrics
    from finetune.config import DataConfig
    from finetune.token_cache import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = DataConfig(val_fraction=0, cache_dir=str(root / "cache"))
    prepared = prepare_data([SAMPLE], tokenizer, seq, data, log=lambda _m: None)
    blocks = [
        {"input_ids": torch.from_numpy(prepared.train[i]), "labels": torch.from_numpy(prepared.train[i])}
        for i in range(len(prepared.train))
    ]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cuda = torch.cuda.is_available()

    class Timer(TrainerCallback):
        start = end = None

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step == warmup:
                Timer.start = time.perf_counter()
            if state.global_step == steps:
                Timer.end = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(root / "trainer"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        seed=42,
        bf16=precision == "bf16",
        use_cpu=not cuda,  # Trainer's default optimizer: adamw_torch_fused
    )
    trainer = Trainer(model=model, args=args, train_dataset=blocks, callbacks=[Timer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tokens_per_s = (steps - warmup) * batch * seq / (Timer.end - Timer.start)
    result = {"tokens_per_s": tokens_per_s, "mfu": None, "peak_memory_gb": None}
    if cuda:
        peak = metrics.peak_flops(torch.cuda.get_device_name(0))
        result["mfu"] = tokens_per_s * metrics.flops_per_token(model, seq) / peak if peak else None
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--rounds",
        type=int,
        help="alternating runs of each side; the median is reported [default: 5 on CPU, 1 on CUDA]",
    )
    parser.add_argument("--before", help="a checkout of an earlier commit: adds its finetune as a row")
    parser.add_argument(
        "--plot-every", type=int, default=0, help="adds rows validating every N steps with loss.png drawn / not drawn"
    )
    parser.add_argument("--steps", type=int, help="steps per run [default: the preset's]")
    parser.add_argument(
        "--side", choices=["ours", "ours-plain", "ours-plot", "ours-noplot", "trainer"], help=argparse.SUPPRESS
    )
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    name, batch, seq, steps, warmup = PRESETS[args.preset]
    if args.steps:  # a quick check of the script itself: fewer steps, a shorter warm-up
        steps, warmup = args.steps, min(warmup, args.steps // 2)
    args.rounds = args.rounds or (1 if args.device == "cuda" else 5)  # a GPU is not shared with neighbours
    precision = "bf16" if args.device == "cuda" else "fp32"
    if args.side:  # child process: one side of the comparison
        root = Path(args.root)
        runner = {
            "ours": run_ours,
            "trainer": run_trainer,
            "ours-plain": lambda *a: run_ours(*a, cpu_kernels=False),
            "ours-plot": lambda *a: run_ours(*a, eval_every=args.plot_every),
            "ours-noplot": lambda *a: run_ours(*a, eval_every=args.plot_every, plot=False),
        }[args.side]
        print("RESULT " + json.dumps(runner(root / name, batch, seq, steps, warmup, precision, root)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_model_dir(name, root)
        # On CPU also finetune without its CPU kernels (--no-cpu-kernels), to show what they add.
        sides = ("trainer", "ours") if args.device == "cuda" else ("trainer", "ours-plain", "ours")
        sides += ("before",) if args.before else ()
        sides += ("ours-noplot", "ours-plot") if args.plot_every else ()
        rounds = {side: [] for side in sides}
        for _ in range(args.rounds):  # alternating sides, so a noisy neighbour slows both alike
            for side in sides:
                script, env = Path(__file__), None
                if side == "before":  # the earlier checkout's script and package
                    script = Path(args.before).resolve() / "bench" / "train_speed.py"
                    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
                child_side = "ours" if side == "before" else side
                command = [sys.executable, str(script), "--preset", args.preset, "--device", args.device]
                command += ["--side", child_side, "--root", str(root), "--plot-every", str(args.plot_every)]
                command += ["--steps", str(steps)]
                out = subprocess.run(command, capture_output=True, text=True, env=env)
                if out.returncode:
                    sys.exit(out.stderr[-3000:])
                rounds[side].append(json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:]))
    # Each side's median round by tokens/s.
    results = {side: sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2] for side, runs in rounds.items()}
    base = results["trainer"]["tokens_per_s"]
    print(
        f"{name}: batch {batch} x seq {seq}, {precision}, {steps} steps ({warmup} warm-up), device {args.device}, "
        f"median of {args.rounds} alternating rounds"
    )
    print(
        "per-round finetune/Trainer: "
        + ", ".join(f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x" for t, o in zip(rounds["trainer"], rounds["ours"]))
    )
    print("| loop | tokens/s | MFU | peak memory GB | vs Trainer |")
    print("| --- | --- | --- | --- | --- |")
    labels = {"trainer": "HF Trainer", "ours-plain": "finetune --no-cpu-kernels", "ours": "finetune"}
    if args.before:
        labels["before"] = f"finetune at {args.before}"
    labels["ours-noplot"] = f"finetune, validation every {args.plot_every} steps, no loss.png"
    labels["ours-plot"] = f"finetune, validation every {args.plot_every} steps, loss.png redrawn"
    for side, label in labels.items():
        if side not in results:
            continue
        r = results[side]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        mem = f"{r['peak_memory_gb']:.2f}" if r["peak_memory_gb"] is not None else "-"
        print(f"| {label} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} | {r['tokens_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
