"""`finetune generate` and `finetune export` on bad inputs: one line naming the file and the fix, exit 2.

The model directories here are copies of the session's tiny GPT-2 (no training), damaged one file
at a time; a "run" is such a copy laid out as a run directory with its training state.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import run_cli

CHECKPOINT = "checkpoint-000001"


def assert_one_clear_line(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], result.output


def fake_run(root: Path, model_dir: Path, name: str = "r", **state) -> Path:
    """runs/<name>/checkpoint-000001: a copy of `model_dir` with the files training leaves beside it."""
    run_dir = root / "runs" / name
    checkpoint = run_dir / CHECKPOINT
    shutil.copytree(model_dir, checkpoint)
    (checkpoint / "training_state").mkdir()
    (checkpoint / "training_state" / "state.json").write_text(json.dumps({"step": 1, "chat": False, **state}))
    (run_dir / "config.yaml").write_text("model:\n  name: tiny\n")
    (run_dir / "latest").write_text(CHECKPOINT + "\n")
    return checkpoint


def empty_vocabulary(path: Path) -> None:
    """A well-formed tokenizer.json that knows no tokens (transformers loads it, and every text encodes to [])."""
    tokenizer = json.loads(path.read_text())
    tokenizer["model"].update(vocab={}, merges=[])
    tokenizer["added_tokens"] = []
    path.write_text(json.dumps(tokenizer))


def edit_json(path: Path, **values) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def damage_weights(directory: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


def make_nan(tensors) -> None:
    tensors["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")


def make_eos_certain(tensors) -> None:
    """Every position's hidden state becomes 10*e0 and only EOS (id 0) has a component there: EOS always wins."""
    tensors["transformer.ln_f.weight"].zero_()
    tensors["transformer.ln_f.bias"].zero_()
    tensors["transformer.ln_f.bias"][0] = 10.0
    tensors["transformer.wte.weight"][:, 0] = 0.0
    tensors["transformer.wte.weight"][0, 0] = 10.0


def export_args(checkpoint: Path, output: Path, *extra) -> list:
    return ["export", "--checkpoint", checkpoint, "--output", output, "--no-verify", *extra]


# Damage to one file -> (the file the message must name, words it must say).
DAMAGE = {
    "config-garbage": (lambda d: (d / "config.json").write_text("{garbage"), "config.json", "not valid JSON"),
    "config-list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json", "holds a JSON list"),
    "config-field-type": (lambda d: edit_json(d / "config.json", n_embd="wide"), "config.json", "n_embd"),
    "config-width": (lambda d: edit_json(d / "config.json", n_embd=128), "config.json", "disagree"),
    "config-extra-layer": (lambda d: edit_json(d / "config.json", n_layer=3), "config.json", "disagree"),
    "generation-config": (
        lambda d: (d / "generation_config.json").write_text("garbage"),
        "generation_config.json",
        "not valid JSON",
    ),
    "tokenizer-garbage": (lambda d: (d / "tokenizer.json").write_text("garbage"), "tokenizer.json", "not valid JSON"),
    "tokenizer-not-a-tokenizer": (
        lambda d: (d / "tokenizer.json").write_text('{"model": {}}'),
        "tokenizer.json",
        "corrupt",
    ),
    "tokenizer-missing": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json", "has no tokenizer"),
    "tokenizer-empty": (lambda d: empty_vocabulary(d / "tokenizer.json"), "tokenizer.json", "has no vocabulary"),
    "tokenizer-config": (
        lambda d: (d / "tokenizer_config.json").write_text("[]"),
        "tokenizer_config.json",
        "holds a JSON list",
    ),
    "adapter-config": (
        lambda d: (d / "adapter_config.json").write_text("{oops"),
        "adapter_config.json",
        "not valid JSON",
    ),
    "state-garbage": (
        lambda d: (d / "training_state" / "state.json").write_text("garbage"),
        "state.json",
        "not valid JSON",
    ),
    "state-list": (lambda d: (d / "training_state" / "state.json").write_text("[]"), "state.json", "holds a JSON list"),
}


