"""`finetune eval` through the CLI, against an independent computation with transformers
(model(input_ids, labels=...).loss times the tokens it averages over, summed over Hugging Face's windows)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE, run_cli

BLOCK = 32


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("held") / "held.txt"
    path.write_text(SAMPLE.read_text()[:6000])
    return path


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, gpt2_dir) -> Path:
    """A run fine-tuned from gpt2_dir with checkpoints at steps 2, 4 and 6."""
    root = tmp_path_factory.mktemp("eval-run")
    run_cli(
        "train", SAMPLE, "--model", gpt2_dir, "--runs-dir", root / "runs", "--run-name", "ev", "--steps", 6,
        "--block-size", BLOCK, "--batch-size", 4, "--lr", "3e-3", "--eval-every", 3, "--save-every", 2,
        "--keep", 3, "--sample-every", 0,
    )  # fmt: skip
    return root / "runs" / "ev"


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory, eval_run) -> Path:
    out = tmp_path_factory.mktemp("exports") / "onnx"
    run_cli("export", "--run", "ev", "--runs-dir", eval_run.parent, "--format", "onnx", "--no-verify", "-o", out)
    return out


def reference(model_dir: Path, data: Path, block: int, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity recipe with a plain transformers model: (mean loss, tokens averaged over)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from finetune import modeling
    from finetune.config import DataConfig
    from finetune.token_cache import prepare_data

    tokenizer = modeling.load_tokenizer(str(model_dir))
    prepared = prepare_data([data], tokenizer, block, DataConfig(val_fraction=0.0), log=lambda _m: None)
    ids = torch.from_numpy(np.asarray(prepared.train.tokens, dtype=np.int64))[None]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count, scored_until = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + block, ids.shape[1])
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, : scored_until - begin] = -100  # scored by an earlier window
        with torch.no_grad():
            loss = model(window, labels=labels).loss.item()
        n = int((labels[:, 1:] != -100).sum())  # what transformers averaged over (labels shift by one)
        total, count, scored_until = total + loss * n, count + n, end
        if end == ids.shape[1]:
            break
    return total / count, count


def eval_json(*args) -> tuple[dict, str]:
    out = Path("eval.json").resolve()
    result = run_cli("eval", *args, "--json", out)
    return json.loads(out.read_text()), result.stdout


@pytest.mark.parametrize("stride", [None, 16])
def test_a_run_on_held_out_text_matches_transformers(workdir, eval_run, held_out, stride):
    args = (held_out, "--run", "ev", "--runs-dir", eval_run.parent) + (("--stride", stride) if stride else ())
    figures, out = eval_json(*args)
    latest = eval_run / "checkpoint-000006"
    loss, tokens = reference(latest, held_out, BLOCK, stride or BLOCK)
    assert figures["block_size"] == BLOCK and figures["stride"] == (stride or BLOCK)  # the run's block size
    assert figures["model"]["tokens"] == tokens and abs(figures["model"]["loss"] - loss) < 1e-5
    assert figures["model"]["step"] == 6
    assert f"{latest}: perplexity " in out and f"over {tokens:,} tokens" in out


def test_baseline_prints_both_and_the_change(workdir, eval_run, held_out, gpt2_dir):
    figures, out = eval_json(held_out, "--run", "ev", "--runs-dir", eval_run.parent, "--baseline", gpt2_dir)
    base_loss, _ = reference(gpt2_dir, held_out, BLOCK, BLOCK)
    assert abs(figures["baseline"]["loss"] - base_loss) < 1e-5
    before, after = figures["baseline"]["perplexity"], figures["model"]["perplexity"]
    assert after < before  # fine-tuning on the recipes helps on held-out recipes
    assert abs(figures["relative_change"] - (after / before - 1)) < 1e-4
    lines = out.splitlines()
    assert lines[-2].startswith(f"{gpt2_dir} (baseline): perplexity ")
    assert lines[-1].startswith("perplexity ") and "(−" in lines[-1] and lines[-1].endswith("against the baseline")


def test_all_checkpoints_table_best_and_plot(workdir, eval_run, held_out):
    figures, out = eval_json(held_out, "--run", "ev", "--runs-dir", eval_run.parent, "--all-checkpoints")
    steps = [c["step"] for c in figures["checkpoints"]]
    assert steps == [2, 4, 6]
    for row in figures["checkpoints"]:
        loss, _ = reference(eval_run / f"checkpoint-{row['step']:06d}", held_out, BLOCK, BLOCK)
        assert abs(row["loss"] - loss) < 1e-5
    best = min(figures["checkpoints"], key=lambda c: c["loss"])
    assert figures["best_step"] == best["step"]
    marked = [line for line in out.splitlines() if line.endswith("<- best")]
    assert len(marked) == 1 and marked[0].split()[0] == str(best["step"])
    plot = eval_run / "eval-held.png"
    assert f"plot: {plot}" in out and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_prepared_directory_and_the_python_api_read_the_same_tokens(workdir, eval_run, held_out):
    import finetune

    checkpoint = eval_run / "checkpoint-000006"
    run_cli("prepare", held_out, "--model", checkpoint, "--block-size", BLOCK, "--output", workdir / "prepared")
    from_dir, _ = eval_json(workdir / "prepared", "--checkpoint", checkpoint)
    report = finetune.evaluate(str(held_out), checkpoint=str(checkpoint), log=lambda _m: None)
    assert report.model.score.tokens == from_dir["model"]["tokens"]
    assert abs(report.model.score.loss - from_dir["model"]["loss"]) < 1e-6


def test_prompt_completion_examples_score_only_the_completions(workdir, gpt2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipes = SAMPLE.read_text().split("\n\n")[:12]
    pairs = [{"prompt": r.split("\n")[0] + "\n", "completion": "\n".join(r.split("\n")[1:])} for r in recipes]
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    figures, out = eval_json(data, "--model", gpt2_dir, "--block-size", 256)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    total, count = 0.0, 0
    for pair in pairs:
        prompt = tokenizer(pair["prompt"])["input_ids"]
        completion = tokenizer(pair["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + completion])
        labels = torch.tensor([[-100] * len(prompt) + completion])
        with torch.no_grad():
            total += model(ids, labels=labels).loss.item() * len(completion)
        count += len(completion)
    assert figures["model"]["tokens"] == count and abs(figures["model"]["loss"] - total / count) < 1e-5
    assert figures["stride"] is None and "one example per row" in out


def test_onnx_agrees_with_torch_without_importing_torch(workdir, eval_run, held_out, fp32_export):
    torch_figures, _ = eval_json(held_out, "--run", "ev", "--runs-dir", eval_run.parent)
    fp32, int8 = fp32_export, workdir / "onnx-int8"
    run_cli(
        "export", "--run", "ev", "--runs-dir", eval_run.parent, "--format", "onnx", "--no-verify", "--quantize", "int8",
        "--output", int8,
    )  # fmt: skip
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'accelerate'):\n"
        "    sys.modules[name] = None  # any import of these now raises ImportError\n"
        "from finetune.cli import main\n"
        f"main(['eval', {str(held_out)!r}, '--onnx', {str(int8)!r}, '--baseline', {str(fp32)!r}, '--json', 'o.json'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 0, result.stderr
    onnx = json.loads((workdir / "o.json").read_text())
    assert onnx["block_size"] == BLOCK  # the export's manifest records the block size the run trained with
    fp32_loss, torch_loss = onnx["baseline"]["loss"], torch_figures["model"]["loss"]
    assert onnx["baseline"]["tokens"] == torch_figures["model"]["tokens"]
    assert abs(fp32_loss - torch_loss) / torch_loss < 1e-3  # fp32: within 0.1%
    int8_change = onnx["relative_change"]  # int8's perplexity against fp32's
    assert abs(int8_change) < 0.05, int8_change
    assert "against the baseline" in result.stdout
    print(f"ONNX fp32 loss {fp32_loss:.6f} vs torch {torch_loss:.6f}; int8 perplexity {int8_change:+.3%} vs fp32")


# --- bad input: one line, exit 2, no traceback ------------------------------------------------


def one_line_error(*args) -> str:
    result = run_cli("eval", *args, expect=2)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_run_without_checkpoints(workdir, held_out):
    run = workdir / "runs" / "empty"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name: tiny\n")
    assert "has no checkpoint yet" in one_line_error(held_out, "--run", "empty")
    assert "has no checkpoint yet" in one_line_error(held_out, "--run", "empty", "--all-checkpoints")


def test_an_unreadable_checkpoint(workdir, eval_run, held_out):
    import shutil

    copy = workdir / "runs" / "ev"
    shutil.copytree(eval_run, copy)
    weights = copy / "checkpoint-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert str(weights) in one_line_error(held_out, "--checkpoint", weights.parent)
    # Among all the checkpoints of a run, the damaged one is skipped and named; the others are scored.
    result = run_cli("eval", held_out, "--run", "ev", "--all-checkpoints")
    assert [line for line in result.output.splitlines() if line.startswith("warning: skipping")]
    assert "skipped runs/ev/checkpoint-000004: " in result.stdout and "<- best" in result.stdout


def test_an_onnx_directory_without_a_model(workdir, held_out, fp32_export):
    import shutil

    empty = workdir / "not-an-export"
    empty.mkdir()
    assert "is not a finetune ONNX export" in one_line_error(held_out, "--onnx", empty)
    export = workdir / "export"
    shutil.copytree(fp32_export, export, ignore=shutil.ignore_patterns("model.onnx*"))
    assert "model.onnx is missing" in one_line_error(held_out, "--onnx", export)


def test_bad_requests(workdir, eval_run, held_out, gpt2_dir):
    assert "does not exist" in one_line_error(workdir / "missing.txt", "--model", gpt2_dir)
    assert "pass one of --run" in one_line_error(held_out)
    assert "pass one of --run" in one_line_error(held_out, "--model", gpt2_dir, "--onnx", workdir)
    assert "--stride 64 must be between 1 and the block size (32)" in one_line_error(
        held_out, "--model", gpt2_dir, "--block-size", BLOCK, "--stride", 64
    )
    assert "exceeds the context" in one_line_error(held_out, "--model", gpt2_dir, "--block-size", 4096)
    assert "--all-checkpoints evaluates the checkpoints of a run" in one_line_error(
        held_out, "--model", gpt2_dir, "--all-checkpoints"
    )
    assert "name the data" in one_line_error("--model", gpt2_dir)
