"""The request bodies of the OpenAI API this server answers, as pydantic models.

Field names follow the official `openai` client's types (openai/types/completion_create_params.py and
chat/completion_create_params.py). Fields the client may send that this server does not act on
(user, frequency_penalty, ...) are accepted and ignored, as OpenAI-compatible servers do; values that
would make a request impossible are refused with a 400 that names the field.
"""

from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from finetune.serving.requests import MAX_LOGPROBS

MAX_N = 64  # choices per request (OpenAI caps n at 128; a CPU server queues far fewer)
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; each is searched for after every token)
MAX_PROMPTS = 256  # prompts in one completions request


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: Optional[StrictBool] = None


class _Sampling(_Body):
    """The fields both endpoints share. None means "the server's default" (from `finetune serve`'s options)."""

    model: Optional[StrictStr] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=0)  # not in OpenAI's API: sent by the client as an extra field
    repetition_penalty: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    stop: Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOPS)], None] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]] = Field(
        ..., description="text, texts, token ids, or lists of token ids"
    )
    echo: Optional[StrictBool] = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatMessage(_Body):
    role: StrictStr
    content: Union[StrictStr, list[dict], None] = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a content list."""
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
