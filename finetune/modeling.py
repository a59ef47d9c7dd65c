"""Load a model and tokenizer by hub id or local path, or build a from-scratch preset."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

from finetune.errors import FinetuneError, install_hint

EOS = "<|endoftext|>"

# Small architectures trained from scratch with a tokenizer learned from the user's data. They run
# offline and learn the *form* of a small corpus in minutes on a laptop CPU.
SCRATCH_MODELS = {
    "tiny": dict(
        model_type="gpt2", vocab_size=4096, n_positions=512, n_embd=256, n_layer=4, n_head=4,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
    ),
    "tiny-llama": dict(
        model_type="llama", vocab_size=4096, max_position_embeddings=512, hidden_size=256,
        intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


def quiet_transformers() -> None:
    """No weight-loading progress bars or advice lines between a user's samples."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def is_scratch_preset(name: str) -> bool:
    return name in SCRATCH_MODELS and not Path(name).exists()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A fast check, so an offline machine fails in seconds instead of minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_kwargs(name: str, trust_remote_code: bool) -> dict:
    kwargs = {"trust_remote_code": trust_remote_code}
    if not Path(name).exists() and not _hub_reachable():
        kwargs["local_files_only"] = True
    return kwargs


def _load_error(name: str, exc: Exception) -> FinetuneError:
    if Path(name).exists():
        return FinetuneError(f"'{name}' is not a loadable model directory ({str(exc).splitlines()[0]}); it needs config.json and weights")
    if name.startswith((".", "/", "~")) or os.sep in name.rstrip("/") and name.count("/") > 1:
        return FinetuneError(f"model directory '{name}' does not exist; check the path")
    return FinetuneError(
        f"could not load model '{name}' from the Hugging Face Hub (no network, or no such model) "
        f"and it is not in the local cache; pass a local directory with --model PATH, or --model tiny to train from scratch"
    )


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **_hub_kwargs(name, trust_remote_code))
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None
    return finish_tokenizer(tokenizer)


