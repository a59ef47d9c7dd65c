"""How the CLI ends on errors: usage errors and user errors in one line, bugs in one line plus a log file."""

from __future__ import annotations

import pytest

from conftest import run_cli


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "--steps", "abc"], "Invalid value for '--steps': 'abc' is not a valid integer"),
        (["nosuch"], "No such command 'nosuch'"),
        (["generate", "--temperature"], "Option '--temperature' requires an argument"),
        (["export", "--format", "gguf"], "Invalid value for '--format'"),
        (["train", "--no-such-flag"], "No such option '--no-such-flag'"),
    ],
)
def test_usage_errors_are_one_line_naming_the_help(workdir, args, fragment):
    result = run_cli(*args, expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
    assert "--help`)" in lines[0] and "Usage:" not in result.output


def test_an_unforeseen_exception_is_one_line_with_the_traceback_in_a_log_file(workdir, monkeypatch, isolated_cache):
    import finetune.api

    def broken(**_options):
        raise KeyError("surprise")

    monkeypatch.setattr(finetune.api, "export", broken)
    monkeypatch.delenv("FINETUNE_DEBUG", raising=False)
    result = run_cli("export", "--run", "x", expect=1)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unexpected KeyError: 'surprise'"), result.output
    log = lines[0].split("the full traceback is in ")[1].split(". Please")[0]
    text = open(log, encoding="utf-8").read()
    assert "Traceback" in text and "def broken" not in text and "raise KeyError" in text

    monkeypatch.setenv("FINETUNE_DEBUG", "1")
    result = run_cli("export", "--run", "x", expect=1)
    assert "Traceback" in result.output and 'raise KeyError("surprise")' in result.output
