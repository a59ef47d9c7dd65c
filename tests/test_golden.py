"""Golden tests: the exact numbers today's code produces, pinned so that a refactor cannot change them unseen.

What is pinned (tests/fixtures/golden.json):
- the training loss of each of the first 10 steps and the validation losses, for the tiny GPT-2 and tiny Llama
  presets on plain text and on prompt/completion data (CPU, fp32, the values metrics.jsonl records);
- the greedy text each trained model continues a prompt with;
- the names of the cache entries (the data fingerprints), so a cache built before a change is still hit after it;
- a run directory written by the code of 2026-11-28 (tests/fixtures/golden_run, made by make_golden_run.py):
  it must resume from its step-4 checkpoint to the same losses and bit-identical weights, and still generate.

When arithmetic changes on purpose, rerun with `PYTHONPATH=. python tests/test_golden.py --record` and say why in
the commit. Otherwise a failure here means behaviour changed.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE, read_metrics, run_cli

GOLDEN = Path(__file__).parent / "fixtures" / "golden.json"
GOLDEN_RUN = Path(__file__).parent / "fixtures" / "golden_run"
CASES = [("tiny", "text"), ("tiny-llama", "text"), ("tiny", "pairs"), ("tiny-llama", "pairs")]
PROMPT = "Title:"
THREADS = 2


def write_data(kind: str, directory: Path) -> Path:
    """The sample recipes, as plain text or as prompt/completion pairs (title -> the rest)."""
    recipes = SAMPLE.read_text().split("\n\n")[:60]
    if kind == "text":
        path = directory / "recipes.txt"
        path.write_text("\n\n".join(recipes))
    else:
        path = directory / "pairs.jsonl"
        pairs = [{"prompt": r.split("\n")[0] + "\n", "completion": "\n".join(r.split("\n")[1:])} for r in recipes]
        path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def observe(preset: str, kind: str, directory: Path) -> dict:
    """Train 10 steps as a user would, then sample greedily; return what the run recorded."""
    data = write_data(kind, directory)
    cache = directory / "cache"
    run_cli(
        "train",
        data,
        "--model",
        preset,
        "--runs-dir",
        directory / "runs",
        "--run-name",
        "golden",
        "--steps",
        10,
        "--batch-size",
        4,
        "--block-size",
        64,
        "--log-every",
        1,
        "--eval-every",
        5,
        "--sample-every",
        0,
        "--save-every",
        0,
        "--cache-dir",
        cache,
        "--seed",
        7,
    )
    metrics = read_metrics(directory / "runs" / "golden")
    text = run_cli(
        "generate",
        "--run",
        "golden",
        "--runs-dir",
        directory / "runs",
        "--prompt",
        PROMPT,
        "--temperature",
        0,
        "--max-new-tokens",
        24,
    ).stdout
    sampled = run_cli(
        "generate",
        "--run",
        "golden",
        "--runs-dir",
        directory / "runs",
        "--prompt",
        PROMPT,
        "--temperature",
        1.0,
        "--seed",
        1,
        "--n",
        2,
        "--max-new-tokens",
        24,
    ).stdout
    return {
        "loss": [m["loss"] for m in metrics if "loss" in m],
        "val_loss": [m["val_loss"] for m in metrics if "val_loss" in m],
        "greedy": text,
        "sampled": sampled,
        "cache_entries": sorted(str(p.relative_to(cache)) for p in cache.glob("*/*") if not p.name.startswith(".")),
    }


def observe_resume(directory: Path) -> dict:
    """Resume the checked-in run from its step-4 checkpoint to step 8; the losses of steps 5-8 and the weights."""
    work = directory / "golden_run"
    shutil.copytree(GOLDEN_RUN, work)
    shutil.rmtree(work / "runs/golden/checkpoint-000008")
    (work / "runs/golden/latest").write_text("checkpoint-000004\n")
    # The command that started the run (its paths are relative to the fixture's directory), from a given checkpoint.
    state = json.loads((work / "runs/golden/checkpoint-000004/training_state/state.json").read_text())
    with contextlib.chdir(work):
        run_cli(*shlex.split(state["command"])[1:], "--resume", "runs/golden/checkpoint-000004")
    metrics = read_metrics(work / "runs/golden")
    from safetensors.torch import load_file

    resumed = load_file(work / "runs/golden/checkpoint-000008/model.safetensors")
    saved = load_file(GOLDEN_RUN / "runs/golden/checkpoint-000008/model.safetensors")
    text = run_cli(
        "generate",
        "--checkpoint",
        work / "runs/golden/checkpoint-000004",
        "--prompt",
        PROMPT,
        "--temperature",
        0,
        "--max-new-tokens",
        12,
    ).stdout
    # A random-weight model continues with varied tokens, so greedy decoding's arithmetic shows in the text.
    base = run_cli(
        "generate", "--model", work / "base", "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 24
    ).stdout
    return {
        "loss": [m["loss"] for m in metrics if "loss" in m],
        "same_weights_as_saved": all(resumed[k].equal(saved[k]) for k in saved) and resumed.keys() == saved.keys(),
        "greedy_from_step_4": text,
        "greedy_from_base": base,
    }


@pytest.fixture(autouse=True)
def two_threads():
    """CPU reductions split by thread; the numbers were recorded with 2 (this project's CI machines have 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def expected(name: str):
    return json.loads(GOLDEN.read_text())[name]


@pytest.mark.parametrize("preset, kind", CASES)
def test_training_losses_and_greedy_text_are_unchanged(tmp_path, preset, kind):
    assert observe(preset, kind, tmp_path) == expected(f"{preset}/{kind}")


def test_a_run_written_by_earlier_code_resumes_to_the_same_numbers(tmp_path):
    got = observe_resume(tmp_path)
    assert got == expected("resume")
    assert got["same_weights_as_saved"]
    uninterrupted = [m["loss"] for m in read_metrics(GOLDEN_RUN / "runs/golden") if "loss" in m]
    assert got["loss"] == uninterrupted


def test_an_earlier_checkpoint_still_exports(tmp_path):
    out = tmp_path / "export"
    run_cli("export", "--checkpoint", GOLDEN_RUN / "runs/golden/checkpoint-000008", "--output", out)
    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file()


def record() -> None:
    import os
    import tempfile

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(THREADS)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FINETUNE_CACHE"] = str(Path(tmp) / "home-cache")
        for preset, kind in CASES:
            case = Path(tmp) / f"{preset}-{kind}"
            case.mkdir()
            os.chdir(case)
            results[f"{preset}/{kind}"] = observe(preset, kind, case)
        resume = Path(tmp) / "resume"
        resume.mkdir()
        os.chdir(resume)
        results["resume"] = observe_resume(resume)
    GOLDEN.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {GOLDEN.relative_to(REPO)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: PYTHONPATH=. python tests/test_golden.py --record")
    record()