def finish_tokenizer(tokenizer):
    """Padding for batched generation: decoder-only models pad on the left, with EOS if no pad."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def context_length(config) -> int:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


def load_model_config(name: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    if is_scratch_preset(name):
        return scratch_config(name, vocab_size=SCRATCH_MODELS[name]["vocab_size"])
    try:
        return AutoConfig.from_pretrained(name, **_hub_kwargs(name, trust_remote_code))
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None


def scratch_config(preset: str, vocab_size: int, eos_id: int = 0):
    from transformers import AutoConfig

    spec = dict(SCRATCH_MODELS[preset])
    model_type = spec.pop("model_type")
    spec["vocab_size"] = vocab_size
    return AutoConfig.for_model(model_type, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, **spec)


LEARNER_VERSION = 2  # bump when the way a tokenizer is learned changes (2: long runs cut, reading.bounded_runs)


def train_scratch_tokenizer(preset: str, texts: Iterable[str], digest: str, cache_dir: Path, size: int = 0, log=None):
    """A byte-level BPE tokenizer learned from the training data, cached by the data's digest.

    Byte-level BPE (GPT-2's scheme) can encode any text, so prompts with unseen characters still work.
    `digest` names everything that decides the texts (data.documents_key); `size`, the data's bytes,
    sizes the progress bar.
    """
    from transformers import AutoTokenizer

    from finetune import data
    from finetune.files import short

    vocab_size = SCRATCH_MODELS[preset]["vocab_size"]
    key = hashlib.sha256(f"{preset}:{vocab_size}:{LEARNER_VERSION}:{digest}".encode()).hexdigest()[:24]
    target = cache_dir / "tokenizers" / key
    say = log or (lambda message: print(message, file=sys.stderr))
    try:
        if os.path.lexists(target):
            try:
                return finish_tokenizer(AutoTokenizer.from_pretrained(target))
            except Exception as exc:  # a damaged entry (a crash, a full disk, a hand edit): learn it again
                say(f"warning: the cached tokenizer {target} is unreadable ({short(exc)}); learning it again")
                data.discard(target)
        data.write_entry(target, lambda tmp: _learn_tokenizer(texts, vocab_size, size).save_pretrained(tmp))
    except OSError as exc:
        raise data.write_error(target.parent, exc, "the tokenizer cache", "--cache-dir") from None
    return finish_tokenizer(AutoTokenizer.from_pretrained(target))


def _learn_tokenizer(texts: Iterable[str], vocab_size: int, size: int):
    """Byte-level BPE learned from `texts`, each run of non-space cut to reading.LEARN_RUN_CHARS first:
    the learner's time grows worse than quadratically with a word's length."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from finetune.data import PROGRESS_MIN_BYTES, progress_bar
    from finetune.reading import bounded_runs

    def counted(items):  # the learner pulls texts as it counts their words: this bar follows it
        with progress_bar(size, "learning the tokenizer", size) as bar:
            for text in items:
                bar.update(min(len(text), bar.total - bar.n))
                yield text

    bpe = ByteLevelBPETokenizer()
    # show_progress: the learner's own bars (on a terminal) for the merges that follow the counting
    bpe.train_from_iterator(counted(bounded_runs(texts)), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=size >= PROGRESS_MIN_BYTES)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def tokenizer_from_data(cfg, files: list[Path]):
    """The from-scratch preset's tokenizer, learned from this run's data and cached by everything that
    decides the texts it learns from (contents, each file's format, encoding, text field...)."""
    import json

    from finetune import data

    hub = [(name, cfg.data.split) for name in cfg.data.datasets]
    d = cfg.data
    key = data.documents_key(files, hub, d.format, d.text_field, d.eos_string, d.line_by_line, d.encoding)
    texts = data.training_texts(files, hub, d.format, d.text_field, d.eos_string, d.line_by_line, key["encoding"])
    return train_scratch_tokenizer(cfg.model.name, texts, json.dumps(key, sort_keys=True), data.cache_root(d.cache_dir),
                                   size=data.data_bytes(files))


def build_scratch_model(preset: str, tokenizer, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    config = scratch_config(preset, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_pretrained_model(name: str, trust_remote_code: bool = False, dtype=None, load_in_4bit: bool = False):
    from transformers import AutoModelForCausalLM

    kwargs = _hub_kwargs(name, trust_remote_code)
    if load_in_4bit:
        kwargs["quantization_config"] = _four_bit_config()
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None
    return model


def _four_bit_config():
    """QLoRA's NF4 base weights with bf16 compute; needs a CUDA GPU and bitsandbytes."""
    import torch

    if not torch.cuda.is_available():
        raise FinetuneError("--load-in-4bit (QLoRA) needs a CUDA GPU; on this machine train with --lora alone")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FinetuneError(f"--load-in-4bit needs bitsandbytes; install it with: {install_hint('qlora')}") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def transformer_blocks(model):
    """The ModuleList of transformer blocks (model.transformer.h, model.model.layers, ...)."""
    import torch

    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise FinetuneError(f"cannot find the transformer blocks of this '{model.config.model_type}' model to freeze; drop --freeze-layers / --train-only-blocks")


def freeze_parameters(model, freeze_layers: int, train_only_blocks: bool) -> None:
    """--freeze-layers N: embeddings and the first N blocks stop training.
    --train-only-blocks: only the transformer blocks train (embeddings, final norm and head are frozen),
    like gpt-2-simple's only_train_transformer_layers. A tied output layer shares the embeddings' fate."""
    import torch

    blocks = transformer_blocks(model) if (freeze_layers or train_only_blocks) else None
    if train_only_blocks:
        model.requires_grad_(False)
        blocks.requires_grad_(True)
    if freeze_layers:
        if freeze_layers > len(blocks):
            raise FinetuneError(f"--freeze-layers {freeze_layers} exceeds the model's {len(blocks)} blocks")
        block_params = {id(p) for p in blocks.parameters()}
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding) and not any(id(p) in block_params for p in module.parameters()):
                module.requires_grad_(False)
        for block in blocks[:freeze_layers]:
            block.requires_grad_(False)


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
