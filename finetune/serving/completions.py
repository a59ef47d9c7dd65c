"""One completions or chat request from body to answer: prompts to engine requests, events to OpenAI's JSON.

A Job submits its choices (prompts x n) to the engine together, reads their events as they come,
applies stop strings on the decoded text (cancelling a choice's handle when one is seen), and builds
either the whole response or its server-sent-event chunks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Optional

from finetune.serving.codec import ChatUnsupported
from finetune.serving.http_app import Choice, _finish_reason, merged, new_id, sse
from finetune.serving.http_errors import ApiError
from finetune.serving.requests import FinalEvent, PromptEvent, TokenEvent
from finetune.text_stream import TextStream

if TYPE_CHECKING:
    from finetune.serving.http_app import _Server
    from finetune.serving.openai_schema import ChatRequest, CompletionRequest


class Job:
    """Submitted choices and how to read them; subclasses format the answer."""

    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, server: _Server, body, prompts: list[list[int]], n: int, fields: dict, asked: bool):
        """asked: the request gave max_tokens (else the server's default, cut to what the context leaves)."""
        self.server, self.body, self.prompts, self.n = server, body, prompts, n
        context = server.engine.backend.context
        if not asked and context and prompts:
            room = context - max(len(p) for p in prompts)
            if room >= 1:
                fields = {**fields, "max_tokens": min(fields["max_tokens"], room)}
        self.stops = body.stops()
        self.handles = server.submit(prompts, n, body.seed, fields)
        self.choices = [Choice(tokens=[]) for _ in self.handles]
        self.id = new_id(self.id_prefix)
        self.created = int(time.time())

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def pieces(self) -> AsyncIterator[tuple[int, object, str]]:
        """(choice, event, new text) as events arrive; ApiError when a choice fails."""
        decode = self.server.codec.decode
        streams = [TextStream(decode, self.stops) for _ in self.handles]
        async for index, event in merged(self.handles):
            stream, choice = streams[index], self.choices[index]
            if isinstance(event, PromptEvent):
                choice.prompt = event
                yield index, event, ""
            elif isinstance(event, TokenEvent):
                if stream.stopped:
                    continue  # a token computed before the cancel reached the engine
                piece = stream.feed(event.token_id)
                if stream.stopped:
                    self.handles[index].cancel()
                choice.tokens.append(event)
                del choice.tokens[stream.tokens_kept :]
                choice.completion_tokens = len(choice.tokens)
                choice.text += piece
                yield index, event, piece
            else:
                piece = stream.finish()
                choice.text += piece
                choice.finish_reason = _finish_reason(event, stream)
                yield index, event, piece

    async def answer(self) -> dict:
        async for _ in self.pieces():
            pass
        return self.response()

    async def stream(self) -> AsyncIterator[str]:
        try:
            for chunk in self.opening():
                yield sse(chunk)
            async for index, event, piece in self.pieces():
                chunk = self.chunk(index, event, piece)
                if chunk is not None:
                    yield sse(chunk)
            options = self.body.stream_options
            if options is not None and options.include_usage:
                yield sse(self.envelope([], usage=self.usage()))
        except ApiError as exc:
            yield sse(exc.body())
        yield sse("[DONE]")

    def envelope(self, choices: list, usage: Optional[dict] = None, name: Optional[str] = None) -> dict:
        out = {
            "id": self.id,
            "object": name or self.chunk_name,
            "created": self.created,
            "model": self.server.model_name,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        return out

    def opening(self) -> list[dict]:
        return []

    def chunk(self, index: int, event, piece: str) -> Optional[dict]:
        raise NotImplementedError

    def response(self) -> dict:
        raise NotImplementedError


class CompletionJob(Job):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, server: _Server, body: CompletionRequest):
        server.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str):
            texts, ids = [prompt], [server.codec.encode(prompt)]
        elif not prompt:
            raise ApiError(400, "the prompt is empty: pass a string, a list of strings or token ids", "prompt")
        elif isinstance(prompt[0], str):
            texts, ids = list(prompt), [server.codec.encode(p) for p in prompt]
        elif isinstance(prompt[0], int):
            texts, ids = [server.codec.decode(prompt)], [list(prompt)]
        else:
            texts, ids = [server.codec.decode(p) for p in prompt], [list(p) for p in prompt]
        from finetune.serving.openai_schema import MAX_PROMPTS

        if len(ids) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, not {len(ids)}", "prompt")
        max_tokens = server.defaults.max_tokens if body.max_tokens is None else body.max_tokens
        echo_logprobs = bool(body.echo) and (body.logprobs is not None or max_tokens == 0)
        fields = server.sampling(body, max_tokens, body.logprobs, echo_logprobs)
        self.texts = texts
        super().__init__(server, body, ids, body.n or 1, fields, asked=body.max_tokens is not None)

    def _prompt_text(self, index: int) -> str:
        return self.texts[index // self.n] if self.body.echo else ""

    def logprobs(self, choice: Choice, events: list, offset: int) -> dict:
        """OpenAI's completions logprobs for these token events (and the echoed prompt's), offsets from `offset`."""
        token_text = self.server.codec.token_text
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, logprob, top in events:
            text = token_text(token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(None if top is None else {token_text(k): v for k, v in top.items()})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def _events(self, choice: Choice, prompt: bool) -> list[tuple]:
        events = []
        if prompt and choice.prompt is not None:
            p = choice.prompt
            tops = p.top_logprobs or [None] * len(p.token_ids)
            events += [
                (t, lp, top if self.body.logprobs else None) for t, lp, top in zip(p.token_ids, p.logprobs, tops)
            ]
        events += [(e.token_id, e.logprob, e.top_logprobs) for e in choice.tokens]
        return events

    def response(self) -> dict:
        choices = []
        for index, choice in enumerate(self.choices):
            prompt_text = self._prompt_text(index)
            logprobs = None
            if self.body.logprobs is not None:
                logprobs = self.logprobs(choice, self._events(choice, bool(self.body.echo)), 0)
            entry = {"index": index, "text": prompt_text + choice.text, "logprobs": logprobs}
            choices.append({**entry, "finish_reason": choice.finish_reason})
        return self.envelope(choices, usage=self.usage(), name=self.object_name)

    def opening(self) -> list[dict]:
        if not self.body.echo or self.body.logprobs is not None:
            return []  # echoed text with logprobs comes with the prompt's event
        return [self._text_chunk(i, self._prompt_text(i), None, None) for i in range(len(self.handles))]

    def _text_chunk(self, index: int, text: str, logprobs: Optional[dict], finish: Optional[str]) -> dict:
        return self.envelope([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}])

    def chunk(self, index: int, event, piece: str) -> Optional[dict]:
        choice = self.choices[index]
        wants = self.body.logprobs is not None
        if isinstance(event, PromptEvent):
            logprobs = self.logprobs(choice, self._events(choice, True), 0) if wants else None
            return self._text_chunk(index, self._prompt_text(index), logprobs, None)
        if isinstance(event, FinalEvent):
            return self._text_chunk(index, piece, None, choice.finish_reason)
        if not piece and not wants:
            return None
        logprobs = None
        if wants and choice.tokens and choice.tokens[-1] is event:
            logprobs = self.logprobs(choice, [(event.token_id, event.logprob, event.top_logprobs)], 0)
        return self._text_chunk(index, piece, logprobs, None)


class ChatJob(Job):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, server: _Server, body: ChatRequest):
        server.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = server.codec.chat(messages)
        except ChatUnsupported:
            raise
        except Exception as exc:  # the template refuses them (roles out of order, raise_exception)
            raise ApiError(400, f"the model's chat template cannot render these messages: {exc}", "messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens == 0:
            raise ApiError(400, "max_tokens must be at least 1", "max_tokens")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        fields = server.sampling(body, max_tokens, logprobs, False)
        super().__init__(server, body, [ids], body.n or 1, fields, asked=max_tokens is not None)

    def logprobs(self, events: list[TokenEvent]) -> Optional[dict]:
        if not self.body.logprobs:
            return None
        token_text = self.server.codec.token_text

        def entry(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = [
            {**entry(e.token_id, e.logprob), "top_logprobs": [entry(k, v) for k, v in (e.top_logprobs or {}).items()]}
            for e in events
        ]
        return {"content": content, "refusal": None}

    def response(self) -> dict:
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": self.logprobs(choice.tokens),
                "finish_reason": choice.finish_reason,
            }
            for index, choice in enumerate(self.choices)
        ]
        return self.envelope(choices, usage=self.usage(), name=self.object_name)

    def _delta(self, index: int, delta: dict, logprobs=None, finish: Optional[str] = None) -> dict:
        return self.envelope([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

    def opening(self) -> list[dict]:
        return [self._delta(i, {"role": "assistant", "content": ""}) for i in range(len(self.handles))]

    def chunk(self, index: int, event, piece: str) -> Optional[dict]:
        if isinstance(event, FinalEvent):
            return self._delta(index, {"content": piece} if piece else {}, None, self.choices[index].finish_reason)
        if isinstance(event, TokenEvent) and (piece or self.body.logprobs):
            logprobs = self.logprobs([event]) if self.choices[index].tokens[-1:] == [event] else None
            return self._delta(index, {"content": piece}, logprobs)
        return None


def completion_job(server: _Server, body: CompletionRequest) -> CompletionJob:
    return CompletionJob(server, body)


def chat_job(server: _Server, body: ChatRequest) -> ChatJob:
    return ChatJob(server, body)
