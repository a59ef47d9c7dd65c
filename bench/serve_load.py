"""Serving under load: `finetune serve` (ONNX int8/fp32, torch) vs `transformers serve`, streaming clients.

    python bench/serve_load.py                       # every row, concurrency 1/4/16/32, 32 and 64 new tokens
    python bench/serve_load.py --rows onnx-int8,hf-cb --concurrency 1,16 --new-tokens 32   # a quicker look

One model for every row: GPT-2 124M with random weights and the real GPT-2 BPE (../shared/gpt2-tokenizer),
trained for one step into a run so that `finetune serve --run` serves it, and exported from that run as
safetensors (what `transformers serve` loads) and as ONNX fp32 and int8. Each row starts its server as a
subprocess on a free port of 127.0.0.1, warms it up, then for each new-token count and each concurrency c
runs c streaming clients (greedy, prompts of 5-10 tokens), each sending requests back to back, and
records output tokens/s (the server's `usage` counts over the wall time of the cell), time to first
token and request latency (p50/p95), and failures. Rows:

    onnx-int8, onnx-fp32      finetune serve --onnx EXPORT          (ONNX Runtime, continuous batching)
    torch                     finetune serve --run bench            (torch, continuous batching)
    *-b1                      the same with --max-batch-size 1      (batching off)
    hf, hf-cb                 transformers serve EXPORT [--continuous-batching]   (the anchor)

Then `finetune generate`'s own tokens/s for one request (in this process, same run and exports), and
each row as a share of this machine's compute roofline: FLOPs per generated token x tokens/s over a
measured large-GEMM rate (fp32 with torch, int8 with ONNX Runtime's MatMulInteger).
After the sweep, interleaved rounds: every row's server up at once, one 16-client cell per row in turn
(`--rounds`, 3): the targets' ratios from cells seconds apart, since this VM's speed drifts over minutes.
Targets (issue 14), at 16 clients: ONNX int8 >= 3x, ONNX fp32 >= 1.5x, torch >= 1.2x the output tokens/s
of `transformers serve --continuous-batching`; each >= 5x its own batching-off figure; time to first
token p95 <= 0.5 s; at concurrency 1 within 10% of `finetune generate`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = ROOT.parent / "shared" / "gpt2-tokenizer"
SAMPLE_DATA = ROOT / "sample_data" / "recipes.txt"
PROMPTS = [
    "Title: Lemon cake",
    "The recipe calls for",
    "Preheat the oven and",
    "Ingredients: two cups of flour",
    "Title: Tomato soup with basil",
    "Stir the sauce until",
    "Serve the bread warm with",
    "Title: Spicy noodles",
]
ROWS = ["onnx-int8", "onnx-fp32", "torch", "onnx-int8-b1", "onnx-fp32-b1", "torch-b1", "hf-cb", "hf"]
# Rows that decode one request at a time: only the concurrencies the targets need (a full sweep at
# ~25 tokens/s would take most of an hour).
SERIAL_ROWS = {"onnx-int8-b1", "onnx-fp32-b1", "torch-b1", "hf"}
SERIAL_CONCURRENCY = (1, 16)
TARGETS = (("onnx-int8", 3.0), ("onnx-fp32", 1.5), ("torch", 1.2))  # x transformers serve CB at 16 clients


@dataclass
class Cell:
    row: str
    new_tokens: int
    concurrency: int
    requests: int = 0
    failures: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---------------------------------------------------------------- the model, the run and its exports


def build_model(work: Path) -> Path:
    """GPT-2 124M, random weights (seed 0), with the real GPT-2 BPE when ../shared has it."""
    base = work / "gpt2-124m"
    if (base / "config.json").exists():
        return base
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    if not (SHARED_TOKENIZER / "vocab.json").is_file():
        sys.exit(f"the GPT-2 tokenizer is missing: {SHARED_TOKENIZER}/vocab.json and merges.txt")
    bpe = ByteLevelBPETokenizer(str(SHARED_TOKENIZER / "vocab.json"), str(SHARED_TOKENIZER / "merges.txt"))
    bpe.add_special_tokens(["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=50257))
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def finetune_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "finetune", *args], check=True, env=_env())


def prepare(work: Path) -> dict[str, Path]:
    """The run `bench` (one training step on the sample data) and its three exports, reused when present."""
    base = build_model(work)
    runs = work / "runs"
    if not (runs / "bench" / "latest").exists():  # names the newest complete checkpoint
        finetune_cli(
            "train", str(SAMPLE_DATA), "--model", str(base), "--run-name", "bench", "--runs-dir", str(runs),
            "--steps", "1", "--block-size", "128", "--batch-size", "1", "--overwrite",
        )  # fmt: skip
    exports = {
        "safetensors": (work / "export-safetensors", ["--format", "safetensors"]),
        "onnx-fp32": (work / "export-onnx-fp32", ["--format", "onnx"]),
        "onnx-int8": (work / "export-onnx-int8", ["--format", "onnx", "--quantize", "int8"]),
    }
    for out, flags in exports.values():
        if not out.exists():
            finetune_cli("export", "--run", "bench", "--runs-dir", str(runs), "--output", str(out), *flags)
    return {"runs": runs, **{name: out for name, (out, _) in exports.items()}}


# ---------------------------------------------------------------- servers


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(row: str, paths: dict[str, Path], port: int, max_batch: int) -> list[str]:
    if row.startswith("hf"):
        cb = ["--continuous-batching"] if row == "hf-cb" else []
        return ["transformers", "serve", *cb, "--host", "127.0.0.1", "--port", str(port), str(paths["safetensors"])]
    base = row.removesuffix("-b1")
    source = ["--run", "bench", "--runs-dir", str(paths["runs"])] if base == "torch" else ["--onnx", str(paths[base])]
    batch = 1 if row.endswith("-b1") else max_batch
    return [
        sys.executable, "-m", "finetune", "serve", *source, "--port", str(port),
        "--max-batch-size", str(batch), "--max-queue", "256",
    ]  # fmt: skip


def start_server(command: list[str], port: int, log: Path) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(command, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited ({proc.returncode}); its log: {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"server not ready after 600 s; its log: {log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- clients


async def one_request(client, url: str, model: str, prompt: str, new_tokens: int, cell: Cell) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens, ok = None, 0, False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        ok = True
                        break
                    chunk = json.loads(line[6:])
                    if first is None and any(c.get("text") for c in chunk.get("choices") or []):
                        first = time.perf_counter()
                    if chunk.get("usage"):  # the last chunk (transformers serve sends no [DONE] after it)
                        tokens, ok = chunk["usage"]["completion_tokens"], True
    except Exception:  # a dropped connection counts as a failure, like a 4xx/5xx
        ok = False
    cell.requests += 1
    if not ok or first is None:
        cell.failures += 1
        return
    cell.output_tokens += tokens
    cell.ttft.append(first - start)
    cell.latency.append(time.perf_counter() - start)


async def load(port: int, model: str, new_tokens: int, concurrency: int, per_client: int, cell: Cell) -> None:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:

        async def client_loop(index: int) -> None:
            for k in range(per_client):
                prompt = PROMPTS[(index + k * concurrency) % len(PROMPTS)]
                await one_request(client, url, model, prompt, new_tokens, cell)

        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        cell.seconds = time.perf_counter() - start


def served_model(port: int, row: str, paths: dict[str, Path]) -> str:
    if row.startswith("hf"):
        return str(paths["safetensors"])
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"]


def measure(row: str, port: int, model: str, new_tokens: int, concurrency: int, args) -> Cell:
    """One cell: `concurrency` clients each sending their requests back to back (at least 4 requests in all)."""
    cell = Cell(row, new_tokens, concurrency)
    per_client = 1 if row in SERIAL_ROWS else args.per_client
    asyncio.run(load(port, model, new_tokens, concurrency, max(per_client, 4 // concurrency), cell))
    return cell


def run_row(row: str, paths: dict[str, Path], args, work: Path) -> list[Cell]:
    port = free_port()
    proc = start_server(server_command(row, paths, port, args.max_batch_size), port, work / f"server-{row}.log")
    cells = []
    try:
        model = served_model(port, row, paths)
        asyncio.run(load(port, model, 8, 2, 1, Cell(row, 8, 2)))  # warm-up: first-call costs stay out
        concurrencies = [c for c in args.concurrency if row not in SERIAL_ROWS or c in SERIAL_CONCURRENCY]
        for new_tokens in args.new_tokens:
            for concurrency in concurrencies:
                cell = measure(row, port, model, new_tokens, concurrency, args)
                cells.append(cell)
                print(format_cell(cell), flush=True)
    finally:
        stop_server(proc)
    return cells


def interleaved_rounds(rows: list[str], paths: dict[str, Path], args, work: Path) -> list[dict[str, Cell]]:
    """The targets' 16-client cells measured in alternation: every row's server up side by side (an idle one
    waits on a condition), one cell per row in turn, `args.rounds` times. This VM's speed drifts by 10-30%
    over minutes, which ratios of rows measured minutes apart in the sweep carry; here each round's ratios
    come from cells a few seconds apart."""
    servers = {}
    try:
        # transformers serve --continuous-batching sizes its KV cache from the free memory (14 GB here):
        # started first, it leaves the others what they need.
        for row in sorted(rows, key=lambda r: not r.startswith("hf")):
            port = free_port()
            command = server_command(row, paths, port, args.max_batch_size)
            servers[row] = (start_server(command, port, work / f"server-{row}-rounds.log"), port)
        servers = {row: servers[row] for row in rows}  # rounds run in the order asked for
        models = {row: served_model(port, row, paths) for row, (_, port) in servers.items()}
        for row, (_, port) in servers.items():  # a batch of 16 once: first-time allocations stay out
            warm = 16 if row not in SERIAL_ROWS else 2
            asyncio.run(load(port, models[row], 8, warm, 1, Cell(row, 8, warm)))
        tokens = args.new_tokens[0]
        rounds = []
        for index in range(args.rounds):
            cells = {}
            for row, (_, port) in servers.items():
                cells[row] = measure(row, port, models[row], tokens, 16, args)
            rounds.append(cells)
            print(f"round {index + 1}: " + ", ".join(f"{r} {c.tokens_per_s:.1f}" for r, c in cells.items()), flush=True)
        return rounds
    finally:
        for proc, _ in servers.values():
            stop_server(proc)


def format_cell(cell: Cell) -> str:
    return (
        f"| {cell.row} | {cell.new_tokens} | {cell.concurrency} | {cell.tokens_per_s:.1f} | "
        f"{pct(cell.ttft, 0.5):.2f} / {pct(cell.ttft, 0.95):.2f} | "
        f"{pct(cell.latency, 0.5):.2f} / {pct(cell.latency, 0.95):.2f} | {cell.failures}/{cell.requests} |"
    )


# ---------------------------------------------------------------- finetune generate, rooflines


def generate_rates(paths: dict[str, Path], new_tokens: int, rounds: int = 3) -> dict[str, float]:
    """`finetune generate`'s tokens/s for one greedy request, per backend (median of rounds, after a warm-up)."""
    import torch

    from finetune.api import resolve_generation_source
    from finetune.config import GenerateConfig
    from finetune.generation import generate_texts, load_for_generation
    from finetune.onnx_generation import OnnxCausalLM, generate_texts_onnx

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = GenerateConfig(prompts=[PROMPTS[0]], max_new_tokens=new_tokens, temperature=0.0, stream=False)
    checkpoint = resolve_generation_source("bench", None, None, str(paths["runs"]), log=lambda s: None)
    lm, tokenizer = load_for_generation(str(checkpoint))
    backends = {"torch": lambda: generate_texts(lm, tokenizer, cfg, write=lambda s: None)}
    for name in ("onnx-fp32", "onnx-int8"):
        onnx_lm = OnnxCausalLM(str(paths[name]))
        backends[name] = lambda onnx_lm=onnx_lm: generate_texts_onnx(onnx_lm, cfg, write=lambda s: None)
    rates = {}
    for name, fn in backends.items():
        fn()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        rates[name] = new_tokens / statistics.median(times)
    return rates


