"""Start-up: `finetune --help`, and the time from launching `finetune train` to its first training step.

    python bench/startup.py

The first step counts as done when its line lands in metrics.jsonl. "cold" has no cache (the tiny
preset learns its tokenizer and tokenizes the sample); "warm" reruns with the cache in place.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "recipes.txt"
FINETUNE = [sys.executable, "-m", "finetune"]


def help_seconds(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([*FINETUNE, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_step_seconds(root: Path, run_name: str) -> float:
    metrics = root / "runs" / run_name / "metrics.jsonl"
    cmd = [
        *FINETUNE,
        "train",
        str(SAMPLE),
        "--model",
        "tiny",
        "--steps",
        "3",
        "--log-every",
        "1",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--save-every",
        "0",
        "--run-name",
        run_name,
        "--runs-dir",
        str(root / "runs"),
        "--cache-dir",
        str(root / "cache"),
    ]
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (metrics.is_file() and metrics.read_text().strip()):
        if process.poll() is not None:
            sys.exit(f"training exited with {process.returncode} before its first step: {' '.join(cmd)}")
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    process.wait()
    return elapsed


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cold = first_step_seconds(root, "cold")
        warm = statistics.median(first_step_seconds(root, f"warm{i}") for i in range(3))
    print("| measurement | seconds |")
    print("| --- | --- |")
    print(f"| `finetune --help` (median of 5) | {help_seconds():.2f} |")
    print(f"| launch -> first training step, tiny preset, empty cache | {cold:.2f} |")
    print(f"| launch -> first training step, tiny preset, cache hit (median of 3) | {warm:.2f} |")


if __name__ == "__main__":
    main()
