"""The model architectures finetune knows, and which of its paths each one supports.

One row per transformers `model_type`. A type missing from the table still trains and samples
through transformers' own code; it only misses the paths below:

- chunked_loss: its logits are exactly lm_head(final hidden state), so the chunked cross-entropy
  (fast_paths.py) computes the model's own loss;
- onnx: the ONNX exporter (exporting.py) handles its cache layout and verifies it;
- cpu_attention: its attention modules call transformers' attention interface with nothing beyond a
  causal or padding mask (no sliding window, soft-capping or sinks), so cpu_kernels.attention
  computes them exactly;
- lora_targets: the linear layers worth adapting by default (attention and MLP projections);
- conv1d_projections: its projections are Conv1D layers storing (in x out) weights (peft's fan_in_fan_out).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    chunked_loss: bool = False
    onnx: bool = False
    cpu_attention: bool = False
    lora_targets: tuple[str, ...] = ()
    conv1d_projections: bool = False


_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DECODER = dict(chunked_loss=True, onnx=True, lora_targets=_LLAMA_TARGETS)

# The order is the order error messages list them in.
ARCHITECTURES = {
    "gpt2": Architecture(
        chunked_loss=True,
        onnx=True,
        cpu_attention=True,
        lora_targets=("c_attn", "c_proj", "c_fc"),
        conv1d_projections=True,
    ),
    "llama": Architecture(**_DECODER, cpu_attention=True),
    "qwen2": Architecture(**_DECODER),
    "qwen3": Architecture(**_DECODER),
    "mistral": Architecture(**_DECODER),
    "gpt_neox": Architecture(
        chunked_loss=True,
        onnx=True,
        cpu_attention=True,
        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    ),
    "gemma": Architecture(lora_targets=_LLAMA_TARGETS),
    "gemma2": Architecture(lora_targets=_LLAMA_TARGETS),
    "phi3": Architecture(lora_targets=_LLAMA_TARGETS),
}

UNKNOWN = Architecture()


def architecture(model_type: str | None) -> Architecture:
    """The row of `model_type`; an unknown type supports none of the paths."""
    return ARCHITECTURES.get(model_type, UNKNOWN)


def onnx_architectures() -> list[str]:
    return [name for name, row in ARCHITECTURES.items() if row.onnx]
