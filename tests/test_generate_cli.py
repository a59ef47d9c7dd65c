"""`finetune generate` through the CLI: determinism, greedy parity with transformers, options."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli


def test_same_seed_same_text(trained_run: Path):
    args = [
        "generate",
        "--runs-dir",
        trained_run.parent,
        "--run",
        "recipes",
        "--prompt",
        "Title:",
        "--n",
        3,
        "--max-new-tokens",
        30,
        "--seed",
        7,
    ]
    first, second = run_cli(*args).stdout, run_cli(*args).stdout
    assert first == second
    samples = first.split("====================\n")[:-1]
    assert len(samples) == 3 and len(set(samples)) > 1  # sampling, not greedy
    assert run_cli(*args[:-1], 8).stdout != first


def test_greedy_equals_transformers_generate(trained_run: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = trained_run / "checkpoint-000060"
    prompt = "Title: Lemon and Garlic"
    out = run_cli(
        "generate", "--checkpoint", ckpt, "--prompt", prompt, "--temperature", 0, "--max-new-tokens", 40, "--no-stream"
    ).stdout
    ours = out.split("====================")[0].rstrip("\n")

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**ids, do_sample=False, max_new_tokens=40, pad_token_id=tokenizer.eos_token_id)
    expected = prompt + tokenizer.decode(ref[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert ours == expected.rstrip("\n")


def test_batched_left_padded_greedy_matches_one_by_one(trained_run: Path):
    base = ["generate", "--runs-dir", trained_run.parent, "--temperature", 0, "--max-new-tokens", 12, "--no-stream"]
    prompts = ["Title:", "Method:\n1. Heat the oven to"]
    together = run_cli(*base, "--prompt", prompts[0], "--prompt", prompts[1], "--batch-size", 2).stdout
    alone = "".join(run_cli(*base, "--prompt", p).stdout for p in prompts)
    assert together == alone


def test_stop_strings_cut_the_text(trained_run: Path):
    out = run_cli(
        "generate",
        "--runs-dir",
        trained_run.parent,
        "--prompt",
        "Title:",
        "--temperature",
        0,
        "--max-new-tokens",
        60,
        "--stop",
        "\n",
        "--no-stream",
    ).stdout
    sample = out.split("====================")[0]
    assert sample.startswith("Title:") and sample.count("\n") == 1  # only the line break before the delimiter


def test_streaming_prints_one_sample_and_respects_stop(trained_run: Path):
    full = run_cli(
        "generate", "--runs-dir", trained_run.parent, "--prompt", "Title:", "--temperature", 0, "--max-new-tokens", 40
    ).stdout
    assert "====================" not in full  # one sample streams without the delimiter
    stopped = run_cli(
        "generate",
        "--runs-dir",
        trained_run.parent,
        "--prompt",
        "Title:",
        "--temperature",
        0,
        "--max-new-tokens",
        40,
        "--stop",
        "Serves",
    ).stdout
    assert "Serves" not in stopped and full.startswith(stopped.rstrip("\n"))


def test_no_include_prompt_output_file_and_prompt_file(trained_run: Path, workdir):
    (workdir / "prompts.txt").write_text("Title:\n====================\nIngredients:\n")
    out_file = workdir / "out" / "samples.txt"
    args = [
        "generate",
        "--runs-dir",
        trained_run.parent,
        "--prompt-file",
        "prompts.txt",
        "--n",
        2,
        "--seed",
        1,
        "--max-new-tokens",
        10,
        "--no-include-prompt",
        "--output",
        out_file,
    ]
    result = run_cli(*args)
    assert "appended 4 sample(s)" in result.output
    text = out_file.read_text()
    assert text.count("====================\n") == 4
    run_cli(*args)
    assert out_file.read_text() == text + text  # appends; same seed, same samples


def test_unconditional_sampling_from_latest_run(trained_run: Path):
    out = run_cli("generate", "--runs-dir", trained_run.parent, "--n", 2, "--max-new-tokens", 20, "--seed", 0).stdout
    assert out.count("====================") == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--n", "0"], "--n must be at least 1"),
        (["--max-new-tokens", "5000"], "exceeds the model's context"),
        (["--run", "nope"], "no run named 'nope'"),
        (["--checkpoint", "missing/dir"], "does not exist"),
        (["--prompt-file", "nofile.txt"], "cannot read prompt file nofile.txt: does not exist"),
    ],
)
def test_generate_errors(trained_run: Path, workdir, args, message):
    result = run_cli("generate", "--runs-dir", trained_run.parent, *args, expect=2)
    assert message in result.output
    assert "Traceback" not in result.output


def test_static_cache_path_gives_the_same_greedy_tokens(trained_run: Path):
    """The CUDA default (static KV cache, compiled decoding) checked for correctness on CPU."""
    base = [
        "generate",
        "--runs-dir",
        trained_run.parent,
        "--prompt",
        "Title:",
        "--prompt",
        "Method:\n1.",
        "--temperature",
        0,
        "--max-new-tokens",
        20,
        "--batch-size",
        2,
    ]
    assert run_cli(*base, "--static-cache").stdout == run_cli(*base, "--no-static-cache").stdout
