"""The table of supported architectures (architectures.py) matches the models it describes."""

from __future__ import annotations

import pytest
from conftest import make_model_dir

from finetune.architectures import ARCHITECTURES, UNKNOWN, architecture, onnx_architectures

BUILDABLE = ["gpt2", "llama", "qwen2", "qwen3", "mistral", "gpt_neox"]  # what conftest.make_model_dir builds


@pytest.mark.parametrize("model_type", BUILDABLE)
def test_default_lora_targets_name_projection_layers_of_the_model(tmp_path, model_type):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from finetune.lora import targets_for

    model = AutoModelForCausalLM.from_pretrained(make_model_dir(tmp_path / model_type, model_type))
    targets = targets_for(model, [])
    assert targets == list(ARCHITECTURES[model_type].lora_targets)
    layers = {name.rsplit(".", 1)[-1]: type(module) for name, module in model.named_modules()}
    for target in targets:
        assert target in layers, target
        expected = Conv1D if architecture(model_type).conv1d_projections else torch.nn.Linear
        assert layers[target] is expected, (target, layers[target])


def test_unknown_architectures_support_no_path():
    assert architecture("opt") == UNKNOWN and architecture(None) == UNKNOWN
    assert not any((UNKNOWN.chunked_loss, UNKNOWN.onnx, UNKNOWN.cpu_attention, UNKNOWN.lora_targets))


def test_onnx_architectures_keep_the_order_error_messages_list():
    assert onnx_architectures() == ["gpt2", "llama", "qwen2", "qwen3", "mistral", "gpt_neox"]
    assert set(onnx_architectures()) <= set(BUILDABLE)  # test_export builds and exports each
