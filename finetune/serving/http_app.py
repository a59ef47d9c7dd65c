"""The OpenAI-compatible HTTP API over the serving engine, built by one factory: create_app().

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics, and
GET / (page.html: a page to try the model from a browser; not behind the API key, the calls it makes are).
Request bodies are read and validated here (size limit, JSON, pydantic), so every refusal is an
OpenAI-shaped error (http_errors.ApiError) and none is FastAPI's 422 or a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from starlette.requests import Request as HttpRequest  # at module level: FastAPI reads route annotations

from finetune.serving.codec import ChatUnsupported
from finetune.serving.http_errors import ApiError, validation_message
from finetune.serving.requests import (
    EngineStopped,
    FinalEvent,
    PromptEvent,
    QueueFull,
    Request,
    RequestError,
    TokenEvent,
)
from finetune.text_stream import TextStream

if TYPE_CHECKING:
    from fastapi import FastAPI

    from finetune.serving.codec import Codec
    from finetune.serving.engine import Engine

MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body past this is refused with 413
RETRY_AFTER_S = 1  # what a 429 tells the client to wait
# The page may talk to this server only, and loads nothing from anywhere (its script and style are inline).
PAGE_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"


@dataclass
class Defaults:
    """Sampling values for fields a request leaves out (`finetune serve`'s options)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float = 1.0


@dataclass
class Choice:
    """One choice's outcome, assembled from its handle's events."""

    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt: Optional[PromptEvent] = None
    tokens: Optional[list[TokenEvent]] = None


class _Server:
    """What the routes share: the engine, the codec, the model's name, the defaults, the shutdown flag."""

    def __init__(
        self,
        engine: Optional[Engine],
        codec: Optional[Codec],
        model_name: str,
        api_key: Optional[str],
        defaults: Defaults,
    ):
        self.engine, self.codec, self.model_name, self.api_key, self.defaults = (
            engine,
            codec,
            model_name,
            api_key,
            defaults,
        )
        self.draining = False  # set on SIGTERM: /health answers 503, new requests too
        self.created = int(time.time())

    def attach(self, engine: Engine, codec: Codec) -> None:
        """The model has loaded (in the background, while /health answered 503): start serving it."""
        self.codec, self.engine = codec, engine

    def status(self) -> str:
        if self.engine is None:
            return "loading"
        if self.draining or not self.engine.accepting:
            return "shutting_down"
        return "ok"

    def ready(self) -> bool:
        return self.status() == "ok"

    def check_model(self, name: Optional[str]) -> None:
        """The request may go ahead: the model is loaded, and `name` (when given) is the served one."""
        if self.engine is None:
            message = "the model is still loading; retry when /health answers 200"
            raise ApiError(503, message, code="model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        if name is not None and name != self.model_name:
            raise ApiError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                "model",
                "model_not_found",
            )

    def sampling(self, body, max_tokens: Optional[int], logprobs: Optional[int], echo: bool) -> dict:
        d = self.defaults
        return dict(
            max_tokens=d.max_tokens if max_tokens is None else max_tokens,
            temperature=d.temperature if body.temperature is None else body.temperature,
            top_p=d.top_p if body.top_p is None else body.top_p,
            top_k=d.top_k if body.top_k is None else body.top_k,
            repetition_penalty=d.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty,
            logprobs=logprobs,
            echo_logprobs=echo,
        )

    def submit(self, prompts: list[list[int]], n: int, seed: Optional[int], fields: dict) -> list:
        """All prompts x n choices queued together, or an ApiError (400, 429, 503)."""
        if not self.ready():
            raise ApiError(503, "the server is shutting down and takes no new requests", code="shutting_down")
        requests = [
            Request(ids, seed=None if seed is None else seed + i * n + j, **fields)
            for i, ids in enumerate(prompts)
            for j in range(n)
        ]
        room = self.engine.max_batch_size + self.engine.max_queue
        if len(requests) > room:  # would never fit, however long the client waited: not a 429
            raise ApiError(
                400,
                f"{len(prompts)} prompt(s) x n={n} is {len(requests)} completions; this server takes at most {room} "
                "at once (--max-batch-size + --max-queue)",
                "n",
            )
        try:
            return self.engine.submit_many(requests)
        except RequestError as exc:
            code = "context_length_exceeded" if "context" in str(exc) else None
            raise ApiError(400, str(exc), exc.param, code) from None
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineStopped as exc:
            raise ApiError(503, str(exc), code="shutting_down") from None


async def read_body(request, schema):
    """The request's JSON body, size-limited and validated: a pydantic model, or ApiError 400/413."""
    from pydantic import ValidationError

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors(include_url=False))
        raise ApiError(400, message, param) from None


async def merged(handles: list) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, event) from several handles as they arrive; cancels them all when the consumer stops."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle) -> None:
        async for event in handle:
            await queue.put((index, event))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        for _ in range(len(handles)):
            while True:
                index, event = await queue.get()
                yield index, event
                if isinstance(event, FinalEvent):
                    break
    finally:
        for handle in handles:
            if not handle.done:
                handle.cancel()  # the client went away (or a stop string ended it): free the slot now
        for task in tasks:
            task.cancel()


