"""Scale-out features through the CLI: accelerate multi-process (gloo on CPU), LoRA, memory savers,
optimizers and the dry-run memory planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SAMPLE, make_model_dir, read_metrics, run_cli


@pytest.fixture(scope="module")
def plain_gpt2(tmp_path_factory) -> Path:
    """No dropout, so runs split across processes can match a single-process run exactly."""
    return make_model_dir(tmp_path_factory.mktemp("plain") / "gpt2", "gpt2", dropout=False)


def base_args(model_dir: Path, run: str, steps: int, batch: int, *extra) -> list:
    return [
        "train",
        SAMPLE,
        "--model",
        model_dir,
        "--run-name",
        run,
        "--steps",
        steps,
        "--batch-size",
        batch,
        "--block-size",
        32,
        "--log-every",
        1,
        "--eval-every",
        2,
        "--sample-every",
        0,
        "--save-every",
        2,
        *extra,
    ]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def test_two_processes_match_one_process_and_resume(workdir, plain_gpt2):
    import subprocess
    import sys

    # The reference is also stopped at step 2 and continued to 4 (extending --steps reshapes the LR schedule).
    run_cli(*base_args(plain_gpt2, "single", 2, 4))
    run_cli(*base_args(plain_gpt2, "single", 4, 4))

    def launch(*args):
        cmd = [sys.executable, "-m", "finetune", *map(str, args)]
        result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    # 2 gloo processes x batch 2 = the same global batch of 4, through an accelerate config file.
    err = launch(
        *base_args(plain_gpt2, "ddp", 2, 2),
        "--num-processes",
        2,
        "--accelerate-config",
        REPO / "configs/accelerate/ddp.yaml",
    )
    assert (
        "2 blocks per device x 1 accumulation x 2 processes" in err
        or "(2 per device x 1 accumulation x 2 processes)" in err
    )
    launch(*base_args(plain_gpt2, "ddp", 4, 2), "--num-processes", 2)  # resumes from step 2
    single, ddp = losses(workdir / "runs/single"), losses(workdir / "runs/ddp")
    assert len(ddp) == 4, "only the main process logs, once per step"
    for a, b in zip(single, ddp):
        assert abs(a - b) < 1e-4, (single, ddp)
    evals = [m for m in read_metrics(workdir / "runs/ddp") if "val_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert sorted(p.name for p in (workdir / "runs/ddp").iterdir()) == [
        "checkpoint-000002",
        "checkpoint-000004",
        "config.yaml",
        "latest",
        "metrics.jsonl",
        "samples",
    ]
    # The optimizer file holds whole moments keyed by parameter name, equal to the single process's.
    import torch

    from finetune.checkpoint import load_torch_file

    state = "checkpoint-000004/training_state/optimizer.pt"
    one, two = load_torch_file(workdir / "runs/single" / state), load_torch_file(workdir / "runs/ddp" / state)
    assert set(one["state"]) == set(two["state"]) and "lm_head.weight" not in one["state"]  # tied to wte
    assert "transformer.h.0.attn.c_attn.weight" in two["state"]
    for name in one["state"]:
        torch.testing.assert_close(
            one["state"][name]["exp_avg_sq"], two["state"][name]["exp_avg_sq"], rtol=1e-3, atol=1e-9
        )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_training_saves_and_resumes_like_one_process(workdir, plain_gpt2, lora):
    """The CLI's loop under accelerate's FSDP2 (full shard) on 2 CPU processes: see tests/fsdp_cli.py."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from finetune.checkpoint import load_torch_file

    def fsdp(*args):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tests/fsdp_cli.py"),
            *map(str, args),
        ]
        result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result.stderr

    # One process trains 4 steps straight; FSDP stops at step 2 and resumes to 4, so it only matches
    # if the optimizer moments come back (a constant LR keeps the two schedules the same).
    flat = ("--schedule", "constant", "--warmup", 0, "--lr", "1e-3", *(("--lora", "--lora-dropout", 0) if lora else ()))
    one_run, fsdp_run = ("lora-one", "lora-fsdp") if lora else ("one", "fsdp")
    run_cli(*base_args(plain_gpt2, one_run, 4, 4), *flat)
    for steps in (2, 4):
        err = fsdp(*base_args(plain_gpt2, fsdp_run, steps, 2), *flat, "--sample-every", 2)
    assert f"resuming run '{fsdp_run}' from checkpoint-000002" in err and "warning" not in err
    # Sampling needs every rank's shard of the weights: all ranks generate, rank 0 writes.
    assert sorted(p.name for p in (workdir / "runs" / fsdp_run / "samples").iterdir()) == [
        "samples-000002.txt",
        "samples-000004.txt",
    ]
    one, sharded = losses(workdir / "runs" / one_run), losses(workdir / "runs" / fsdp_run)
    assert len(sharded) == 4 and all(abs(a - b) < 1e-4 for a, b in zip(one, sharded)), (one, sharded)
    state = "checkpoint-000004/training_state/optimizer.pt"
    a = load_torch_file(workdir / "runs" / one_run / state)["state"]
    b = load_torch_file(workdir / "runs" / fsdp_run / state)["state"]
    assert set(a) == set(b) and (all("lora_" in name for name in a) if lora else "transformer.wte.weight" in a)
    for name in a:
        torch.testing.assert_close(a[name]["exp_avg"], b[name]["exp_avg"], rtol=1e-3, atol=1e-7)
    # The checkpoint holds whole tensors (the model, or the adapter), equal to the single process's.
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    ours = load_file(workdir / "runs" / fsdp_run / "checkpoint-000004" / weights)
    reference = load_file(workdir / "runs" / one_run / "checkpoint-000004" / weights)
    assert set(ours) == set(reference)
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-3, atol=1e-5)
    # and generates like any checkpoint
    assert run_cli("generate", "--run", fsdp_run, "--prompt", "Title:", "--max-new-tokens", 4).stdout.startswith(
        "Title:"
    )


