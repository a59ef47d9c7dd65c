"""Config resolution: defaults < preset < file < flags; unknown keys and bad types are rejected."""

from __future__ import annotations

import pytest

from finetune.config import RunConfig, coerce, resolve_run_config
from finetune.errors import FinetuneError


def test_defaults_for_a_pretrained_model():
    cfg = resolve_run_config(None, {"data": {"paths": ["x.txt"]}})
    assert cfg.model.name == "gpt2" and cfg.train.lr == 1e-4 and cfg.data.block_size is None
    assert cfg.train.steps is None and cfg.data.val_fraction == 0.05


def test_tiny_preset_brings_its_own_defaults_which_flags_override():
    cfg = resolve_run_config(None, {"model": {"name": "tiny"}, "data": {"paths": ["x"]}, "train": {"lr": 5e-4}})
    assert cfg.data.block_size == 128 and cfg.train.steps == 200
    assert cfg.train.lr == 5e-4


def test_file_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: tiny\ntrain:\n  lr: 1e-3\n  steps: 7\ndata:\n  paths: a.txt\n")
    cfg = resolve_run_config(str(path), {"train": {"steps": 9, "lr": None}})
    assert cfg.train.lr == 1e-3  # YAML's '1e-3' string is read as a number
    assert cfg.train.steps == 9 and cfg.data.paths == ["a.txt"]
    assert cfg.data.block_size == 128  # the preset named in the file applies


def test_lora_brings_an_adapter_learning_rate_which_the_file_and_flags_override(tmp_path):
    data = {"paths": ["x.txt"]}
    assert resolve_run_config(None, {"model": {"lora": True}, "data": data}).train.lr == 1e-3
    assert resolve_run_config(None, {"model": {"lora": True}, "data": data, "train": {"lr": 2e-4}}).train.lr == 2e-4
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  lora: true\ntrain:\n  lr: 5.0e-4\n")
    assert resolve_run_config(str(path), {"data": data}).train.lr == 5e-4
    assert resolve_run_config(None, {"data": data}).train.lr == 1e-4  # full fine-tuning keeps its own


def test_preset_name_finds_bundled_config():
    cfg = resolve_run_config("tiny", {"data": {"paths": ["x"]}})
    assert cfg.model.name == "tiny"


@pytest.mark.parametrize(
    "value, tp, expected",
    [("2e-5", float, 2e-5), (3, float, 3.0), ("a", list[str], ["a"]), (None, int | None, None)],
)
def test_coerce_accepts(value, tp, expected):
    import typing

    tp = typing.Optional[int] if expected is None else tp
    assert coerce("k", value, tp) == expected


@pytest.mark.parametrize(
    "value, tp", [(True, int), (1.5, int), ("x", float), (float("nan"), float), (1, bool), ([1], list[str])]
)
def test_coerce_rejects(value, tp):
    with pytest.raises(FinetuneError, match="config key 'k' must be"):
        coerce("k", value, tp)


def test_round_trip_of_the_written_config(tmp_path):
    from finetune.config import apply_layer, dump_yaml, load_yaml

    cfg = resolve_run_config(None, {"model": {"name": "tiny"}, "data": {"paths": ["x"]}})
    dump_yaml(cfg, tmp_path / "config.yaml")
    reread = RunConfig()
    apply_layer(reread, load_yaml(tmp_path / "config.yaml"), "config.yaml")
    assert reread == cfg
    assert isinstance(cfg, RunConfig)


def test_bundled_tiny_config_matches_the_built_in_preset():
    """`--model tiny` and `--config configs/tiny.yaml` must mean the same run."""
    from finetune.config import PRESET_DEFAULTS, find_config_file, load_yaml

    bundled = load_yaml(find_config_file("tiny"))
    assert bundled.pop("model") == {"name": "tiny"}
    assert bundled == PRESET_DEFAULTS["tiny"]


def test_the_scratch_presets_are_one_list():
    """config names the presets (light, for --help); modeling builds them: the two must agree."""
    from finetune import modeling
    from finetune.config import SCRATCH_PRESETS

    assert set(SCRATCH_PRESETS) == set(modeling.SCRATCH_MODELS)
