"""Fast paths for training: chunked cross-entropy, vocabulary padding, TF32, torch.compile, MFU.

Each is on by default where it helps (CUDA) and off where it does not (CPU), and each has a flag
to turn it off (TrainConfig: compile, tf32, fused_loss, pad_vocab). Tests check every path gives
the plain path's loss on CPU.
"""

from __future__ import annotations

from typing import Optional

# Architectures whose logits are exactly lm_head(final hidden state): safe for the chunked loss.
PLAIN_HEAD_ARCHITECTURES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gpt_neox")
LOSS_CHUNK_TOKENS = 4096  # logits of this many tokens exist at a time (recomputed in backward)
PAD_MULTIPLE = 64  # tensor cores want matrix dimensions in multiples of 64
LOSS_WRAPPER_PREFIX = "model."  # ChunkedLossModel holds the transformers model as .model

# Dense bf16 peak FLOP/s per device, for MFU (nanoGPT's convention).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def resolve(flag: Optional[bool], cuda: bool) -> bool:
    """None means auto: on with CUDA, off on CPU."""
    return cuda if flag is None else flag


def supports_chunked_loss(model) -> bool:
    return getattr(model.config, "model_type", None) in PLAIN_HEAD_ARCHITECTURES and hasattr(model, "base_model")


def _chunk_loss(lm_head, hidden, labels, vocab_size: int):
    import torch.nn.functional as F

    logits = lm_head(hidden).float()[..., :vocab_size]  # padded vocabulary columns never enter the softmax
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)


def chunked_causal_lm_loss(
    model, input_ids, vocab_size: int, chunk_tokens: int = LOSS_CHUNK_TOKENS, labels=None, attention_mask=None
):
    """Mean next-token cross-entropy without holding the full (tokens x vocab) fp32 logits.

    The final hidden states are cut into chunks; each chunk's logits are computed, reduced to a
    loss and dropped, then recomputed in backward (activation checkpointing). Peak logit memory is
    one chunk instead of batch x sequence x vocabulary in fp32 (GPT-2, 16 x 1024: 3.3 GB -> 0.8 GB).
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[
        :, :-1
    ]
    labels = (input_ids if labels is None else labels)[:, 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    lm_head = model.get_output_embeddings()
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(
            _chunk_loss, lm_head, hidden[start:end], labels[start:end], vocab_size, use_reentrant=False
        )
    return total / (labels != -100).sum().clamp(min=1)


def _loss_module_class():
    import torch
    from transformers.modeling_outputs import CausalLMOutput

    class ChunkedLossModel(torch.nn.Module):
        """Wraps a causal LM so its forward returns the chunked loss; DDP/FSDP/compile wrap this."""

        def __init__(self, model, vocab_size: int):
            super().__init__()
            self.model = model
            self.vocab_size = vocab_size

        def forward(self, input_ids, labels=None, attention_mask=None):
            return CausalLMOutput(
                loss=chunked_causal_lm_loss(
                    self.model, input_ids, self.vocab_size, labels=labels, attention_mask=attention_mask
                )
            )

    return ChunkedLossModel


def with_chunked_loss(model, vocab_size: int):
    return _loss_module_class()(model, vocab_size)


def inner_model(module):
    """The transformers model inside torch.compile and ChunkedLossModel wrappers (or the module itself)."""
    module = getattr(module, "_orig_mod", module)
    return module.model if type(module).__name__ == "ChunkedLossModel" else module


def inner_state_dict(state_dict: dict, inner) -> dict:
    """Keys as the inner transformers model names them (without "_orig_mod." / "model." wrapper prefixes)."""
    expected = set(inner.state_dict())
    renamed = {}
    for key, value in state_dict.items():
        name = key.removeprefix("_orig_mod.")
        if name not in expected:
            name = name.removeprefix(LOSS_WRAPPER_PREFIX)
        renamed[name] = value
    return renamed


def drop_tied_aliases(state_dict: dict, model) -> dict:
    """Without the second names of tied parameters (e.g. GPT-2's lm_head.weight, which is wte).

    A plain state dict shares one tensor between the names, and save_pretrained drops the alias by
    pointer; a gathered FSDP state dict holds two separate copies, which would both be saved.
    """
    kept = {name for name, _ in model.named_parameters()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept
    return {name: value for name, value in state_dict.items() if name not in aliases}


def pad_vocabulary(model, multiple: int = PAD_MULTIPLE) -> int:
    """Grow embeddings (and a tied head) to a multiple of `multiple` rows; returns the true size.

    The extra rows are never targets, are sliced off before the softmax (chunked_causal_lm_loss),
    suppressed when sampling, and cut away again when a checkpoint is saved (unpad_state_dict).
    """
    true_size = model.get_input_embeddings().weight.shape[0]
    if true_size % multiple:
        model.resize_token_embeddings(true_size, pad_to_multiple_of=multiple, mean_resizing=False)
    return true_size


def unpad_state_dict(state_dict: dict, model, true_size: int) -> dict:
    """The state dict with vocabulary-sized tensors cut back to the tokenizer's size."""
    padded = model.get_input_embeddings().weight.shape[0]
    if padded == true_size:
        return state_dict
    return {k: (v[:true_size] if v.ndim >= 1 and v.shape[0] == padded else v) for k, v in state_dict.items()}


def enable_tf32() -> None:
    """TF32 matmuls on Ampere+ GPUs: ~8x fp32 matmul throughput, 10-bit mantissa inputs, fp32 accumulate."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
