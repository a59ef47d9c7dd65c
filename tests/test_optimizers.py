"""The optimizers besides AdamW train through the CLI; 8-bit AdamW asks for CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import short_runs
from conftest import run_cli
from short_runs import base_args, losses


@pytest.fixture(scope="module")
def plain_gpt2(tmp_path_factory) -> Path:
    return short_runs.plain_gpt2(tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("optimizer", ["adafactor", "sgd"])
def test_other_optimizers(workdir, plain_gpt2, optimizer):
    run_cli(*base_args(plain_gpt2, optimizer, 2, 4, "--optimizer", optimizer))
    assert len(losses(workdir / "runs" / optimizer)) == 2


def test_adamw8bit_needs_cuda(workdir, plain_gpt2):
    result = run_cli(*base_args(plain_gpt2, "8bit", 1, 4, "--optimizer", "adamw8bit"), expect=2)
    assert "--optimizer adamw8bit needs a CUDA GPU" in result.output
