"""Training split across processes through accelerate (DDP, FSDP2; gloo on CPU) matches one process,
saves whole tensors and resumes; the bundled accelerate configs are valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import short_runs
import yaml
from conftest import REPO, read_metrics, run_cli
from short_runs import base_args, losses


@pytest.fixture(scope="module")
def plain_gpt2(tmp_path_factory) -> Path:
    return short_runs.plain_gpt2(tmp_path_factory.mktemp("plain"))


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
        "loss.png",  # drawn by rank 0 only
        "metrics.jsonl",
        "samples",
        "status.json",
    ]
    assert json.loads((workdir / "runs/ddp/status.json").read_text())["status"] == "finished"  # rank 0 wrote it
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


@pytest.mark.parametrize(
    "lora", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["full", "lora"]
)  # LoRA under FSDP: 20 s more, slow
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


def test_accelerate_configs_are_valid_yaml_with_commands():
    files = sorted((REPO / "configs/accelerate").glob("*.yaml"))
    assert {f.stem for f in files} >= {"ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3", "multi-node"}
    for f in files:
        text = f.read_text()
        assert "finetune train" in text.split("\n\n")[0] or "finetune train" in text
        assert yaml.safe_load(text)["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
