"""`finetune train ... --dry-run`: what a run will need per device, before it starts.

The model is built on the meta device (no memory, no weights downloaded beyond the config), LoRA
and freezing are applied so trainable counts are exact, and memory is estimated as

    weights + gradients + optimizer state + activations (+ logits) at the chosen batch and precision.

Activation terms follow the per-layer accounting of Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"): about 34·h bytes per token per layer in 16-bit
(17 values), plus 5·a·s per token for attention scores when attention is materialized (eager);
SDPA/flash kernels do not keep those. The cross-entropy over the vocabulary keeps about four
fp32 copies of the logits. The estimate counts tensors (what torch allocates); a process also holds
the runtime itself (libraries, allocator slack), a few hundred MB more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from finetune.config import RunConfig

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

# Values kept per token per layer: ATTENTION_VALUES x hidden + MLP_VALUES[activation] x MLP width.
# Korthikanti et al. count 34·h bytes (17 values) for GPT blocks with fused kernels; transformers'
# eager MLPs keep more (GPT-2's tanh GELU is ~6 separate ops), gated SiLU MLPs keep gate, up and
# their product. Calibrated on CPU with torch's MemTracker on tiny GPT-2 and Llama configs
# (tests/test_planner.py checks both stay within 25%).
ATTENTION_VALUES = 2
MLP_VALUES = {"gelu_new": 5.5, "gelu_fast": 5.5, "gelu": 2, "gelu_pytorch_tanh": 2, "relu": 2, "silu": 3, "swish": 3}
LOGIT_COPIES = 4  # logits, saved log-softmax, and their two gradients


@dataclass
class MemoryPlan:
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    effective_batch: int
    tokens_per_step: int
    device: str
    device_bytes: int | None

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def lines(self) -> list[str]:
        def mb(b: int) -> str:
            return f"{b / 1e6:,.0f} MB"

        share_trainable = self.trainable / max(self.parameters, 1)
        out = [
            f"parameters: {self.parameters:,} ({self.trainable:,} trainable, {share_trainable:.1%})",
            f"effective batch: {self.effective_batch} blocks = {self.tokens_per_step:,} tokens per optimizer step",
            f"estimated memory per device ({self.device}):",
            f"  weights      {mb(self.weights)}",
            f"  gradients    {mb(self.gradients)}",
            f"  optimizer    {mb(self.optimizer)}",
            f"  activations  {mb(self.activations)}",
            f"  total        {mb(self.total)}",
        ]
        if self.device_bytes:
            share = self.total / self.device_bytes
            out.append(f"device memory: {mb(self.device_bytes)} ({share:.0%} of it estimated in use)")
            if share > 0.9:
                out.append(
                    "warning: this will probably run out of memory; lower --batch-size (raise --grad-accum to keep "
                    "the effective batch), add --gradient-checkpointing, or use --lora"
                )
        return out


def _meta_model(cfg: RunConfig, vocab_size: int | None) -> tuple[torch.nn.Module, PretrainedConfig]:
    import torch
    from transformers import AutoModelForCausalLM

    from finetune import modeling

    if modeling.is_scratch_preset(cfg.model.name):
        config = modeling.scratch_config(
            cfg.model.name, vocab_size=vocab_size or modeling.SCRATCH_MODELS[cfg.model.name]["vocab_size"]
        )
    else:
        config = modeling.load_model_config(cfg.model.name, cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if cfg.model.lora:
        from finetune import lora

        model = lora.wrap_with_lora(
            model, cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout, cfg.model.lora_targets
        )
    modeling.freeze_parameters(model, cfg.train.freeze_layers, cfg.train.train_only_blocks)
    return model, config


def _optimizer_bytes(model: torch.nn.Module, name: str) -> int:
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if name == "adamw":
            total += 8 * p.numel()  # two fp32 moments
        elif name == "adamw8bit":
            total += 2 * p.numel()
        elif name == "adafactor":
            total += 4 * (sum(p.shape[-2:]) if p.ndim >= 2 else p.numel())  # factored second moment
        else:  # sgd with momentum
            total += 4 * p.numel()
    return total


def plan(
    cfg: RunConfig, num_processes: int = 1, vocab_size: int | None = None, block_size: int | None = None
) -> MemoryPlan:
    import torch

    from finetune import modeling
    from finetune.token_cache import block_size_for

    model, config = _meta_model(cfg, vocab_size)
    t = cfg.train
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    vocab = text.vocab_size
    seq = block_size or block_size_for(cfg.data.block_size, modeling.context_length(config))
    cuda = torch.cuda.is_available()
    precision = t.precision if t.precision != "auto" else ("bf16" if cuda else "fp32")
    act_bytes = 4 if precision == "fp32" else 2

    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weight_bytes = 0.55 if cfg.model.load_in_4bit else 4  # NF4 + quantization constants; else fp32 master weights
    weights = int(parameters * weight_bytes)
    gradients = 4 * trainable

    tokens = t.batch_size * seq
    mlp_width = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    activation = getattr(text, "hidden_act", None) or getattr(text, "activation_function", None) or "gelu"
    values = ATTENTION_VALUES * hidden + MLP_VALUES.get(activation, 3) * mlp_width
    per_layer = int(values * act_bytes * tokens)
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    attention_dropout = getattr(text, "attn_pdrop", None) or getattr(text, "attention_dropout", None) or 0.0
    if attention == "eager" or (not cuda and attention_dropout > 0):
        # Scores, softmax, dropout mask and output are materialized (eager attention, or SDPA's CPU
        # path with attention dropout); flash-style kernels keep none of them.
        per_layer += 5 * heads * seq * tokens * act_bytes // 2
    if t.gradient_checkpointing:
        # Only each block's input is kept; one block is recomputed (and held) at a time.
        layer_activations = layers * hidden * act_bytes * tokens + per_layer
    else:
        layer_activations = layers * per_layer
    logits = LOGIT_COPIES * 4 * tokens * vocab
    activations = layer_activations + logits

    device_bytes = None
    device = "cpu"
    if cuda:
        device = torch.cuda.get_device_name(0)
        device_bytes = torch.cuda.get_device_properties(0).total_memory
    else:
        try:
            import os

            device_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            device_bytes = None
    effective = t.batch_size * t.grad_accum * num_processes
    return MemoryPlan(
        parameters,
        trainable,
        weights,
        gradients,
        _optimizer_bytes(model, t.optimizer),
        int(activations),
        effective,
        effective * seq,
        device,
        device_bytes,
    )


def dry_run(cfg: RunConfig, num_processes: int = 1, log=print) -> MemoryPlan:
    """Print the plan; nothing is trained or written (a from-scratch tokenizer is learned and cached)."""
    from finetune import learned_tokenizer, modeling
    from finetune.data_files import resolve_files

    files = resolve_files(cfg.data.paths)
    vocab_size = None
    if modeling.is_scratch_preset(cfg.model.name):
        vocab_size = len(learned_tokenizer.tokenizer_from_data(cfg, files))
    result = plan(cfg, num_processes, vocab_size=vocab_size)
    for line in result.lines():
        log(line)
    return result
