"""Help texts show examples, and `finetune --help` never imports torch (it must stay instant)."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_cli


def test_help_has_examples():
    top = run_cli("--help").output
    assert "finetune train sample_data/recipes.txt --model tiny" in top
    for command in ("train", "generate"):
        text = run_cli(command, "--help").output
        assert "Examples:" in text and f"finetune {command} " in text


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from finetune.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_recorded_command_line_round_trips_through_the_parser():
    """The command stored in checkpoints (and re-run under accelerate) must parse back to the same options."""
    import shlex

    from finetune.cli import _command_line

    line = _command_line(
        "train",
        ["a.txt"],
        {
            "config": None,
            "datasets": ["x/y", "z"],
            "lora_targets": ["q_proj", "v_proj"],
            "lr": 0.001,
            "overwrite": True,
            "line_by_line": False,
        },
    )
    assert shlex.split(line) == [
        "finetune",
        "train",
        "a.txt",
        "--dataset",
        "x/y",
        "--dataset",
        "z",
        "--lora-targets",
        "q_proj,v_proj",
        "--lr",
        "0.001",
        "--overwrite",
    ]
    from finetune.cli import train

    params = train.make_context("train", shlex.split(line)[2:]).params
    assert params["datasets"] == ("x/y", "z") and params["lora_targets"] == "q_proj,v_proj"
    assert params["lr"] == 0.001 and params["overwrite"] is True and params["data"] == ("a.txt",)
