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


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "{sample}", "--model", "tiny", "--seed", "-1"], "train.seed (--seed) must be in [0, 2**32 - 1]"),
        (["generate", "--run", "recipes", "--seed", "99999999999"], "--seed must be in [0, 2**32 - 1]"),
        (
            ["train", "{sample}", "--model", "tiny", "--steps", "2", "--warmup", "5000"],
            "train.warmup (--warmup) of 5000 steps is not shorter than the 2 training steps",
        ),
        (["train", "{run}", "--model", "tiny", "--run-name", "x"], "is a run directory, not training data"),
        (
            ["generate", "--checkpoint", "{onnx}", "-p", "Title:"],
            "is an ONNX export, not a PyTorch model; sample from it with --onnx",
        ),
        (["generate", "--onnx", "nosuchdir"], "ONNX export directory nosuchdir does not exist"),
        (
            ["generate", "--run", "recipes", "-p", "Title:", "-o", "{dir}"],
            "is a directory, not a file; pass a file path",
        ),
        (["generate", "--run", "recipes", "--prompt-file", "{separators}"], "prompt file '{separators}' is empty"),
        (["export", "--run", "recipes", "--output", "{file}", "--overwrite"], "is a file, not a directory"),
        (["prepare", "{sample}", "--model", "tiny", "--output", "{run}/checkpoint-000060/prep"], "lies inside the run"),
        (["train", "--config", "{dir}", "{sample}"], "is a directory; pass a YAML file"),
        (["train", "{strings}", "--model", "tiny"], 'expected a JSON object; write records such as {{"text": "..."}}'),
        (
            ["train", "{sample}", "--model", "tiny", "--run-name", "recipes", "--steps", "61", "--batch-size", "8"],
            "cannot resume: --batch-size changed (16 -> 8) since the checkpoint",
        ),
    ],
    ids=[
        "train-seed",
        "generate-seed",
        "warmup-longer-than-run",
        "run-dir-as-data",
        "onnx-dir-as-checkpoint",
        "missing-onnx-dir",
        "samples-output-is-a-dir",
        "prompt-file-of-separators",
        "export-output-is-a-file",
        "prepare-into-a-checkpoint",
        "config-is-a-dir",
        "json-list-of-strings",
        "resume-with-another-batch-size",
    ],
)
def test_careless_inputs_are_one_line_and_change_nothing(workdir, trained_run, args, fragment):
    """Cases a new user tried: each is refused before any work, in one line naming the cause."""
    import shutil

    from conftest import SAMPLE

    (workdir / "runs").mkdir()
    shutil.copytree(trained_run, workdir / "runs" / "recipes")
    onnx = workdir / "exp-onnx"
    onnx.mkdir()
    (onnx / "finetune_onnx.json").write_text("{}")
    (workdir / "adir").mkdir()
    (workdir / "afile.txt").write_text("mine")
    (workdir / "seps.txt").write_text("====================\n====================\n")
    (workdir / "strings.json").write_text('["a b c", "d e f"]')
    names = {
        "sample": SAMPLE,
        "run": "runs/recipes",
        "onnx": onnx,
        "dir": "adir",
        "file": "afile.txt",
        "separators": "seps.txt",
        "strings": "strings.json",
    }
    args = [a.format(**names) for a in args]
    before = _snapshot(workdir)
    result = run_cli(*args, expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment.format(**names) in lines[0], result.output
    assert "unexpected" not in result.output
    assert _snapshot(workdir) == before


def test_the_python_api_checks_types_and_takes_a_stop_string_whole(trained_run, monkeypatch):
    import finetune

    with pytest.raises(finetune.FinetuneError, match="data must be a path or a list of paths"):
        finetune.train(123, model="tiny")
    with pytest.raises(finetune.FinetuneError, match="'temperature' must be a number"):
        finetune.generate("Title:", run="recipes", runs_dir=str(trained_run.parent), temperature="hot")
    common = dict(
        run="recipes", runs_dir=str(trained_run.parent), max_new_tokens=40, temperature=0, log=lambda _m: None
    )
    whole = finetune.generate("Title:", **common)[0]
    assert finetune.generate("Title:", stop="zq", **common) == [whole]  # not a stop at every 'z' and 'q'
    first = next(ch for ch in whole[len("Title:") :] if ch.strip())
    assert finetune.generate("Title:", stop=[first], **common)[0] == "Title:" + whole[len("Title:") :].split(first)[0]
