"""Sampling from a model: prompts, batching, stop strings, streaming and output files.

Decoding itself is transformers' `generate` (greedy, temperature, top-k, top-p, repetition
penalty, stop strings); this module owns what a user sees around it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from finetune.config import GenerateConfig
from finetune.errors import FinetuneError
from finetune.text_stream import TextStream, cut_at_stop

SAMPLE_DELIMITER = "=" * 20  # gpt-2-simple's separator, so existing scripts keep parsing output files


def pick_device_and_dtype():
    import torch

    if torch.cuda.is_available():
        return "cuda", (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return "cpu", torch.float32


def load_for_generation(source: str, trust_remote_code: bool = False):
    """Model and tokenizer from a checkpoint directory or hub id, ready for sampling."""
    from finetune import modeling

    device, dtype = pick_device_and_dtype()
    model, tokenizer = modeling.load_model_and_tokenizer(source, dtype, trust_remote_code)
    model.to(device).eval()
    return model, tokenizer


class StopAwareStreamer:
    """transformers' streamer interface (`put` with the prompt first, then each new token; `end`) over
    TextStream: new text is written as tokens arrive, never past a stop string."""

    def __init__(self, tokenizer, stops: list[str], write: Callable[[str], None]):
        self.stream = TextStream(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stops)
        self.write = write
        self.seen_prompt = False

    def _write(self, text: str) -> None:
        if text:
            self.write(text)

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for token in value.reshape(-1).tolist():
            self._write(self.stream.feed(int(token)))

    def end(self) -> None:
        self._write(self.stream.finish())


def is_chat_checkpoint(source: str) -> bool:
    """A checkpoint trained on chat data (its prompts get the chat template)."""
    from finetune.run_state import TrainingState

    return bool(TrainingState.read_optional(source).chat)


def warn_empty_samples(
    cfg: GenerateConfig, texts: list[str], source: Optional[str], log: Callable[[str], None]
) -> None:
    """Never hand back empty samples silently: say so, and why when the run expects a prompt."""
    jobs = [prompt for prompt in cfg.prompts for _ in range(cfg.n)]
    empty = sum(
        1
        for prompt, text in zip(jobs, texts)
        if not (text[len(prompt) :] if cfg.include_prompt and text.startswith(prompt) else text).strip()
    )
    if not empty:
        return
    message = f"warning: the model produced no text for {empty} of {len(texts)} sample(s) (it ended them at once)"
    from finetune.run_state import TrainingState

    state = TrainingState.read_optional(source)
    if state.chat or state.data_mode == "supervised":
        kind = "chat conversations" if state.chat else "prompt/completion examples"
        if not any(p.strip() for p in cfg.prompts):
            message += f"; this run was trained on {kind}, so it expects a prompt: pass --prompt TEXT"
    log(message)


def _encode_prompts(tokenizer, prompts: list[str], chat: bool = False) -> list[list[int]]:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = []
    for prompt in prompts:
        if chat:  # the rendered template carries its own special tokens
            from finetune.supervised import chat_prompt

            encoded.append(tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
            continue
        ids = tokenizer(prompt)["input_ids"] if prompt else []
        encoded.append(ids if ids else [start])
    return encoded


def _generation_kwargs(cfg: GenerateConfig, tokenizer) -> dict:
    kwargs = dict(
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        repetition_penalty=cfg.repetition_penalty,
    )
    if cfg.temperature == 0:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    if cfg.stop:  # lets generate end a sequence early; the text is cut exactly by cut_at_stop
        kwargs.update(stop_strings=cfg.stop, tokenizer=tokenizer)
    return kwargs


def generate_texts(
    model,
    tokenizer,
    cfg: GenerateConfig,
    write: Optional[Callable[[str], None]] = None,
    suppress_ids: Optional[list[int]] = None,
    chat: bool = False,
    synced: bool = False,
) -> list[str]:
    """Samples for every prompt x n, in prompt order. Streams to `write` when one sample is asked for.

    synced: every process calls this together on a model whose weights are sharded across them
    (FSDP, ZeRO-3); each forward gathers the weights from all ranks, so all keep stepping until
    the last one is done (transformers' synced_gpus).
    """
    import torch
    from transformers import GenerationConfig

    from finetune.modeling import declared_context, pad_id

    jobs = [prompt for prompt in cfg.prompts for _ in range(cfg.n)]
    stream = cfg.stream if cfg.stream is not None else len(jobs) == 1
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(cfg.seed)
    gen_config = GenerationConfig(**{k: v for k, v in _generation_kwargs(cfg, tokenizer).items() if k != "tokenizer"})
    if suppress_ids:  # e.g. vocabulary padding rows: never sampled
        gen_config.suppress_tokens = suppress_ids
    if not synced and (cfg.static_cache if cfg.static_cache is not None else next(model.parameters()).is_cuda):
        # A preallocated KV cache of fixed shape lets transformers compile the decoding step (CUDA
        # graphs): batch-1 decoding is launch-bound, and this removes most of the launches.
        gen_config.cache_implementation = "static"
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    context = declared_context(model.config)
    texts: list[str] = []
    for start in range(0, len(jobs), cfg.batch_size):
        prompts = jobs[start : start + cfg.batch_size]
        encoded = _encode_prompts(tokenizer, prompts, chat)
        width = max(len(ids) for ids in encoded)
        if context and width + cfg.max_new_tokens > context:
            raise FinetuneError(
                f"prompt ({width} tokens) + --max-new-tokens ({cfg.max_new_tokens}) exceeds the model's context of "
                f"{context} tokens; shorten the prompt or lower --max-new-tokens"
            )
        # Left padding: every row's last prompt token sits at the same position, where decoding starts.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        streamer = None
        if stream:
            if cfg.include_prompt:
                write(prompts[0] + ("\n" if chat else ""))
            streamer = StopAwareStreamer(tokenizer, cfg.stop, write)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=gen_config,
                streamer=streamer,
                tokenizer=tokenizer if cfg.stop else None,
                **({"synced_gpus": True} if synced else {}),
            )
        if stream:
            write("\n")
        for prompt, row in zip(prompts, output[:, width:]):
            text = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), cfg.stop)
            texts.append(prompt + ("\n" if chat else "") + text if cfg.include_prompt else text)
    return texts


def check_samples_output(path: Path) -> None:
    """Before any sampling: an --output that cannot take the samples fails now, not after the work."""
    import os

    from finetune.files import first_existing_parent

    if path.exists() and not path.is_file():
        raise FinetuneError(f"--output {path} is a directory, not a file; pass a file path to append samples to")
    parent = first_existing_parent(path.parent if not path.exists() else path)
    if parent is not None and not parent.is_dir() and parent != path:
        raise FinetuneError(f"--output {path}: {parent} is a file, not a directory; choose another --output path")
    if parent is not None and not os.access(parent, os.W_OK):
        raise FinetuneError(f"cannot write samples to {path}: permission denied; choose another --output path")


def append_samples(path: Path, texts: list[str]) -> None:
    """Append samples to a file, each followed by the delimiter line."""
    from finetune.files import os_error_reason

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            for text in texts:
                fh.write(text.rstrip("\n") + "\n" + SAMPLE_DELIMITER + "\n")
    except OSError as exc:
        cause, _fix = os_error_reason(exc, writing=True)
        raise FinetuneError(f"cannot write samples to {path}: {cause}; choose another --output path") from None
