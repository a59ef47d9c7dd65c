"""Supervised examples: token ids plus a loss mask (1 = learn this token, 0 = context only).

Prompt/completion: the prompt is context, the completion and a closing EOS are learned.
Chat: the conversation is rendered with the tokenizer's chat template (or SIMPLE_CHAT_TEMPLATE when
it has none); only the assistant turns (and EOS) are learned. Examples are not packed together: each
is one row, truncated to the block size (counted), and batches are padded to their longest row with
rows of similar length grouped together (see batching.EpochShuffleSampler), so no example ever attends
to another and little compute goes to padding. `examples` reads them from a run's sources.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from finetune.errors import FinetuneError
from finetune.reading import iter_pieces
from finetune.records import BadRows, Source, iter_rows, record_kind, validate_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from finetune.documents import DocumentRules

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


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE


def _render(tokenizer: PreTrainedTokenizerBase, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_completion_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str
) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt)["input_ids"]  # with the model's BOS where it uses one
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def chat_example(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
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


def text_example(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return ids, [1] * len(ids)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, system: Optional[str] = None) -> str:
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


def examples(
    sources: list[Source], rules: DocumentRules, tokenizer: PreTrainedTokenizerBase, bad: BadRows
) -> Iterator[tuple[list[int], list[int]]]:
    """Supervised examples: prompt/completion and chat records, and plain documents (all tokens learned)."""
    for source in sources:
        if source.format == "text":
            for piece in iter_pieces([Path(source.path)], rules.eos_string, rules.line_by_line, rules.encoding):
                yield text_example(tokenizer, piece.text)
            continue
        for where, record in iter_rows(source, rules.encoding, bad):
            kind = record_kind(record, rules.text_field, where)
            if kind == "chat":
                yield chat_example(tokenizer, validate_messages(record["messages"], where))
            elif kind == "prompt_completion":
                prompt, completion = record["prompt"], record["completion"]
                if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
                    bad(f"{where}: 'prompt' and 'completion' must be text and the completion non-empty")
                    continue
                yield prompt_completion_example(tokenizer, prompt, completion)
            elif isinstance(record[rules.text_field], str) and record[rules.text_field].strip():
                yield text_example(tokenizer, record[rules.text_field].strip())
