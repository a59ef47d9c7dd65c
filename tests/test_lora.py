"""LoRA adapters (peft) through the CLI: train, resume, generate, export merged (safetensors and ONNX), and errors."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE, make_model_dir, read_metrics, run_cli
from short_runs import base_args


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
