"""ONNX Runtime generation vs transformers' generate, GPT-2 124M, batch 1, greedy, on this machine's CPU.

    python bench/onnx_generation.py [--new-tokens 128] [--out /tmp/bench-onnx]

Builds GPT-2 124M (random weights, the real GPT-2 BPE from ../shared/gpt2-tokenizer when present),
exports it with finetune's exporter (fp32 and int8, each with standard ONNX operators and with
ONNX Runtime's fused operators), then times new tokens/s for HF `generate` and for finetune's ONNX
Runtime loop, side by side in one process in alternating rounds, and reports greedy agreement with
HF and the memory-bandwidth ceiling for fp32; then the same with finetune's default sampling knobs.
Target (issue 4): ORT fp32 >= 2x, int8 >= 3x HF generate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from finetune.config import GenerateConfig
from finetune.exporting import export_onnx
from finetune.onnx_generation import OnnxCausalLM, next_tokens

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "gpt2-tokenizer"
PROMPT = "The recipe calls for two cups of flour, a pinch of salt and"


def gpt2_tokenizer():
    from tokenizers import ByteLevelBPETokenizer

    if (SHARED_TOKENIZER / "vocab.json").is_file():
        bpe = ByteLevelBPETokenizer(str(SHARED_TOKENIZER / "vocab.json"), str(SHARED_TOKENIZER / "merges.txt"))
        bpe.add_special_tokens(["<|endoftext|>"])
    else:  # a stand-in with GPT-2's vocabulary size so the model shape is the same
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator([PROMPT * 100], vocab_size=1000, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def timed(fn, repeats: int = 2):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def read_bandwidth() -> float:
    """Bytes/s this machine streams from memory with all its threads: the best of 5 sums over 1 GiB
    and of 5 matrix-vector products over a 618 MB matrix (the kernel a batch-1 decode step is made of)."""
    data = torch.ones(256 * 1024 * 1024)
    matrix, vector = torch.randn(4 * 50257, 768), torch.randn(768)
    best = 0.0
    for fn, size in ((data.sum, data.numel() * 4), (lambda: torch.mv(matrix, vector), matrix.numel() * 4)):
        for _ in range(5):
            start = time.perf_counter()
            fn()
            best = max(best, size / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default="/tmp/bench-onnx")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer()
    config = AutoConfig.for_model("gpt2", vocab_size=50257, bos_token_id=50256, eos_token_id=50256)
    model = AutoModelForCausalLM.from_config(config).eval()
    checkpoint = out / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)

    variants = {  # name -> (quantize, optimize)
        "fp32, standard operators (--no-optimize)": (None, False),
        "fp32, ONNX Runtime fusions (default)": (None, True),
        "int8 dynamic, standard operators (--no-optimize)": ("int8", False),
        "int8 blocks, ONNX Runtime fusions (default)": ("int8", True),
    }
    exports = {}
    for index, (name, (quantize, optimize)) in enumerate(variants.items()):
        start = time.perf_counter()
        export_onnx(
            checkpoint, out / str(index), None, quantize=quantize, verify=False, log=lambda _m: None, optimize=optimize
        )
        size = sum(f.stat().st_size for f in (out / str(index)).iterdir() if f.name.startswith("model.onnx"))
        exports[name] = {"seconds": time.perf_counter() - start, "mb": size / 1e6, "lm": OnnxCausalLM(out / str(index))}

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    np_ids = ids.numpy()
    n = args.new_tokens

    def hf(**sampling):
        with torch.inference_mode():
            return model.generate(
                ids, do_sample=bool(sampling), max_new_tokens=n, min_new_tokens=n, pad_token_id=50256, **sampling
            )[0, ids.shape[1] :].numpy()

    # `finetune generate`'s default sampling (temperature 0.8, top-k 50, top-p 0.95) on both sides.
    knobs = GenerateConfig(seed=0)
    rng = np.random.default_rng(0)

    def ort_sampled(lm):
        return lm.decode_steps(
            np_ids, np.ones_like(np_ids), n, lambda scores, history: next_tokens(scores, history, knobs, rng)
        )[0]

    # Alternating rounds, so every backend sees the same machine state; median seconds per backend.
    # name -> (function, the HF row it is compared with)
    greedy_hf, sampled_hf = "HF generate (torch fp32)", "HF generate (torch fp32), sampling"
    backends = {greedy_hf: (hf, greedy_hf)}
    for name, export in exports.items():
        backends[f"finetune ONNX Runtime {name}"] = (
            lambda lm=export["lm"]: lm.greedy(np_ids, np.ones_like(np_ids), n)[0],
            greedy_hf,
        )
    backends[sampled_hf] = (lambda: hf(temperature=knobs.temperature, top_k=knobs.top_k, top_p=knobs.top_p), sampled_hf)
    fastest = exports[list(variants)[-1]]["lm"]
    backends[f"finetune ONNX Runtime {list(variants)[-1]}, sampling"] = (lambda: ort_sampled(fastest), sampled_hf)
    seconds = {name: [] for name in backends}
    tokens = {}
    for fn, _ in backends.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, (fn, _) in backends.items():
            start = time.perf_counter()
            tokens[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    hf_seconds = statistics.median(seconds[greedy_hf])
    rows = []
    for name, (_, baseline) in backends.items():
        export = exports.get(name.removeprefix("finetune ONNX Runtime "))
        ratios = [h / s for h, s in zip(seconds[baseline], seconds[name])]
        agreement = f"{float((tokens[name] == tokens[greedy_hf]).mean()):.1%}" if baseline == greedy_hf else "(sampled)"
        rows.append(
            (
                name,
                n / statistics.median(seconds[name]),
                statistics.median(seconds[baseline]) / statistics.median(seconds[name]),
                agreement,
                f"{export['seconds']:.1f}" if export else "",
                f"{export['mb']:.0f}" if export else "",
                ", ".join(f"{r:.2f}" for r in ratios),
            )
        )

    # At batch 1 each new token reads every weight once (the tied embedding as the output layer;
    # one row of the position table), so memory bandwidth caps fp32 tokens/s for any runtime.
    weight_bytes = 4 * (sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel())
    bandwidth = read_bandwidth()
    roofline = bandwidth / weight_bytes
    print(f"GPT-2 124M, batch 1, greedy, {n} new tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s / {weight_bytes / 1e6:.0f} MB of fp32 weights per token = "
        f"fp32 roofline {roofline:.1f} tokens/s = {roofline * hf_seconds / n:.2f}x HF generate"
    )
    for row in rows:
        if "fp32" in row[0] and "sampling" not in row[0]:
            print(f"  {row[0]}: {row[1] / roofline:.0%} of the fp32 roofline")
    print(
        f"{args.rounds} alternating rounds; tokens/s and ratio from the median round time; "
        "per-round ratios to HF listed;"
    )
    print(
        f"sampling rows: temperature {knobs.temperature}, top-k {knobs.top_k}, top-p {knobs.top_p} "
        "(finetune generate's defaults), vs HF sampling"
    )
    print("| backend | new tokens/s | vs HF | greedy agreement with HF | export s | size MB | per-round vs HF |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row[0]} | {row[1]:.1f} | {row[2]:.2f}x | {row[3]} | {row[4]} | {row[5]} | {row[6]} |")
    print(json.dumps({"rows": [list(map(str, r)) for r in rows]}))


if __name__ == "__main__":
    main()
