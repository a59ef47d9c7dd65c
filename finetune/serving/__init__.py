"""Serving: the iteration-level batching engine behind `finetune serve` (the HTTP layer builds on it).

requests.py  Request, its events (PromptEvent, TokenEvent, FinalEvent), Handle, the errors
engine.py    Engine: the scheduler thread (admit, prefill + merge, decode step, evict)
sampling.py  per-request token choice with the shared sampler, logprobs
stats.py     EngineStats: counters, gauges, latency samples
backend.py   the Backend interface; onnx_backend.py (no torch) and torch_backend.py implement it

The HTTP layer (`finetune serve`; FastAPI and uvicorn, the serve extra, imported only there):
launch.py          serve_command(): options -> source -> app -> uvicorn
server.py          resolve the source, bind the port, load in the background, run uvicorn, drain on SIGTERM
http_app.py        create_app(): the routes, body reading, auth, OpenAI-shaped error handlers
completions.py     a completions or chat request: prompts -> engine requests, events -> JSON or SSE chunks
openai_schema.py   the request bodies (pydantic), checked against the openai client's types
http_errors.py     ApiError and OpenAI's error shape
codec.py           prompts, chat templates (torch or jinja2 for ONNX), token text
(finetune/text_stream.py, shared with `finetune generate`: generated text as it streams, cut at stop strings)
metrics_export.py  GET /metrics from EngineStats (prometheus-client)
page.html          GET /: a page to try the model in a browser (plain HTML and JavaScript, no build step)
ray_replicas.py    `--replicas N`: the same app as a Ray Serve deployment (the ray extra, imported only there)

Importing this package imports no torch: pick a backend module explicitly.

    backend = OnnxBackend.load(export_dir)            # or TorchBackend.load(checkpoint_or_model_dir)
    engine = Engine(backend, max_batch_size=8, max_queue=64)
    handle = engine.submit(Request(backend.encode(prompt), max_tokens=32, temperature=0))
    handles = engine.submit_many(requests)            # n > 1 or several prompts: all queued, or none
    for event in handle: ...                          # or `async for event in handle` in a FastAPI route
    handle.cancel()                                   # the client went away (or a stop string was seen)
    engine.stop(grace_s)                              # blocks: call it off the event loop (asyncio.to_thread)
"""

from finetune.serving.engine import Engine
from finetune.serving.requests import (
    EngineStopped,
    FinalEvent,
    Handle,
    PromptEvent,
    QueueFull,
    Request,
    RequestError,
    TokenEvent,
)
from finetune.serving.stats import EngineStats

__all__ = [
    "Engine",
    "EngineStats",
    "EngineStopped",
    "FinalEvent",
    "Handle",
    "PromptEvent",
    "QueueFull",
    "Request",
    "RequestError",
    "TokenEvent",
]
