"""Which learning rate should `--lora` use by default? Full fine-tuning and LoRA side by side.

    python bench/lora_lr.py                 # base: tiny preset pretrained on stdlib docs; tuned on recipes
    python bench/lora_lr.py --base-steps 400 --steps 150 --lrs 1e-4,1e-3

A base model is pretrained (from scratch, tiny preset) on one corpus — the documentation text of
Python's standard library, English prose about code — then fine-tuned on another, the bundled
recipes, with the same steps and schedule: all weights at the full fine-tuning default (1e-4), and
LoRA adapters at several learning rates. The table gives each run's validation perplexity on the
recipes and its cut relative to the untuned base (measured by a run with a negligible LR).
"""

from __future__ import annotations

import argparse
import math
import pydoc
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "recipes.txt"
DOC_MODULES = [
    "argparse",
    "asyncio",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "functools",
    "http.client",
    "inspect",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.request",
    "uuid",
    "zipfile",
    "xml.etree.ElementTree",
    "tkinter",
    "turtle",
    "multiprocessing",
    "concurrent.futures",
    "difflib",
    "heapq",
    "bisect",
    "fractions",
    "calendar",
    "configparser",
]


def documentation_corpus(path: Path, max_chars: int) -> Path:
    """English prose that is not recipes: pydoc's plain-text pages of stdlib modules."""
    import importlib

    parts, total = [], 0
    for name in DOC_MODULES:
        try:
            text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        except Exception:  # a module missing from this Python build
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    path.write_text("\n<|endoftext|>\n".join(parts)[:max_chars], encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,2e-3,5e-3", help="LoRA learning rates to try")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="full fine-tuning LR (its default)")
    parser.add_argument("--work", help="directory kept between invocations (the base is trained once)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--corpus-chars", type=int, default=1_500_000)
    args = parser.parse_args()

    import finetune

    quiet = lambda _msg: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)  # --work keeps the pretrained base for the next invocation
        root.mkdir(parents=True, exist_ok=True)
        corpus = documentation_corpus(root / "docs.txt", args.corpus_chars)
        common = dict(runs_dir=str(root / "runs"), cache_dir=str(root / "cache"), sample_every=0, log=quiet)
        start = time.perf_counter()
        base = finetune.train(
            str(corpus),
            model="tiny",
            run_name="base",
            steps=args.base_steps,
            save_every=0,
            eval_every=args.base_steps,
            **common,
        )
        for finished in (root / "runs").iterdir():  # the base stays; every tuned run starts over
            if finished.name != "base":
                shutil.rmtree(finished)
        print(
            f"base: {args.base_steps} steps on {corpus.stat().st_size / 1e6:.1f} MB of stdlib docs, "
            f"validation perplexity there {math.exp(base.val_loss):.1f} ({time.perf_counter() - start:.0f} s)"
        )

        tune = dict(model=str(base.checkpoint), block_size=args.block_size, save_every=0, **common)

        def run(name: str, steps: int = args.steps, **options) -> float:
            t0 = time.perf_counter()
            result = finetune.train(str(SAMPLE), run_name=name, steps=steps, eval_every=steps, **tune, **options)
            print(
                f"  {name}: validation loss {result.val_loss:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr
            )
            return math.exp(result.val_loss)

        untuned = run("untuned", steps=1, lr=1e-12)  # one step at a negligible LR: the base itself
        rows = [("full fine-tuning", args.full_lr, run("full", lr=args.full_lr))]
        for lr in [float(x) for x in args.lrs.split(",")]:
            rows.append(("LoRA r=8 alpha=16", lr, run(f"lora-{lr:g}", lr=lr, lora=True)))

    print(
        f"\nrecipes validation perplexity, untuned base: {untuned:.2f}; {args.steps} steps, cosine, "
        f"batch 8 x {args.block_size} tokens"
    )
    print("| run | lr | perplexity | cut vs base |\n| --- | --- | --- | --- |")
    for name, lr, ppl in rows:
        print(f"| {name} | {lr:g} | {ppl:.2f} | {1 - ppl / untuned:.0%} |")


if __name__ == "__main__":
    main()