def test_fsdp_optimizer_state_is_gathered_and_resharded(tmp_path):
    """FSDP2 on 2 gloo processes (see the worker): the whole state is saved, and restored shard by shard."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "tests/fsdp_optimizer_worker.py"),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and (tmp_path / "ok").is_file(), result.stdout[-2000:] + result.stderr[-3000:]


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_lora_train_generate_resume_and_merged_export(workdir, architecture):
    import torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_model_dir(workdir / f"base-{architecture}", architecture)
    before = load_file(base / "model.safetensors")
    args = base_args(base, "lora", 2, 4, "--lora", "--lora-r", 4, "--lr", "5e-3")
    out = run_cli(*args).output
    assert "trainable)" in out
    ckpt = workdir / "runs/lora/checkpoint-000002"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists(), "a LoRA checkpoint holds the adapter only"
    run_cli(*base_args(base, "lora", 4, 4, "--lora", "--lora-r", 4, "--lr", "5e-3"))  # resume
    ckpt = workdir / "runs/lora/checkpoint-000004"
    evals = [m["val_loss"] for m in read_metrics(workdir / "runs/lora") if "val_loss" in m]
    assert evals[-1] < evals[0]
    assert all(torch.equal(before[k], v) for k, v in load_file(base / "model.safetensors").items())

    text = run_cli("generate", "--run", "lora", "--prompt", "Title:", "--max-new-tokens", 5, "--temperature", 0).stdout
    assert text.startswith("Title:")
    run_cli("export", "--run", "lora", "--output", workdir / "merged")
    merged = AutoModelForCausalLM.from_pretrained(workdir / "merged")
    adapted = AutoPeftModelForCausalLM.from_pretrained(str(ckpt)).eval()
    direct = AutoModelForCausalLM.from_pretrained(ckpt)  # transformers loads base + adapter itself
    ids = AutoTokenizer.from_pretrained(workdir / "merged")("Title: Lemon", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = adapted(ids).logits
        assert (merged(ids).logits - reference).abs().max() < 1e-4
        assert (direct(ids).logits - reference).abs().max() < 1e-4
    assert not any(k.startswith("base_model") or "lora" in k for k in load_file(workdir / "merged/model.safetensors"))
    # ONNX: the adapter merged, the graph fused and verified, the same greedy text as the torch path.
    run_cli("export", "--run", "lora", "--format", "onnx", "--output", workdir / "lora-onnx")
    assert json.loads((workdir / "lora-onnx" / "verification.json").read_text())["greedy_identical"]
    onnx_text = run_cli(
        "generate", "--onnx", workdir / "lora-onnx", "--prompt", "Title:", "--max-new-tokens", 5, "--temperature", 0
    ).stdout
    assert onnx_text == text


def test_lora_errors(workdir, gpt2_dir):
    result = run_cli("train", SAMPLE, "--model", "tiny", "--lora", "--steps", 1, expect=2)
    assert "--lora adapts a pretrained model" in result.output
    result = run_cli("train", SAMPLE, "--model", gpt2_dir, "--lora", "--load-in-4bit", "--steps", 1, expect=2)
    assert "--load-in-4bit (QLoRA) needs a CUDA GPU" in result.output
    result = run_cli("train", SAMPLE, "--model", gpt2_dir, "--load-in-4bit", "--steps", 1, expect=2)
    assert "add --lora" in result.output
    result = run_cli(
        "train",
        SAMPLE,
        "--model",
        gpt2_dir,
        "--lora",
        "--lora-targets",
        "nope",
        "--steps",
        1,
        "--block-size",
        32,
        expect=2,
    )
    assert "check --lora-targets" in result.output


def test_gradient_checkpointing_gives_the_same_loss(workdir, plain_gpt2):
    run_cli(*base_args(plain_gpt2, "plain", 3, 4))
    run_cli(*base_args(plain_gpt2, "ckpt", 3, 4, "--gradient-checkpointing"))
    for a, b in zip(losses(workdir / "runs/plain"), losses(workdir / "runs/ckpt")):
        assert abs(a - b) < 1e-5


def test_freeze_layers_and_train_only_blocks(workdir, plain_gpt2):
    from safetensors.torch import load_file

    base = load_file(plain_gpt2 / "model.safetensors")
    run_cli(*base_args(plain_gpt2, "frozen", 2, 4, "--freeze-layers", 1, "--lr", "1e-2"))
    after = load_file(workdir / "runs/frozen/checkpoint-000002/model.safetensors")
    changed = {k for k in base if not (base[k] == after[k]).all()}
    assert not any(k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.")) for k in changed)
    assert any(k.startswith("transformer.h.1.") for k in changed)
    run_cli(*base_args(plain_gpt2, "blocks", 2, 4, "--train-only-blocks", "--lr", "1e-2"))
    after = load_file(workdir / "runs/blocks/checkpoint-000002/model.safetensors")
    changed = {k for k in base if not (base[k] == after[k]).all()}
    assert changed and all(k.startswith("transformer.h.") for k in changed)


@pytest.mark.parametrize("optimizer", ["adafactor", "sgd"])
def test_other_optimizers(workdir, plain_gpt2, optimizer):
    run_cli(*base_args(plain_gpt2, optimizer, 2, 4, "--optimizer", optimizer))
    assert len(losses(workdir / "runs" / optimizer)) == 2


def test_adamw8bit_needs_cuda(workdir, plain_gpt2):
    result = run_cli(*base_args(plain_gpt2, "8bit", 1, 4, "--optimizer", "adamw8bit"), expect=2)
    assert "--optimizer adamw8bit needs a CUDA GPU" in result.output


def _measured_peak_bytes(model_dir: Path, batch: int, block: int) -> int:
    """Peak tensor memory of real training steps on CPU, tracked by torch's MemTracker."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, block))
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for _ in range(2):  # the second step holds the optimizer state too
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            tracker.reset_mod_stats()
    return sum(v.get("Total", 0) for v in tracker.get_tracker_snapshot("peak").values())


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_dry_run_estimate_is_within_25_percent_of_measured_peak(workdir, architecture, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = make_model_dir(workdir / architecture, architecture)
    config = AutoConfig.from_pretrained(model_dir)  # widen the tiny model so tensors, not noise, dominate
    config.vocab_size = 4000
    if architecture == "gpt2":
        config.n_embd, config.n_layer, config.n_head = 256, 4, 4
    else:
        config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 688, 4
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    out = run_cli("train", SAMPLE, "--model", model_dir, "--batch-size", 8, "--block-size", 128, "--dry-run").output
    estimate = (
        float(next(l for l in out.splitlines() if l.strip().startswith("total")).split()[1].replace(",", "")) * 1e6
    )
    measured = _measured_peak_bytes(model_dir, 8, 128)
    ratio = estimate / measured
    print(
        f"{architecture}: dry-run estimate {estimate / 1e6:.0f} MB, measured peak {measured / 1e6:.0f} MB, ratio {ratio:.2f}"
    )
    assert 0.75 <= ratio <= 1.25, (estimate, measured)
    assert "effective batch: 8 blocks = 1,024 tokens per optimizer step" in out
    assert not (workdir / "runs").exists(), "a dry run trains and writes nothing"


def test_dry_run_lora_counts_and_oom_warning(workdir, gpt2_dir):
    out = run_cli("train", SAMPLE, "--model", gpt2_dir, "--lora", "--dry-run", "--batch-size", 2).output
    line = next(l for l in out.splitlines() if l.startswith("parameters:"))
    trainable = int(line.split("(")[1].split()[0].replace(",", ""))
    assert 0 < trainable < 50_000
    huge = run_cli(
        "train", SAMPLE, "--model", gpt2_dir, "--dry-run", "--batch-size", 200000, "--block-size", 256
    ).output
    assert "will probably run out of memory" in huge


def test_accelerate_configs_are_valid_yaml_with_commands():
    files = sorted((REPO / "configs/accelerate").glob("*.yaml"))
    assert {f.stem for f in files} >= {"ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3", "multi-node"}
    for f in files:
        text = f.read_text()
        assert "finetune train" in text.split("\n\n")[0] or "finetune train" in text
        assert yaml.safe_load(text)["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
