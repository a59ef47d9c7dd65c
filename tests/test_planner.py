"""The dry-run memory planner (planner.py): its estimate against a measured peak, LoRA counts, the OOM warning."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SAMPLE, make_model_dir, run_cli


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
        float(next(ln for ln in out.splitlines() if ln.strip().startswith("total")).split()[1].replace(",", "")) * 1e6
    )
    measured = _measured_peak_bytes(model_dir, 8, 128)
    ratio = estimate / measured
    print(
        f"{architecture}: dry-run estimate {estimate / 1e6:.0f} MB, "
        f"measured peak {measured / 1e6:.0f} MB, ratio {ratio:.2f}"
    )
    assert 0.75 <= ratio <= 1.25, (estimate, measured)
    assert "effective batch: 8 blocks = 1,024 tokens per optimizer step" in out
    assert not (workdir / "runs").exists(), "a dry run trains and writes nothing"


def test_dry_run_lora_counts_and_oom_warning(workdir, gpt2_dir):
    out = run_cli("train", SAMPLE, "--model", gpt2_dir, "--lora", "--dry-run", "--batch-size", 2).output
    line = next(ln for ln in out.splitlines() if ln.startswith("parameters:"))
    trainable = int(line.split("(")[1].split()[0].replace(",", ""))
    assert 0 < trainable < 50_000
    huge = run_cli(
        "train", SAMPLE, "--model", gpt2_dir, "--dry-run", "--batch-size", 200000, "--block-size", 256
    ).output
    assert "will probably run out of memory" in huge
