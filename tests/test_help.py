"""Help texts show examples, and `finetune --help` never imports torch (it must stay instant)."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_cli


def test_help_has_examples():
    top = run_cli("--help").output
    assert "finetune train sample_data/recipes.txt --model tiny" in top
    for command in ("train", "generate", "eval", "serve"):
        text = run_cli(command, "--help").output
        assert "Examples:" in text and f"finetune {command} " in text


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from finetune.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'transformers', 'accelerate', 'numpy', 'fastapi', 'uvicorn')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
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


def _option(command, flag: str):
    (option,) = [p for p in command.params if flag in p.opts]
    return option


# Besides switches that are off, lists and None (a value derived at run time), whose help says so in words.
NO_DEFAULT_SHOWN = {"freeze_layers"}


def _run_config_fields():
    import dataclasses

    from finetune.config import SECTIONS, default

    for cls in SECTIONS.values():
        for spec in dataclasses.fields(cls):
            value = default(cls, spec.name)
            if value is None or value is False or isinstance(value, list) or spec.name in NO_DEFAULT_SHOWN:
                continue
            yield spec.name, value


def test_train_help_shows_each_dataclass_default():
    """The defaults written in the help come from config.py's dataclasses: change one, the help follows."""
    from finetune.cli import shown, train

    flags = {"name": "--model"}
    checked = []
    rendered = " ".join(run_cli("train", "--help").output.split())
    for name, value in _run_config_fields():
        flag = flags.get(name, "--" + name.replace("_", "-"))
        if not any(flag in p.opts for p in train.params):
            continue  # a config-file-only key (eval_batches, sample_tokens, eos_string)
        expected = f"[default: {shown(value)}" + ("]" if name != "lr" else ";")
        assert expected in _option(train, flag).help, (flag, expected)
        assert expected in rendered, (flag, expected)
        checked.append(name)
    assert len(checked) >= 20, checked
    assert shown(1e-4) == "1e-4" and shown(2.5e-3) == "2.5e-3" and shown(0.05) == "0.05" and shown(True) == "on"


def test_generate_defaults_are_the_dataclass_defaults():
    import dataclasses

    from finetune.cli import export, generate
    from finetune.config import GenerateConfig, TrainConfig, default

    compared = 0
    for spec in dataclasses.fields(GenerateConfig):
        flag = "--" + spec.name.replace("_", "-")
        value = default(GenerateConfig, spec.name)
        if any(flag in p.opts for p in generate.params) and value is not None and not isinstance(value, list):
            assert _option(generate, flag).default == value, flag
            compared += 1
    assert compared == 8
    for command in (generate, export):
        assert _option(command, "--runs-dir").default == default(TrainConfig, "runs_dir")


def test_serve_defaults_are_the_dataclass_defaults():
    import dataclasses

    from finetune.cli import serve, shown
    from finetune.config import GenerateConfig, ServeConfig, TrainConfig, default

    for spec in dataclasses.fields(ServeConfig):
        flag = "--grace" if spec.name == "shutdown_grace_s" else "--" + spec.name.replace("_", "-")
        assert _option(serve, flag).default == default(ServeConfig, spec.name), flag
    sampling = {
        "--max-tokens": "max_new_tokens",
        "--temperature": "temperature",
        "--top-k": "top_k",
        "--top-p": "top_p",
    }
    for flag, name in sampling.items():  # None: the model's generation_config.json, else generate's default
        option = _option(serve, flag)
        assert f"generation_config.json, else {shown(default(GenerateConfig, name))}]" in option.help, flag
    assert _option(serve, "--runs-dir").default == default(TrainConfig, "runs_dir")


def test_choices_are_the_literal_values_of_the_dataclass():
    import typing

    from finetune.cli import train
    from finetune.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for name in ("schedule", "optimizer", "precision"):
        assert typing.get_origin(hints[name]) is typing.Literal
        assert tuple(_option(train, f"--{name}").type.choices) == typing.get_args(hints[name]), name


def test_export_choices_and_defaults_are_the_export_config():
    import dataclasses

    from finetune.cli import export
    from finetune.config import ExportConfig, choices, default

    for spec in dataclasses.fields(ExportConfig):
        option = _option(export, "--" + spec.name)
        assert tuple(option.type.choices) == choices(ExportConfig, spec.name), spec.name
        if default(ExportConfig, spec.name) is not None:  # click marks an option without a default its own way
            assert option.default == default(ExportConfig, spec.name), spec.name
    assert choices(ExportConfig, "quantize") == ("int8",)  # through Optional[...]


def test_help_defaults_that_depend_on_the_run_are_the_constants_the_code_uses():
    from finetune.cli import train
    from finetune.config import DEFAULT_STEPS, LOSS_SYNC_EVERY, MAX_DEFAULT_BLOCK

    assert f"[default: {DEFAULT_STEPS}," in _option(train, "--steps").help
    assert f"min({MAX_DEFAULT_BLOCK}, model context)" in _option(train, "--block-size").help
    sync = _option(train, "--loss-sync-every").help
    assert f"{LOSS_SYNC_EVERY['cpu']} on CPU, {LOSS_SYNC_EVERY['cuda']} on CUDA" in sync
