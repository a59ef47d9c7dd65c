"""The torch serving backend: a transformers model (run, checkpoint, model dir or hub id) with its KV cache.

The past is a list of per-layer (keys, values) tensors; each step wraps it in a transformers
DynamicCache, runs the model under inference_mode and reads the grown tensors back, so rows can be
joined, dropped and re-padded between steps with plain tensor operations.

Two CPU costs of a batched step are cut here. A DynamicCache concatenates every layer's whole past
with the new column at each step (8% of a batch-16 GPT-2 step); the layers here write the new
column into spare room after the past instead, and copy only when the room runs out (every
SPARE_COLUMNS steps). And on CPU the weights are also kept packed for oneDNN (cpu_linear.py).
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Optional

import numpy as np

from finetune.errors import FinetuneError
from finetune.onnx_generation import position_ids_for
from finetune.serving.backend import left_padded

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Layers = list  # [(keys, values)] per layer, each (batch, heads, length, head_dim)
# Columns allocated beyond the past when a layer's keys/values are copied to grow.
SPARE_COLUMNS = 64


def _appended(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`past` with `new` columns after it: written in place into the spare room of the buffer `past` came
    from, or into a fresh buffer with room to spare.

    In place only when `past` is the longest view of a buffer this function made (so a past stepped twice,
    or a tensor from elsewhere, is copied instead of overwritten): the buffer records how far it is filled.
    """
    import torch

    batch, heads, length, dim = past.shape
    total = length + new.shape[2]
    buffer = getattr(past, "_finetune_buffer", None)
    if buffer is None or buffer._finetune_filled != length or buffer.shape[2] < total:
        buffer = torch.empty((batch, heads, total + SPARE_COLUMNS, dim), dtype=new.dtype, device=new.device)
        buffer[:, :, :length] = past
    buffer[:, :, length:total] = new
    buffer._finetune_filled = total
    view = buffer[:, :, :total]
    view._finetune_buffer = buffer
    return view


@functools.cache
def _roomy_layer_class():
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A DynamicLayer that appends into spare room instead of concatenating."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self.keys.dim() != 4:  # lazy_initialization's empty placeholders
                self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
            self.keys = _appended(self.keys, key_states)
            self.values = _appended(self.values, value_states)
            return self.keys, self.values

    return RoomyLayer


class TorchBackend:
    """Prefill and batched decode steps on a transformers causal LM."""

    name = "torch"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        from finetune.modeling import declared_context

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.eos_token_id = tokenizer.eos_token_id
        self.context: Optional[int] = declared_context(model.config)
        self.vocab_size = len(tokenizer)
        self.batch_invariant = self.device.type == "cpu"  # GPU GEMMs pick kernels by batch shape
        params = inspect.signature(model.forward).parameters
        # transformers v5 names the cache argument `cache`; earlier releases `past_key_values`.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keeps_logits = "logits_to_keep" in params

    @classmethod
    def load(cls, source: str, trust_remote_code: bool = False) -> TorchBackend:
        """From a checkpoint or model directory or a hub id, on the GPU when there is one."""
        from finetune.generation import load_for_generation
        from finetune.serving import cpu_linear

        model, tokenizer = load_for_generation(source, trust_remote_code)
        if cpu_linear.worth_packing(model):
            cpu_linear.pack_weights(model)
        return cls(model, tokenizer)

    def encode(self, text: str) -> list[int]:
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_token_id
        ids = self.tokenizer(text)["input_ids"] if text else []
        return ids or [start]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _cache(past: Layers):
        """A DynamicCache holding these tensors as they are (DynamicCache(past) would copy every layer once more),
        whose layers grow into spare room (_appended) rather than by concatenation."""
        from transformers import DynamicCache

        roomy_layer = _roomy_layer_class()
        cache = DynamicCache()
        for keys, values in past:
            layer = roomy_layer()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            cache.layers.append(layer)
        if not past:  # prefill: the model adds its layers to an empty cache; make them roomy too
            cache.layer_class_to_replicate = roomy_layer
        return cache

    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past: Layers, keep: int):
        import torch

        cache = self._cache(past)
        extra = {"logits_to_keep": keep} if self.keeps_logits else {}
        with torch.inference_mode():
            out = self.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self.cache_arg: cache},
                **extra,
            )
        grown = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        layers = [(layer.keys, layer.values) for layer in grown.layers]
        logits = (out.logits if keep == 0 else out.logits[:, -keep:]).float().cpu().numpy()
        if not np.isfinite(logits[:, -1]).all():  # argmax of NaN would quietly give token 0
            raise FinetuneError(
                "the model computes NaN/inf (its weights hold NaN/inf: training diverged); serve an earlier checkpoint"
            )
        return logits, layers

    def prefill(self, prompts: list[list[int]], all_logits: bool) -> tuple[np.ndarray, Layers]:
        import torch

        from finetune.modeling import pad_id

        ids, mask, positions = (
            torch.from_numpy(a).to(self.device) for a in left_padded(prompts, pad_id(self.tokenizer))
        )
        return self._forward(ids, mask, positions, [], 0 if all_logits else 1)

    def step(self, tokens: np.ndarray, mask: np.ndarray, past: Layers) -> tuple[np.ndarray, Layers]:
        import torch

        def tensor(array):
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(self.device)

        logits, past = self._forward(tensor(tokens[:, None]), tensor(mask), tensor(position_ids_for(mask, 1)), past, 1)
        return logits[:, -1], past

    def combine(self, pasts: list[Layers]) -> Layers:
        import torch
        import torch.nn.functional as F

        width = max(p[0][0].shape[2] for p in pasts)

        def joined(tensors):
            return torch.cat([F.pad(t, (0, 0, width - t.shape[2], 0)) for t in tensors], dim=0)

        return [(joined([k for k, _ in layer]), joined([v for _, v in layer])) for layer in zip(*pasts)]

    def select(self, past: Layers, rows: np.ndarray, start: int) -> Layers:
        import torch

        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return [(k[index, :, start:], v[index, :, start:]) for k, v in past]