def gemm_rates() -> dict[str, float]:
    """FLOP/s of a 2048^3 matrix product with all threads: fp32 (torch) and int8 (ONNX Runtime MatMulInteger,
    which uses AMX or VNNI where the CPU has them), and the memory read bandwidth (bytes/s)."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper
    from onnx_generation import read_bandwidth  # bench/onnx_generation.py, this script's neighbour

    n = 2048
    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    fp32 = min(_timed(lambda: a @ b) for _ in range(5))
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "int8_gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
        [helper.make_tensor("b", TensorProto.INT8, [n, n], np.random.randint(-127, 127, (n, n), dtype=np.int8))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"a": np.random.randint(0, 255, (n, n), dtype=np.uint8)}
    int8 = min(_timed(lambda: session.run(None, feed)) for _ in range(5))
    return {"fp32": 2 * n**3 / fp32, "int8": 2 * n**3 / int8, "bandwidth": read_bandwidth()}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_per_generated_token(context: int = 40) -> float:
    """GPT-2 124M: 2 FLOPs per weight used (the 12 blocks and the tied output layer; the position table is a
    lookup) plus attention over `context` cached positions, per layer (scores and the weighted sum)."""
    layers, width, vocab = 12, 768, 50257
    blocks = 12 * layers * width * width  # attention (4 d^2) and MLP (8 d^2) per layer
    return 2 * (blocks + vocab * width) + 4 * layers * width * context


# ---------------------------------------------------------------- report

WEIGHT_BYTES = {"int8": 168e6, "fp32": 498e6}  # what one decode step reads: the export's size on disk


def roofline_table(cells: list[Cell], rates: dict[str, float], args) -> None:
    """Each batched cell against the lower of two ceilings: compute (GEMM rate / FLOPs per token) and memory
    (every decode step reads all weights once for the whole batch: bandwidth x batch / weight bytes)."""
    flops = flops_per_generated_token()
    print(
        f"\nGEMM: fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, int8 {rates['int8'] / 1e9:.0f} GOP/s; memory "
        f"{rates['bandwidth'] / 1e9:.1f} GB/s; {flops / 1e6:.0f} MFLOP per generated token"
    )
    print("\n| row | new tokens | clients | tokens/s | compute ceiling | memory ceiling | share of the lower |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cell in cells:
        if cell.concurrency not in (16, 32):
            continue
        kind = "int8" if "int8" in cell.row else "fp32"
        batch = 1 if cell.row in SERIAL_ROWS else min(cell.concurrency, args.max_batch_size)
        compute = rates[kind] / flops
        memory = rates["bandwidth"] * batch / WEIGHT_BYTES[kind]
        share = cell.tokens_per_s / min(compute, memory)
        print(
            f"| {cell.row} | {cell.new_tokens} | {cell.concurrency} | {cell.tokens_per_s:.1f} | {compute:.0f} | "
            f"{memory:.0f} | {share:.0%} |"
        )


def round_ratios(rounds: list[dict[str, Cell]], row: str, anchor: str) -> list[float]:
    return [
        r[row].tokens_per_s / r[anchor].tokens_per_s
        for r in rounds
        if row in r and r.get(anchor, Cell("", 0, 0)).tokens_per_s
    ]


def report(cells: list[Cell], gen: dict[str, float], rates: dict[str, float], args, rounds: list) -> None:
    print("\n| row | new tokens | clients | output tokens/s | TTFT p50 / p95 s | latency p50 / p95 s | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cell in cells:
        print(format_cell(cell))
    by = {(c.row, c.new_tokens, c.concurrency): c for c in cells}
    if rates:
        roofline_table(cells, rates, args)
    print("\nTargets at 16 clients (the sweep's cells; interleaved rounds below where run):")
    for tokens in args.new_tokens:
        anchor = by.get(("hf-cb", tokens, 16))
        for row, want in TARGETS:
            cell, off = by.get((row, tokens, 16)), by.get((row + "-b1", tokens, 16))
            if not cell:
                continue
            parts = [f"{row}, {tokens} tokens: {cell.tokens_per_s:.1f} tokens/s"]
            if anchor and anchor.tokens_per_s:
                ratio = cell.tokens_per_s / anchor.tokens_per_s
                parts.append(f"{ratio:.2f}x transformers serve CB (target {want}x)")
            if off and off.tokens_per_s:
                parts.append(f"{cell.tokens_per_s / off.tokens_per_s:.1f}x batching off (target 5x)")
            p95 = pct(cell.ttft, 0.95)
            parts.append(f"TTFT p95 {p95:.2f} s ({'met' if p95 <= 0.5 else 'NOT met'})")
            print("  " + "; ".join(parts))
    if rounds:
        tokens = args.new_tokens[0]
        print(f"\nInterleaved rounds ({len(rounds)}), 16 clients, {tokens} new tokens: median ratio (each round)")
        for row, want in TARGETS:
            for anchor, target in (("hf-cb", want), (row + "-b1", 5.0)):
                ratios = round_ratios(rounds, row, anchor)
                if ratios:
                    median = statistics.median(ratios)
                    each = ", ".join(f"{r:.2f}" for r in ratios)
                    verdict = "met" if median >= target else "NOT met"
                    print(f"  {row} / {anchor}: {median:.2f}x ({each}); target {target}x: {verdict}")
    if gen:
        tokens = args.new_tokens[0]
        print(f"\nConcurrency 1 vs finetune generate ({tokens} new tokens, one request):")
        for row, name in (("onnx-int8", "onnx-int8"), ("onnx-fp32", "onnx-fp32"), ("torch", "torch")):
            cell = by.get((row, tokens, 1))
            if cell and cell.tokens_per_s:
                share = cell.tokens_per_s / gen[name]
                verdict = "met" if share >= 0.9 else "NOT met"
                serve, alone = f"{cell.tokens_per_s:.1f}", f"{gen[name]:.1f}"
                print(f"  {row}: serve {serve} vs generate {alone} tokens/s = {share:.0%} ({verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/serve-bench", help="model, run, exports and server logs (reused)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--new-tokens", default="32,64")
    # 4, not 2: with 2, a 16-client cell lasted about 1.3 s, of which the first prefill and the last drain
    # were a tenth, and round-to-round spread was +-15%.
    parser.add_argument("--per-client", type=int, default=4, help="requests each client sends in a batched row")
    parser.add_argument("--max-batch-size", type=int, default=32, help="finetune serve's batch in batched rows")
    parser.add_argument("--skip-generate", action="store_true", help="skip the finetune generate and GEMM rows")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of the targets' 16-client cells (0: none)"
    )
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.new_tokens = [int(t) for t in args.new_tokens.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work)
    print(f"machine: {os.cpu_count()} cores; load average before: {os.getloadavg()}")
    print("| row | new tokens | clients | output tokens/s | TTFT p50 / p95 s | latency p50 / p95 s | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    cells: list[Cell] = []
    rows = args.rows.split(",")
    for row in rows:
        cells += run_row(row, paths, args, work)
    rounds = []
    if args.rounds:
        print(f"\nInterleaved rounds: every server up, one 16-client cell each in turn, {args.new_tokens[0]} tokens")
        rounds = interleaved_rounds([r for r in rows if r != "hf"], paths, args, work)
    gen, rates = {}, {}
    if not args.skip_generate:
        gen = generate_rates(paths, args.new_tokens[0])
        rates = gemm_rates()
    report(cells, gen, rates, args, rounds)
    interleaved = [{row: asdict(cell) for row, cell in r.items()} for r in rounds]
    (work / "results.json").write_text(
        json.dumps({"cells": [asdict(c) for c in cells], "rounds": interleaved, "generate": gen, "gemm": rates})
    )
    print(f"\nload average after: {os.getloadavg()}; raw numbers: {work / 'results.json'}")


if __name__ == "__main__":
    main()
