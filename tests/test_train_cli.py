"""`finetune train` end to end on CPU with tiny models, driven through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, SAMPLE, read_metrics, run_cli

CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def test_tiny_preset_learns_the_sample_corpus(trained_run: Path):
    metrics = read_metrics(trained_run)
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m for m in metrics if "val_loss" in m]
    assert losses[-1] < losses[0] - 1.0, losses
    assert len(evals) == 4
    first, last = evals[0]["val_perplexity"], evals[-1]["val_perplexity"]
    assert last <= 0.7 * first, f"validation perplexity fell only from {first} to {last}"
    assert all(m["tokens_per_s"] > 0 for m in metrics if "tokens_per_s" in m)


def test_run_directory_layout(trained_run: Path):
    checkpoints = sorted(p.name for p in trained_run.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-000060"], "keep=1 prunes older checkpoints"
    assert (trained_run / "latest").read_text().strip() == "checkpoint-000060"
    ckpt = trained_run / "checkpoint-000060"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "training_state/state.json",
    ):
        assert (ckpt / name).is_file(), name
    assert sorted(p.name for p in (trained_run / "samples").iterdir()) == ["samples-000030.txt", "samples-000060.txt"]
    assert (trained_run / "samples" / "samples-000060.txt").read_text().strip()
    resolved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert resolved["model"]["name"] == "tiny"
    assert resolved["train"]["steps"] == 60 and resolved["train"]["run_name"] == "recipes"
    assert resolved["data"]["block_size"] == 128
    assert not list(trained_run.glob(".tmp-*"))


def test_checkpoint_loads_with_auto_classes(trained_run: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = trained_run / "checkpoint-000060"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = tokenizer("Title: Lemon", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert tokenizer.eos_token == "<|endoftext|>"


def test_llama_preset_trains_and_generates(workdir):
    run_cli(
        "train",
        SAMPLE,
        "--model",
        "tiny-llama",
        "--steps",
        12,
        "--eval-every",
        6,
        "--sample-every",
        0,
        "--run-name",
        "llama",
    )
    metrics = read_metrics(workdir / "runs" / "llama")
    evals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert evals[-1] < evals[0]
    config = yaml.safe_load((workdir / "runs/llama/checkpoint-000012/config.json").read_text())
    assert config["model_type"] == "llama"
    out = run_cli(
        "generate", "--run", "llama", "--prompt", "Title:", "--n", 2, "--max-new-tokens", 8, "--seed", 3
    ).output
    assert out.count("====================") == 2 and out.startswith("Title:")


@pytest.mark.parametrize("arch_fixture", ["gpt2_dir", "llama_dir"])
def test_finetune_a_local_model_directory(workdir, arch_fixture, request):
    """The fine-tuning path (a pretrained model by path) for both architectures."""
    model_dir = request.getfixturevalue(arch_fixture)
    run_cli(
        "train",
        SAMPLE,
        "--model",
        model_dir,
        "--steps",
        6,
        "--block-size",
        64,
        "--batch-size",
        4,
        "--eval-every",
        3,
        "--sample-every",
        3,
        "--run-name",
        "ft",
        "--lr",
        "1e-3",
    )
    run_dir = workdir / "runs" / "ft"
    evals = [m["val_loss"] for m in read_metrics(run_dir) if "val_loss" in m]
    assert evals[-1] < evals[0]
    out = run_cli("generate", "--run", "ft", "--prompt", "Serves:", "--max-new-tokens", 5, "--temperature", 0).output
    assert out.startswith("Serves:")


def test_second_run_on_same_data_reuses_the_cache(workdir, gpt2_dir):
    args = [
        "train",
        SAMPLE,
        "--model",
        gpt2_dir,
        "--steps",
        1,
        "--cache-dir",
        workdir / "cache",
        "--block-size",
        64,
        "--sample-every",
        0,
        "--eval-every",
        0,
    ]
    first = run_cli(*args, "--run-name", "a")
    second = run_cli(*args, "--run-name", "b")
    assert "data (tokenized)" in first.output
    assert "data (cache)" in second.output
    # Changing the block size is a different dataset: tokenized again.
    third = run_cli(*args[:-4], "--block-size", 32, "--sample-every", 0, "--eval-every", 0, "--run-name", "c")
    assert "data (tokenized)" in third.output


def test_cache_hit_does_not_tokenize(workdir, gpt2_dir, monkeypatch):
    args = [
        "train",
        SAMPLE,
        "--model",
        gpt2_dir,
        "--steps",
        1,
        "--block-size",
        48,
        "--sample-every",
        0,
        "--eval-every",
        0,
    ]
    run_cli(*args, "--run-name", "warm")
    import finetune.token_cache

    def fail(*_a, **_k):
        raise AssertionError("tokenized on a cache hit")

    monkeypatch.setattr(finetune.token_cache, "tokenize_to_file", fail)
    run_cli(*args, "--run-name", "hit")


@pytest.mark.parametrize("config_file", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_every_bundled_config_runs(workdir, config_file, gpt2_dir):
    """Configs cannot rot: each runs for a few steps (on a tiny model when it names a hub model)."""
    cfg = yaml.safe_load(config_file.read_text())
    args = [
        "train",
        SAMPLE,
        "--config",
        config_file,
        "--steps",
        3,
        "--eval-every",
        2,
        "--sample-every",
        2,
        "--save-every",
        2,
        "--run-name",
        "cfg",
    ]
    if cfg.get("model", {}).get("name") not in ("tiny", "tiny-llama"):
        args += ["--model", gpt2_dir, "--block-size", 64, "--batch-size", 2]
    run_cli(*args)
    assert (workdir / "runs/cfg/checkpoint-000003/model.safetensors").is_file()


def test_config_file_and_flags_layer(workdir, gpt2_dir):
    (workdir / "my.yaml").write_text(
        "train:\n  steps: 2\n  lr: 3e-4\n  eval_every: 0\n  sample_every: 0\ndata:\n  block_size: 32\n"
    )
    run_cli("train", SAMPLE, "--model", gpt2_dir, "--config", "my.yaml", "--steps", 3, "--run-name", "layers")
    resolved = yaml.safe_load((workdir / "runs/layers/config.yaml").read_text())
    assert resolved["train"]["steps"] == 3  # flag beats file
    assert resolved["train"]["lr"] == 3e-4  # file beats default
    assert resolved["data"]["block_size"] == 32
    assert resolved["train"]["batch_size"] == 8  # default


def test_line_by_line_and_epochs(workdir, gpt2_dir):
    data = workdir / "lines.txt"
    data.write_text("\n".join(f"line number {i} says hello" for i in range(200)) + "\n")
    result = run_cli(
        "train",
        data,
        "--model",
        gpt2_dir,
        "--line-by-line",
        "--epochs",
        1,
        "--block-size",
        32,
        "--batch-size",
        8,
        "--sample-every",
        0,
        "--run-name",
        "lines",
    )
    assert "200 documents" in result.output
    state = read_metrics(workdir / "runs/lines")
    assert max(m["step"] for m in state) >= 1


def test_val_file_and_directory_and_glob(workdir, gpt2_dir):
    docs = workdir / "docs"
    docs.mkdir()
    text = SAMPLE.read_text().split("<|endoftext|>")
    for i, chunk in enumerate(text[:40]):
        (docs / f"r{i:02d}.txt").write_text(chunk)
    (workdir / "val.txt").write_text("<|endoftext|>".join(text[40:50]))
    result = run_cli(
        "train",
        docs,
        "--model",
        gpt2_dir,
        "--val-file",
        "val.txt",
        "--steps",
        2,
        "--block-size",
        64,
        "--eval-every",
        2,
        "--sample-every",
        0,
        "--run-name",
        "dir",
    )
    assert "40 documents" in result.output
    assert any("val_loss" in m for m in read_metrics(workdir / "runs/dir"))
    result = run_cli(
        "train",
        str(docs / "r0*.txt"),
        "--model",
        gpt2_dir,
        "--steps",
        1,
        "--block-size",
        64,
        "--eval-every",
        0,
        "--sample-every",
        0,
        "--run-name",
        "glob",
    )
    assert "10 documents" in result.output


def test_corpus_shorter_than_a_block_still_trains(workdir, gpt2_dir):
    (workdir / "short.txt").write_text("Title: Toast\nServes: 1\n")
    result = run_cli(
        "train", "short.txt", "--model", gpt2_dir, "--steps", 2, "--sample-every", 0, "--run-name", "short"
    )
    assert "fewer than one block" in result.output
    assert (workdir / "runs/short/checkpoint-000002").is_dir()


def test_seeded_cpu_runs_are_reproducible(workdir, gpt2_dir):
    args = [
        "train",
        SAMPLE,
        "--model",
        gpt2_dir,
        "--steps",
        4,
        "--block-size",
        32,
        "--batch-size",
        2,
        "--log-every",
        1,
        "--eval-every",
        0,
        "--sample-every",
        0,
    ]
    run_cli(*args, "--run-name", "s1")
    run_cli(*args, "--run-name", "s2")

    def losses(run: str) -> list[float]:
        return [m["loss"] for m in read_metrics(workdir / "runs" / run)]

    assert losses("s1") == losses("s2")


def test_python_api_matches_cli_defaults(workdir, gpt2_dir):
    import finetune

    result = finetune.train(str(SAMPLE), model=str(gpt2_dir), steps=2, block_size=32, sample_every=0, run_name="api")
    assert result.step == 2 and result.checkpoint.name == "checkpoint-000002"
    texts = finetune.generate("Title:", run="api", n=2, max_new_tokens=4, seed=0)
    assert len(texts) == 2 and all(t.startswith("Title:") for t in texts)
