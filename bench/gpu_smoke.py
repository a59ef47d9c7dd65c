"""Issue 5's GPU smoke runs in one command: bf16 and fp16 training, DDP and FSDP through accelerate on
one GPU (FSDP also stopped and resumed), and LoRA on a 0.5B-class random-weight Llama; then
`finetune eval` of the first run, and `finetune serve` (the torch backend on the GPU) answering 16
concurrent greedy completions.

    python bench/gpu_smoke.py          # on a CUDA machine: GPT-2 124M and a 0.46B Llama (~6 minutes on an H100)
    python bench/gpu_smoke.py --cpu    # the same script with tiny models, fp32, no accelerate configs

Every run goes through the `finetune train` CLI on the bundled sample data; the table reports each
run's exit code, final training and validation loss, tokens/s and peak memory from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "recipes.txt"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_models(root: Path, cpu: bool) -> dict[str, Path]:
    import torch
    from onnx_generation import gpt2_tokenizer  # the real GPT-2 BPE when ../shared has it
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = gpt2_tokenizer()
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    if cpu:
        gpt2 = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=2, n_positions=256, **common)
        llama = AutoConfig.for_model(
            "llama",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    else:
        gpt2 = AutoConfig.for_model("gpt2", **common)  # 124M
        # 0.46B: 28 layers of width 1024 with untied 50K-token embeddings (a Qwen2.5-0.5B-sized model).
        llama = AutoConfig.for_model(
            "llama",
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            **common,
        )
    dirs = {}
    for name, config in (("gpt2", gpt2), ("llama", llama)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
        dirs[name + "_params"] = sum(p.numel() for p in model.parameters())
    return dirs


def train(root: Path, name: str, model: Path, steps: int, *extra) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "finetune",
        "train",
        str(SAMPLE),
        "--model",
        str(model),
        "--run-name",
        name,
        "--runs-dir",
        str(root / "runs"),
        "--cache-dir",
        str(root / "cache"),
        "--steps",
        str(steps),
        "--log-every",
        "1",
        "--eval-every",
        str(steps),
        "--sample-every",
        str(steps),
        "--save-every",
        str(steps),
        *map(str, extra),
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    metrics_path = root / "runs" / name / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    train_rows = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "val_loss" in m]
    return {
        "run": name,
        "exit": result.returncode,
        "seconds": seconds,
        "steps": train_rows[-1]["step"] if train_rows else 0,
        "loss": train_rows[-1]["loss"] if train_rows else None,
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "tokens_per_s": train_rows[-1]["tokens_per_s"] if train_rows else None,
        "peak_mb": train_rows[-1].get("peak_memory_mb") if train_rows else None,
        "error": result.stderr.strip().splitlines()[-1] if result.returncode and result.stderr.strip() else "",
    }


def evaluate(root: Path, name: str) -> dict:
    """`finetune eval` of a trained run on the sample data (the model on the GPU, as generate loads it): its
    mean loss goes in the "val loss" column, tokens scored per second in "tokens/s"."""
    out = root / f"eval-{name}.json"
    cmd = [sys.executable, "-m", "finetune", "eval", str(SAMPLE), "--run", name, "--runs-dir", str(root / "runs")]
    cmd += ["--json", str(out)]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    model = json.loads(out.read_text())["model"] if result.returncode == 0 and out.is_file() else {}
    return {
        "run": f"eval {name}",
        "exit": result.returncode,
        "seconds": seconds,
        "steps": model.get("step") or 0,
        "loss": None,
        "val_loss": model.get("loss"),
        "tokens_per_s": round(model["tokens"] / seconds) if model else None,
        "peak_mb": None,
        "error": result.stderr.strip().splitlines()[-1] if result.returncode and result.stderr.strip() else "",
    }


def serve(model: Path, requests: int = 16, new_tokens: int = 32) -> dict:
    """`finetune serve --model DIR` on a free port, `requests` greedy completions sent at once (stdlib HTTP
    only, so the script needs nothing beyond the serve extra); output tokens/s over the burst."""
    import socket
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    row = {"run": "serve (torch backend)", "exit": 0, "seconds": 0.0, "steps": requests, "loss": None}
    row.update(val_loss=None, tokens_per_s=None, peak_mb=None, error="")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "finetune", "serve", "--model", str(model), "--port", str(port)]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the server
    server = subprocess.Popen(cmd + ["--max-batch-size", str(requests)], stdout=log, stderr=log, text=True)
    try:
        for _ in range(600):  # loading the model; /health answers 503 until it is in
            if server.poll() is not None:
                log.seek(0)
                row.update(exit=server.returncode, error=(log.read().strip().splitlines() or [""])[-1])
                return row
            try:
                if urllib.request.urlopen(base + "/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"prompt": "Title:", "max_tokens": new_tokens, "temperature": 0}).encode()

        def complete(_i):
            request = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(request, timeout=300).read())["usage"]["completion_tokens"]

        start = time.perf_counter()
        with ThreadPoolExecutor(requests) as pool:
            tokens = sum(pool.map(complete, range(requests)))
        row["seconds"] = time.perf_counter() - start
        row["tokens_per_s"] = round(tokens / row["seconds"], 1)
    except Exception as exc:  # a smoke run reports what broke and goes on
        row.update(exit=1, error=f"{type(exc).__name__}: {exc}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="tiny models on the CPU, to check the script")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    steps = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = build_models(root, args.cpu)
        gpt2, llama = dirs["gpt2"], dirs["llama"]
        block = ["--block-size", 128 if args.cpu else 1024, "--batch-size", 4 if args.cpu else 8]
        runs = []
        if args.cpu:
            runs.append(train(root, "gpt2-fp32", gpt2, steps, *block, "--precision", "fp32"))
        else:
            runs.append(train(root, "gpt2-bf16", gpt2, steps, *block, "--precision", "bf16"))
            runs.append(train(root, "gpt2-fp16", gpt2, steps, *block, "--precision", "fp16"))
            engines = {
                engine: [
                    "--num-processes",
                    1,
                    "--accelerate-config",
                    REPO / "configs" / "accelerate" / f"{engine}.yaml",
                ]
                for engine in ("ddp", "fsdp")
            }
            for engine, launch in engines.items():
                runs.append(train(root, f"gpt2-{engine}", gpt2, steps, *block, *launch))
            # FSDP resume: the same run continued to twice the steps from its checkpoint
            runs.append(train(root, "gpt2-fsdp", gpt2, 2 * steps, *block, *engines["fsdp"]))
            runs[-1]["run"] = "gpt2-fsdp (resumed)"
        runs.append(
            train(root, "llama-lora", llama, steps, *block, "--lora", *(() if args.cpu else ("--precision", "bf16")))
        )
        runs.append(evaluate(root, runs[0]["run"]))  # the first run: gpt2-fp32 on CPU, gpt2-bf16 on a GPU
        runs.append(serve(gpt2))
    print(
        f"GPT-2 {dirs['gpt2_params'] / 1e6:.0f}M and Llama {dirs['llama_params'] / 1e6:.0f}M, random weights, "
        f"{steps} steps each, sample data"
    )
    print("| run | exit | steps | loss | val loss | tokens/s | peak memory MB | seconds | error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(
            f"| {r['run']} | {r['exit']} | {r['steps']} | {r['loss']} | {r['val_loss']} | {r['tokens_per_s']} | "
            f"{r['peak_mb']} | {r['seconds']:.0f} | {r['error'][:120]} |"
        )
    sys.exit(max(r["exit"] for r in runs))


if __name__ == "__main__":
    main()
