"""Data pipeline: parallel tokenization vs a single-process loop, cache-hit time, peak memory.

    python bench/data_pipeline.py [--mb 40] [--cache-mb 100] [--big-mb 1024]

Uses the real GPT-2 BPE from ../shared/gpt2-tokenizer (skips when absent). Targets (issue 6):
tokenization >= 1.8x a single-process loop on 2 cores; a cache hit < 1 s for a 100 MB corpus; peak RSS
< 2 GB while preparing a 1 GB corpus (--big-mb 0 skips that one: it takes several minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "gpt2-tokenizer"
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "recipes.txt"

CHILD = r"""
import json, os, resource, sys, time
import numpy as np
from pathlib import Path
sys.path.insert(0, {repo!r})
from bench.data_pipeline import gpt2_tokenizer
from finetune.config import DataConfig
from finetune.data_files import resolve_files
from finetune.token_cache import prepare_data
from finetune.tokenizing import tokenize_to_file
from finetune.reading import iter_pieces
mode, corpus, cache = sys.argv[1], sys.argv[2], sys.argv[3]
tok = gpt2_tokenizer()
start = time.perf_counter()
if mode == "prepare":
    prepare_data(resolve_files([corpus]), tok, 1024, DataConfig(cache_dir=cache), log=lambda m: None)
else:
    workers = 1 if mode == "single" else min(os.cpu_count(), 8)
    pieces = iter_pieces([Path(corpus)], "<|endoftext|>", False, "utf-8", split_long=True)
    tokenize_to_file(pieces, tok, Path(cache) / "out.bin", np.uint16, workers=workers)
print(json.dumps({{"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}}))
"""


def gpt2_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(str(SHARED / "vocab.json"), str(SHARED / "merges.txt"))
    bpe.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def make_corpus(path: Path, mb: int) -> None:
    """Recipes repeated with numbered titles, as one file (so one giant document is in it too)."""
    base = SAMPLE.read_text()
    with open(path, "w") as fh:
        written, i = 0, 0
        while written < mb * 1e6:
            chunk = base.replace("Title: ", f"Title: No. {i} ")
            fh.write(chunk)
            written += len(chunk)
            i += 1


def child(mode: str, corpus: Path, cache: Path, parallel_env: str) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM=parallel_env)
    code = CHILD.format(repo=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run(
        [sys.executable, "-c", code, mode, str(corpus), str(cache)], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=40)
    parser.add_argument("--cache-mb", type=int, default=100)
    parser.add_argument("--big-mb", type=int, default=1024)
    args = parser.parse_args()
    if not (SHARED / "vocab.json").is_file():
        print("skipped: ../shared/gpt2-tokenizer is absent")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        make_corpus(corpus, args.mb)
        single = child("single", corpus, tmp, "false")  # one process, one thread
        ours = child("ours", corpus, tmp, "true")
        print(f"tokenization of {args.mb} MB on {os.cpu_count()} cores (GPT-2 BPE)")
        print("| pipeline | seconds | MB/s | peak RSS MB | ratio |")
        print("| --- | --- | --- | --- | --- |")
        print(
            f"| single-process loop | {single['seconds']:.1f} | {args.mb / single['seconds']:.1f} "
            f"| {single['peak_rss_mb']:.0f} | 1.00x |"
        )
        print(
            f"| finetune (worker processes) | {ours['seconds']:.1f} | {args.mb / ours['seconds']:.1f} "
            f"| {ours['peak_rss_mb']:.0f} | {single['seconds'] / ours['seconds']:.2f}x |"
        )

        big = tmp / "cache.txt"
        make_corpus(big, args.cache_mb)
        child("prepare", big, tmp / "cache", "true")
        hit = child("prepare", big, tmp / "cache", "true")
        print(f"cache hit for a {args.cache_mb} MB corpus: {hit['seconds']:.2f} s (fingerprint + memory-map)")
        big.unlink()

        if args.big_mb:
            huge = tmp / "huge.txt"
            make_corpus(huge, args.big_mb)
            result = child("prepare", huge, tmp / "cache-big", "true")
            workers = min(os.cpu_count() or 1, 8)
            total = result["peak_rss_mb"] + workers * result.get("worker_peak_rss_mb", 0)
            print(
                f"preparing a {args.big_mb} MB corpus: {result['seconds']:.0f} s, "
                f"peak RSS {result['peak_rss_mb']:.0f} MB (main) "
                f"+ {workers} x {result.get('worker_peak_rss_mb', 0):.0f} MB (largest worker) <= {total:.0f} MB in all"
            )


if __name__ == "__main__":
    main()