def _finish_reason(final: FinalEvent, stream: TextStream) -> str:
    if stream.stopped:
        return "stop"
    if final.finish_reason in ("stop", "length"):
        return final.finish_reason
    if final.finish_reason == "error":
        raise ApiError(500, f"the model failed on this request: {final.error}", code="model_error")
    raise ApiError(503, "the server shut down before the request finished", code="shutting_down")


DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


async def answer_unless_gone(job, request: HttpRequest) -> dict:
    """The whole answer; if the client hangs up first, its choices are cancelled (their slots freed) at once."""
    task = asyncio.ensure_future(job.answer())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()  # merged() cancels the handles as the task unwinds
                for handle in job.handles:
                    handle.cancel()
                raise ApiError(400, "the client disconnected", code="client_disconnected")
    finally:
        if not task.done():
            task.cancel()


def sse(data: Any) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def create_app(
    engine: Optional[Engine],
    codec: Optional[Codec],
    model_name: str,
    api_key: Optional[str] = None,
    defaults: Optional[Defaults] = None,
    metrics=None,
    shutdown_grace_s: float = 30.0,
) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`; `api_key` None accepts any bearer token or none.

    metrics: a callable returning (Prometheus text, content type) for GET /metrics, or None.
    On shutdown the engine stops (queued and running requests get shutdown_grace_s), off the event loop.
    engine and codec may be None while the model loads (/health and requests answer 503 until
    app.state.server.attach(engine, codec)).
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    if defaults is None:
        from finetune.config import GenerateConfig, default

        defaults = Defaults(
            max_tokens=default(GenerateConfig, "max_new_tokens"),
            temperature=default(GenerateConfig, "temperature"),
            top_p=default(GenerateConfig, "top_p"),
            top_k=default(GenerateConfig, "top_k"),
        )
    server = _Server(engine, codec, model_name, api_key, defaults)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        server.draining = True
        if server.engine is not None:
            await asyncio.to_thread(server.engine.stop, shutdown_grace_s)

    app = FastAPI(
        title=f"finetune serve: {model_name}", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.server = server
    _error_handlers(app, server)
    _routes(app, server, metrics)
    return app


def error_response(exc: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _error_handlers(app: FastAPI, server: _Server) -> None:
    """Every refusal in OpenAI's shape: ours, FastAPI's validation, unknown routes, and (a bug) anything else."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return error_response(ApiError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        status = exc.status_code if exc.status_code in (404, 405) else 400
        return error_response(ApiError(status, f"{exc.detail}: no such route or method here"))

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):  # a bug: still an OpenAI-shaped answer, and the server goes on
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    app.add_middleware(BearerAuth, server=server)


class BearerAuth:
    """`Authorization: Bearer KEY` on /v1/* when the server has a key (401 otherwise).

    Plain ASGI rather than @app.middleware("http"), whose wrapper hides the client's disconnect from
    the routes (a hung-up client must free its slot).
    """

    def __init__(self, app, server: _Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        key = self.server.api_key
        if key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                message = "missing or wrong API key: send 'Authorization: Bearer KEY'"
                response = error_response(ApiError(401, message, code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def page_html() -> str:
    """The page at GET /: one static file in this package (plain HTML, CSS and JavaScript)."""
    from importlib.resources import files

    return files("finetune.serving").joinpath("page.html").read_text(encoding="utf-8")


def _routes(app: FastAPI, server: _Server, metrics) -> None:
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

    from finetune.serving import completions

    page = page_html()

    @app.get("/")
    async def try_it():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/health")
    async def health():
        status = server.status()
        if status != "ok":
            return JSONResponse({"status": status}, status_code=503)
        return {"status": "ok", "model": server.model_name, "backend": server.engine.backend.name}

    @app.get("/v1/models")
    async def models():
        entry = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "finetune"}
        return {"object": "list", "data": [entry]}

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            raise ApiError(404, "metrics are off: install prometheus-client")
        text, content_type = metrics()
        return PlainTextResponse(text, media_type=content_type)

    @app.post("/v1/completions")
    async def create_completion(request: HttpRequest):
        from finetune.serving.openai_schema import CompletionRequest

        body = await read_body(request, CompletionRequest)
        job = await asyncio.to_thread(completions.completion_job, server, body)  # tokenizing is CPU work
        if body.stream:
            return StreamingResponse(job.stream(), media_type="text/event-stream")
        return await answer_unless_gone(job, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: HttpRequest):
        from finetune.serving.openai_schema import ChatRequest

        body = await read_body(request, ChatRequest)
        try:
            job = await asyncio.to_thread(completions.chat_job, server, body)
        except ChatUnsupported:
            raise ApiError(
                400,
                f"'{server.model_name}' was trained on plain text and has no chat format; "
                "use /v1/completions with a prompt to continue",
                "messages",
                "chat_unsupported",
            ) from None
        if body.stream:
            return StreamingResponse(job.stream(), media_type="text/event-stream")
        return await answer_unless_gone(job, request)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
