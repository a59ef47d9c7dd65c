"""Fast paths for training on a GPU: chunked cross-entropy, vocabulary padding, TF32, and their on/off flags.

Each is on by default where it helps (CUDA) and off where it does not (CPU), and each has a flag
to turn it off (TrainConfig: compile, tf32, fused_loss, pad_vocab). Tests check every path gives
the plain path's loss on CPU. The CPU's own fast paths are in cpu_kernels.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from finetune.architectures import architecture

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

LOSS_CHUNK_TOKENS = 4096  # logits of this many tokens exist at a time (recomputed in backward)
PAD_MULTIPLE = 64  # tensor cores want matrix dimensions in multiples of 64
LOSS_WRAPPER_PREFIX = "model."  # ChunkedLossModel holds the transformers model as .model
LOSS_WRAPPER_CLASS = "ChunkedLossModel"


def resolve(flag: Optional[bool], cuda: bool) -> bool:
    """None means auto: on with CUDA, off on CPU."""
    return cuda if flag is None else flag


def supports_chunked_loss(model: PreTrainedModel) -> bool:
    model_type = getattr(model.config, "model_type", None)
    return architecture(model_type).chunked_loss and hasattr(model, "base_model")


def _chunk_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    import torch.nn.functional as F

    logits = lm_head(hidden).float()[..., :vocab_size]  # padded vocabulary columns never enter the softmax
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)


def chunked_causal_lm_loss(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    vocab_size: int,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
    labels: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
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


def _loss_module_class() -> type[torch.nn.Module]:
    import torch
    from transformers.modeling_outputs import CausalLMOutput

    class ChunkedLossModel(torch.nn.Module):  # state_dicts.inner_model finds it by LOSS_WRAPPER_CLASS
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


def with_chunked_loss(model: PreTrainedModel, vocab_size: int) -> torch.nn.Module:
    return _loss_module_class()(model, vocab_size)


def pad_vocabulary(model: PreTrainedModel, multiple: int = PAD_MULTIPLE) -> int:
    """Grow embeddings (and a tied head) to a multiple of `multiple` rows; returns the true size.

    The extra rows are never targets, are sliced off before the softmax (chunked_causal_lm_loss),
    suppressed when sampling, and cut away again when a checkpoint is saved (state_dicts.unpad_state_dict).
    """
    true_size = model.get_input_embeddings().weight.shape[0]
    if true_size % multiple:
        model.resize_token_embeddings(true_size, pad_to_multiple_of=multiple, mean_resizing=False)
    return true_size


def enable_tf32() -> None:
    """TF32 matmuls on Ampere+ GPUs: ~8x fp32 matmul throughput, 10-bit mantissa inputs, fp32 accumulate."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
