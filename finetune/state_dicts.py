"""State-dict surgery for saving: the weights as the plain transformers model names and sizes them.

Training may wrap the model (torch.compile's `_orig_mod.`, fast_paths.ChunkedLossModel's `model.`),
pad its vocabulary, and gather FSDP shards into separate copies of tied tensors; a checkpoint holds
none of that, so it loads anywhere with `from_pretrained`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.fast_paths import LOSS_WRAPPER_CLASS, LOSS_WRAPPER_PREFIX

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def inner_model(module: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside torch.compile and ChunkedLossModel wrappers (or the module itself)."""
    module = getattr(module, "_orig_mod", module)
    return module.model if type(module).__name__ == LOSS_WRAPPER_CLASS else module


def inner_state_dict(state_dict: dict, inner: torch.nn.Module) -> dict:
    """Keys as the inner transformers model names them (without "_orig_mod." / "model." wrapper prefixes)."""
    expected = set(inner.state_dict())
    renamed = {}
    for key, value in state_dict.items():
        name = key.removeprefix("_orig_mod.")
        if name not in expected:
            name = name.removeprefix(LOSS_WRAPPER_PREFIX)
        renamed[name] = value
    return renamed


def drop_tied_aliases(state_dict: dict, model: torch.nn.Module) -> dict:
    """Without the second names of tied parameters (e.g. GPT-2's lm_head.weight, which is wte).

    A plain state dict shares one tensor between the names, and save_pretrained drops the alias by
    pointer; a gathered FSDP state dict holds two separate copies, which would both be saved.
    """
    kept = {name for name, _ in model.named_parameters()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept
    return {name: value for name, value in state_dict.items() if name not in aliases}


def unpad_state_dict(state_dict: dict, model: PreTrainedModel, true_size: int) -> dict:
    """The state dict with vocabulary-sized tensors cut back to the tokenizer's size (fast_paths.pad_vocabulary)."""
    padded = model.get_input_embeddings().weight.shape[0]
    if padded == true_size:
        return state_dict
    return {k: (v[:true_size] if v.ndim >= 1 and v.shape[0] == padded else v) for k, v in state_dict.items()}
