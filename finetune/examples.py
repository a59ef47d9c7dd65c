"""Supervised examples: token ids plus a loss mask (1 = learn this token, 0 = context only).

Prompt/completion: the prompt is context, the completion and a closing EOS are learned.
Chat: the conversation is rendered with the tokenizer's chat template (or SIMPLE_CHAT_TEMPLATE when
it has none); only the assistant turns (and EOS) are learned. Examples are not packed together: each
is one row, truncated to the block size (counted), and batches are padded to their longest row with
rows of similar length grouped together (see data.EpochShuffleSampler), so no example ever attends
to another and little compute goes to padding.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from finetune.errors import FinetuneError

# Used when the tokenizer has no chat template; saved with the checkpoints so `generate` and any
# transformers user render prompts the same way.
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE


def _render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_completion_example(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt)["input_ids"]  # with the model's BOS where it uses one
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def chat_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render once; mark the characters of each assistant turn; map them to tokens by offsets."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(_render(tokenizer, messages[: i + 1]))
        if not text.startswith(_render(tokenizer, messages[: i + 1])):
            raise FinetuneError(
                "the chat template does not render conversations incrementally; loss masking needs that"
            )
        spans.append((start, end))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    mask = [int(any(s < e_tok and b_tok < e for s, e in spans)) for b_tok, e_tok in encoded["offset_mapping"]]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)  # the tuned model must learn to stop
        mask.append(1)
    return ids, mask


def text_example(tokenizer, text: str) -> tuple[list[int], list[int]]:
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return ids, [1] * len(ids)


def chat_prompt(tokenizer, prompt: str, system: Optional[str] = None) -> str:
    """A user prompt rendered as the start of an assistant turn (for `generate` on chat runs)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return _render(tokenizer, messages, add_generation_prompt=True)


class Examples:
    """Variable-length examples stored flat: ids and masks, with offsets marking each example."""

    def __init__(self, tokens: np.ndarray, masks: np.ndarray, offsets: np.ndarray, indices: np.ndarray):
        self.tokens, self.masks, self.offsets, self.indices = tokens, masks, offsets, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        j = int(self.indices[i])
        start, end = int(self.offsets[j]), int(self.offsets[j + 1])
        return np.asarray(self.tokens[start:end], dtype=np.int64), np.asarray(self.masks[start:end], dtype=np.int64)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)[self.indices]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths().sum())


def collate_examples(pad_id: int):
    """Pad a batch on the right to its longest example; padding and context tokens get label -100."""

    def collate(items):
        import torch

        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, mask) in enumerate(items):
            n = len(ids)
            input_ids[row, :n] = torch.from_numpy(ids)
            labels[row, :n] = torch.from_numpy(np.where(mask == 1, ids, -100))
            attention[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    return collate
