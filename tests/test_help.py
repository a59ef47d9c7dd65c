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
