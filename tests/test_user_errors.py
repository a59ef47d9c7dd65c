"""Every mistake a user can make ends in one clear line, exit code 2, no traceback, nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SAMPLE, make_read_only, make_writable, run_cli


def assert_one_clear_line(result, message: str):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:") or line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert message in result.output, result.output


def train_error(*args, message: str):
    result = run_cli("train", *args, "--steps", 1, expect=None)
    assert_one_clear_line(result, message)
    return result


@pytest.fixture
def files(workdir: Path) -> Path:
    (workdir / "empty.txt").write_bytes(b"")
    (workdir / "blank.txt").write_text("  \n\n\t \n")
    (workdir / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (workdir / "latin.txt").write_bytes("Crème brûlée for the café.\n".encode("cp1252") * 20)
    return workdir


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing.txt", "data file 'missing.txt' does not exist"),
        ("empty.txt", "is empty"),
        ("blank.txt", "holds only whitespace"),
        ("binary.txt", "looks binary"),
        ("latin.txt", "it looks like cp1252: pass --encoding cp1252"),
        ("nomatch-*.txt", "no files match"),
    ],
)
def test_bad_data_files(files, name, message):
    train_error(name, "--model", "tiny", message=message)
    assert not (files / "runs").exists(), "a failed start must not create a run"


def test_wrong_encoding_is_fixed_by_the_flag(files, gpt2_dir):
    run_cli(
        "train",
        "latin.txt",
        "--encoding",
        "cp1252",
        "--model",
        gpt2_dir,
        "--steps",
        1,
        "--block-size",
        16,
        "--sample-every",
        0,
        "--run-name",
        "latin",
    )


def test_directory_without_text_files(workdir):
    (workdir / "pics").mkdir()
    (workdir / "pics" / "a.png").write_bytes(b"\x89PNG")
    train_error("pics", "--model", "tiny", message="holds no data files")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "train.batch_size (--batch-size) must be at least 1"),
        (["--val-fraction", "1.5"], "data.val_fraction (--val-fraction) must be in [0, 1)"),
        (["--lr", "0"], "train.lr (--lr) must be positive"),
        (["--block-size", "4096"], "exceeds the model's context of 512 tokens"),
        (["--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
        (["--run-name", "../escape"], "is not a plain name"),
        (["--config", "nope.yaml"], "config file 'nope.yaml' not found"),
    ],
)
def test_bad_flag_values(workdir, args, message):
    train_error(SAMPLE, "--model", "tiny", *args, message=message)


def test_click_type_errors_are_one_line(workdir):
    result = run_cli("train", SAMPLE, "--steps", "many", expect=2)
    assert "Invalid value for '--steps'" in result.output and "Traceback" not in result.output


def test_steps_zero(workdir):
    result = run_cli("train", SAMPLE, "--model", "tiny", "--steps", 0, expect=None)
    assert_one_clear_line(result, "train.steps (--steps) must be at least 1")


def test_no_data(workdir):
    result = run_cli("train", "--model", "tiny", expect=None)
    assert_one_clear_line(result, "no training data given")


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("train:\n  stpes: 3\n", "unknown config key 'train.stpes' in my.yaml (did you mean 'train.steps'?)"),
        ("trian:\n  steps: 3\n", "unknown config section 'trian'"),
        ("train:\n  steps: three\n", "config key 'train.steps' must be an integer, got 'three'"),
        ("train:\n  lr: fast\n", "config key 'train.lr' must be a number"),
        ("train:\n  schedule: wavy\n", "config key 'train.schedule' must be one of cosine, linear, constant"),
        ("data:\n  line_by_line: 1\n", "config key 'data.line_by_line' must be true or false"),
        ("train: [1, 2\n", "is not valid YAML"),
    ],
)
def test_bad_config_files(workdir, yaml_text, message):
    (workdir / "my.yaml").write_text(yaml_text)
    train_error(SAMPLE, "--model", "tiny", "--config", "my.yaml", message=message)


def test_hub_model_without_network(workdir):
    train_error(
        SAMPLE, "--model", "someone/some-model", message="pass a local directory with --model PATH, or --model tiny"
    )


def test_missing_local_model_directory(workdir):
    train_error(
        SAMPLE, "--model", "./models/nothing-here", message="model directory './models/nothing-here' does not exist"
    )


def test_existing_run_is_not_overwritten(workdir, gpt2_dir):
    args = [
        "train",
        SAMPLE,
        "--model",
        gpt2_dir,
        "--steps",
        2,
        "--block-size",
        32,
        "--sample-every",
        0,
        "--run-name",
        "keep",
    ]
    run_cli(*args)
    weights = workdir / "runs/keep/checkpoint-000002/model.safetensors"
    before = weights.read_bytes()
    again = run_cli(*args)
    assert "already reached step 2 of 2" in again.output
    assert weights.read_bytes() == before
    result = run_cli(*args, "--resume", "fresh", expect=None)
    assert_one_clear_line(result, "--resume fresh would discard them: add --overwrite")
    assert weights.read_bytes() == before
    run_cli(*args[:-2], "--steps", 1, "--run-name", "keep", "--overwrite")
    assert not weights.exists() and (workdir / "runs/keep/checkpoint-000001").is_dir()


def test_unknown_run_and_empty_runs_dir(workdir):
    result = run_cli("generate", "--run", "ghost", expect=None)
    assert_one_clear_line(result, "no run named 'ghost'; runs/ has no runs yet")
    result = run_cli("generate", expect=None)
    assert_one_clear_line(result, "no trained runs in runs/")


def test_run_without_checkpoint(workdir):
    (workdir / "runs" / "fresh").mkdir(parents=True)
    result = run_cli("generate", "--run", "fresh", expect=None)
    assert_one_clear_line(result, "run 'fresh' has no checkpoint yet")


def test_unwritable_output_file(trained_run, workdir):
    (workdir / "ro").mkdir()
    if not make_read_only(workdir / "ro"):
        pytest.skip("cannot make a directory read-only here")
    try:
        result = run_cli(
            "generate",
            "--runs-dir",
            trained_run.parent,
            "--max-new-tokens",
            2,
            "--n",
            2,
            "--output",
            workdir / "ro" / "sub" / "x.txt",
            expect=None,
        )
    finally:
        make_writable(workdir / "ro")
    assert_one_clear_line(result, "cannot write samples to")
