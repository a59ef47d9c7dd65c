"""Text <-> token ids for the HTTP layer: prompts, chat messages, generated text, logprob token strings.

One Codec per served model, over its backend's tokenizer. Chat requests are formatted as the model
was trained: with its saved chat template (a chat run, or a model that ships one), or, for a run
trained on prompt/completion pairs, as the user's prompt alone; a plain-text model has no chat format.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from finetune.serving.backend import Backend

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers v5 saves a tokenizer's template


class ChatUnsupported(Exception):
    """The model was trained on plain text: it has no chat format."""


class Codec:
    """Encode prompts and chats, decode tokens, for one backend."""

    def __init__(
        self,
        backend: Backend,
        chat_ids: Optional[Callable[[list[dict]], list[int]]] = None,
        chat_kind: Optional[str] = None,
    ):
        self.backend = backend
        self._chat_ids = chat_ids
        self.chat_kind = chat_kind  # "template", "prompt" (prompt/completion run) or None (plain text)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)

    def token_text(self, token_id: int) -> str:
        """One token as text, as OpenAI's logprobs name tokens."""
        return self.backend.decode([token_id])

    def chat(self, messages: list[dict]) -> list[int]:
        """A conversation as prompt ids ending where the assistant's reply starts; ChatUnsupported if none."""
        if self._chat_ids is None:
            raise ChatUnsupported()
        return self._chat_ids(messages)


def _last_user_prompt(encode: Callable[[str], list[int]]) -> Callable[[list[dict]], list[int]]:
    """A prompt/completion run continues a prompt: the last user message is that prompt."""

    def ids(messages: list[dict]) -> list[int]:
        users = [m["content"] for m in messages if m["role"] == "user"]
        return encode(users[-1] if users else messages[-1]["content"])

    return ids


def torch_codec(backend, source: str) -> Codec:
    """The torch backend's tokenizer; the run's training state says how it was trained."""
    from finetune.run_state import TrainingState

    tokenizer = backend.tokenizer
    state = TrainingState.read_optional(source if Path(source).is_dir() else None)
    if state.chat or (not state.data_mode and getattr(tokenizer, "chat_template", None)):

        def ids(messages: list[dict]) -> list[int]:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template carries its own

        return Codec(backend, ids, "template")
    if state.data_mode == "supervised":
        return Codec(backend, _last_user_prompt(backend.encode), "prompt")
    return Codec(backend)


def _saved_template(directory: Path) -> Optional[str]:
    template_file = directory / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def _raise(message: str):
    raise ValueError(message)


def onnx_codec(backend, directory: str) -> Codec:
    """The export's tokenizer files: a saved chat template is rendered with jinja2 (no transformers)."""
    directory = Path(directory)
    template = _saved_template(directory)
    if template is None:
        return Codec(backend)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    specials = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    compiled = None

    def ids(messages: list[dict]) -> list[int]:
        nonlocal compiled
        if compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise  # what transformers gives templates, so theirs render here
            env.filters["tojson"] = lambda value, **kw: json.dumps(value, ensure_ascii=False, **kw)
            compiled = env.from_string(template)
        text = compiled.render(messages=messages, add_generation_prompt=True, **specials)
        return backend.lm.tokenizer.encode(text, add_special_tokens=False).ids or backend.encode(text)

    return Codec(backend, ids, "template")