@pytest.mark.parametrize("command", ["generate", "export"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_file_is_named(workdir, gpt2_dir, damage, command):
    checkpoint = fake_run(workdir, gpt2_dir)
    change, file, words = DAMAGE[damage]
    change(checkpoint)
    if command == "generate":
        result = run_cli(
            "generate", "--checkpoint", checkpoint, "--prompt", "Title:", "--max-new-tokens", 4, expect=None
        )
    else:
        result = run_cli(*export_args(checkpoint, workdir / "out"), expect=None)
        assert not (workdir / "out").exists()
    assert_one_clear_line(result, file, words, "use an earlier checkpoint")


def test_weights_holding_nan_are_refused_at_load(workdir, gpt2_dir):
    checkpoint = fake_run(workdir, gpt2_dir)
    damage_weights(checkpoint, make_nan)
    expected = (
        f"the weights in {checkpoint / 'model.safetensors'} hold NaN/inf",
        "training diverged",
        "use an earlier checkpoint",
    )
    assert_one_clear_line(run_cli("generate", "--checkpoint", checkpoint, "--prompt", "Title:", expect=None), *expected)
    result = run_cli(*export_args(checkpoint, workdir / "out"), expect=None)
    assert_one_clear_line(result, *expected)
    assert "please report" not in result.output


def test_pickled_weights_are_never_unpickled(workdir, gpt2_dir):
    import torch

    model = workdir / "pickled"
    shutil.copytree(gpt2_dir, model)
    (model / "model.safetensors").unlink()
    marker = workdir / "unpickled"

    class Payload:  # unpickling it creates `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "x": Payload()}, model / "pytorch_model.bin")
    for args in (["generate", "--model", model, "--prompt", "Title:"], export_args(model, workdir / "out")):
        result = run_cli(*args, expect=None)
        assert_one_clear_line(
            result, "pytorch_model.bin", "pickle", "only if you trust", "use_safetensors=False", "save_pretrained"
        )
    assert not marker.exists()


def test_a_run_directory_where_a_checkpoint_is_expected(workdir, gpt2_dir):
    checkpoint = fake_run(workdir, gpt2_dir, name="recipes")
    run_dir = checkpoint.parent
    for args in (
        ["generate", "--model", run_dir],
        ["generate", "--checkpoint", run_dir],
        ["export", "--checkpoint", run_dir],
    ):
        result = run_cli(*args, expect=None)
        assert_one_clear_line(result, "is a run directory", "--run recipes", f"--checkpoint {checkpoint}")
    assert_one_clear_line(run_cli("generate", "--model", workdir / "runs", expect=None), "holds runs", "--runs-dir")


def test_no_runs_hint_names_only_options_the_command_has(workdir):
    result = run_cli("export", expect=None)
    assert_one_clear_line(result, "no trained runs", "--checkpoint DIR")
    assert "--model" not in result.output
    assert_one_clear_line(run_cli("generate", expect=None), "no trained runs", "--model")


def test_a_directory_named_like_a_preset(workdir, gpt2_dir):
    (workdir / "tiny").mkdir()  # not a model: the name means the from-scratch preset, and the warning says so
    result = run_cli("generate", "--model", "tiny", expect=None)
    assert_one_clear_line(result, "'tiny' is a from-scratch preset", "--run NAME")
    assert "using the from-scratch preset 'tiny'" in result.output
    shutil.rmtree(workdir / "tiny")
    shutil.copytree(gpt2_dir, workdir / "tiny")  # a model directory: used, and the warning says so
    result = run_cli("generate", "--model", "tiny", "--prompt", "Title:", "--max-new-tokens", 3)
    assert "using the model directory ./tiny" in result.output


@pytest.mark.parametrize("where", ["checkpoint", "inside-run", "around-runs"])
def test_export_never_writes_over_training_files(workdir, gpt2_dir, where):
    checkpoint = fake_run(workdir, gpt2_dir)
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    output = {"checkpoint": checkpoint, "inside-run": checkpoint.parent / "export", "around-runs": workdir}[where]
    result = run_cli(*export_args(checkpoint, output, "--overwrite"), expect=None)
    assert_one_clear_line(result, f"--output {output}", "must not write over")
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def test_two_exports_into_one_directory(workdir, gpt2_dir):
    from finetune.locking import exclusive

    with exclusive(workdir / "out", "export output", "wait"):  # as a running export holds it
        result = run_cli(*export_args(gpt2_dir, workdir / "out"), expect=None)
    assert_one_clear_line(result, "in use by another finetune process", f"pid {os.getpid()}", "--output")
    assert not (workdir / "out").exists()


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def safetensors_disk_full(*_args, **_kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_a_full_disk_during_export_leaves_the_old_export(workdir, gpt2_dir, monkeypatch, fmt):
    from transformers import modeling_utils

    from finetune import onnx_optimize

    output = workdir / "out"
    output.mkdir()
    (output / "keep.txt").write_text("the previous export")
    if fmt == "safetensors":
        monkeypatch.setattr(modeling_utils, "safe_save_file", safetensors_disk_full)
    else:
        monkeypatch.setattr(onnx_optimize, "save", disk_full)  # writing the fused graph
    result = run_cli(*export_args(gpt2_dir, output, "--overwrite", "--format", fmt), expect=None)
    assert_one_clear_line(result, "the disk is full", "free disk space")
    assert sorted(p.name for p in workdir.iterdir()) == ["out"]  # no temporary directory, no lock file
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_exported_files_are_readable_by_others(workdir, gpt2_dir):
    run_cli("export", "--checkpoint", gpt2_dir, "--output", workdir / "out")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (workdir / "out").iterdir()}
    assert set(modes.values()) == {0o666 & ~_umask()}, modes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_generate_names_the_run_it_picked_and_never_returns_nothing_silently(workdir, gpt2_dir):
    checkpoint = fake_run(workdir, gpt2_dir, name="sft", data_mode="supervised")
    damage_weights(checkpoint, make_eos_certain)
    result = run_cli("generate", "--n", 2, "--max-new-tokens", 5)
    assert f"sampling from run 'sft' ({Path('runs') / 'sft' / CHECKPOINT})" in result.output
    assert "the model produced no text for 2 of 2 sample(s)" in result.output
    assert "trained on prompt/completion examples, so it expects a prompt: pass --prompt" in result.output
    named = run_cli("generate", "--run", "sft", "--prompt", "Title:", "--max-new-tokens", 5)
    assert "sampling from run" not in named.output and "no text for 1 of 1" in named.output


def test_the_python_api_is_as_quiet_as_the_cli(workdir, gpt2_dir, capfd):
    import warnings

    import finetune

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune.export(
            checkpoint=str(gpt2_dir), output=str(workdir / "onnx"), format="onnx", verify=False, log=lambda _m: None
        )
        finetune.export(checkpoint=str(gpt2_dir), output=str(workdir / "hf"), log=lambda _m: None)
        finetune.generate("Title:", model=str(gpt2_dir), max_new_tokens=3, stream=False)
    assert [str(w.message) for w in caught] == []
    stderr = capfd.readouterr().err
    assert "Writing model shards" not in stderr and "Loading weights" not in stderr and "warn" not in stderr.lower(), (
        stderr
    )


def onnx_dir(root: Path, gpt2_dir: Path, **manifest) -> Path:
    """An export's files around a placeholder graph: enough for everything read before the graph."""
    directory = root / "onnx"
    directory.mkdir()
    shutil.copy(gpt2_dir / "tokenizer.json", directory)
    (directory / "model.onnx").write_bytes(b"not a graph")
    inputs = [
        {"name": n, "dtype": "int64", "shape": ["batch", "sequence"]}
        for n in ("input_ids", "attention_mask", "position_ids")
    ]
    inputs.append({"name": "past_key_values.0.key", "dtype": "float32", "shape": ["batch", 2, "past_sequence", 32]})
    (directory / "finetune_onnx.json").write_text(
        json.dumps(
            {"file": "model.onnx", "dtype": "fp32", "inputs": inputs, "eos_token_id": 0, "pad_token_id": 0, **manifest}
        )
    )
    return directory


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: (d / "finetune_onnx.json").write_text("garbage"), ["finetune_onnx.json", "not valid JSON"]),
        (lambda d: edit_json(d / "finetune_onnx.json", file=None), ["finetune_onnx.json", "'file'"]),
        (
            lambda d: (d / "finetune_onnx.json").write_text('{"file": "model.onnx"}'),
            ["finetune_onnx.json", "lacks 'dtype'"],
        ),
        (lambda d: edit_json(d / "finetune_onnx.json", inputs=[1, 2, 3, 4]), ["finetune_onnx.json", "'inputs'"]),
        (lambda d: (d / "tokenizer.json").write_text("garbage"), ["tokenizer.json", "not valid JSON"]),
        (lambda d: (d / "tokenizer.json").write_text('{"model": 1}'), ["tokenizer.json", "corrupt"]),
        (lambda d: None, ["model.onnx", "corrupt"]),
    ],
)
def test_a_damaged_onnx_export_is_named(workdir, gpt2_dir, change, words):
    directory = onnx_dir(workdir, gpt2_dir)
    change(directory)
    result = run_cli("generate", "--onnx", directory, "--prompt", "Title:", expect=None)
    assert_one_clear_line(result, *words, "export it again")


def test_a_lora_checkpoint_whose_base_model_is_gone(workdir, gpt2_dir):
    checkpoint = fake_run(workdir, gpt2_dir)
    (checkpoint / "model.safetensors").rename(checkpoint / "adapter_model.safetensors")
    (checkpoint / "config.json").unlink()
    (checkpoint / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "models/deleted-base", "peft_type": "LORA"})
    )
    result = run_cli("generate", "--checkpoint", checkpoint, "--prompt", "Title:", expect=None)
    assert_one_clear_line(result, "the base model 'models/deleted-base'", "adapter_config.json")
    assert "--model" not in result.output


def test_overwrite_replaces_an_export_whole(workdir, gpt2_dir):
    output = workdir / "out"
    output.mkdir()
    (output / "stale.txt").write_text("from an earlier export")
    run_cli(*export_args(gpt2_dir, output, "--overwrite"))
    assert not (output / "stale.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(p.name for p in workdir.iterdir()) == ["out"]  # no set-aside copy, no lock file
