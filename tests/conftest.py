"""Shared fixtures: an isolated cache and working directory, tiny model directories, one trained run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from finetune.cli import main

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data" / "recipes.txt"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """No test reads or writes the user's ~/.cache, and nothing reaches for the hub."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["FINETUNE_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(*args: str, expect: int | None = 0):
    """Invoke `finetune ARGS...` in-process, as a user would from the shell."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if expect is not None and result.exit_code != expect:
        detail = result.output
        if result.exception and not isinstance(result.exception, SystemExit):
            import traceback

            detail += "".join(traceback.format_exception(result.exception))
        raise AssertionError(
            f"finetune {' '.join(map(str, args))} exited {result.exit_code}, expected {expect}:\n{detail}"
        )
    return result


def make_read_only(path: Path) -> bool:
    """Make a directory unwritable, even for root (chattr +i); False where that is impossible."""
    import subprocess

    if os.geteuid() != 0:
        path.chmod(0o500)
        return True
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def make_writable(path: Path) -> None:
    import subprocess

    if os.geteuid() != 0:
        path.chmod(0o700)
    else:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def make_model_dir(path: Path, architecture: str = "gpt2", dropout: bool = True) -> Path:
    """A small random-weight model with a byte-level BPE tokenizer, saved like a hub download."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [SAMPLE.read_text()], vocab_size=600, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    common = dict(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if architecture == "gpt2":
        rates = {} if dropout else dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        config = AutoConfig.for_model("gpt2", n_positions=256, n_embd=64, n_layer=2, n_head=2, **rates, **common)
    elif architecture in ("llama", "qwen2", "qwen3", "mistral"):
        config = AutoConfig.for_model(
            architecture,
            max_position_embeddings=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    elif architecture == "gpt_neox":
        config = AutoConfig.for_model(
            "gpt_neox",
            max_position_embeddings=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            **common,
        )
    elif architecture == "opt":  # an architecture the ONNX exporter does not list
        config = AutoConfig.for_model(
            "opt",
            max_position_embeddings=256,
            hidden_size=64,
            ffn_dim=128,
            word_embed_proj_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            **common,
        )
    else:
        raise ValueError(architecture)
    import torch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """The quick-start command, shortened: tiny preset on the sample recipes, 60 steps."""
    root = tmp_path_factory.mktemp("trained")
    run_cli(
        "train",
        SAMPLE,
        "--model",
        "tiny",
        "--runs-dir",
        root / "runs",
        "--run-name",
        "recipes",
        "--steps",
        60,
        "--eval-every",
        15,
        "--sample-every",
        30,
        "--save-every",
        30,
        "--keep",
        1,
    )
    return root / "runs" / "recipes"
