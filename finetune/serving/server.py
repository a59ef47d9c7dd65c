"""`finetune serve` behind the CLI: resolve the source, load the backend, bind the port, run uvicorn, drain.

Everything a user can get wrong (no such run, a missing extra, a busy port) fails here as a
FinetuneError before the server starts. SIGTERM and Ctrl-C stop accepting, let in-flight requests
finish within the grace period, stop the engine, and return (exit 0).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from finetune.errors import FinetuneError, install_hint

if TYPE_CHECKING:
    from finetune.serving.codec import Codec
    from finetune.serving.engine import Engine


@dataclass
class Source:
    """What to serve, resolved and checked before the server starts (loading it comes after)."""

    kind: str  # "onnx" or "torch"
    location: str  # the export directory, checkpoint or model directory, or hub id
    model_name: str


def require_serve_extra() -> None:
    """FastAPI and uvicorn are an optional extra: say how to install them, in one line."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise FinetuneError(
            f"finetune serve needs FastAPI and uvicorn ({exc.name} is missing): {install_hint('serve')}"
        ) from None


def source_name(run: Optional[str], source: str) -> str:
    """The model name clients send: the run's name, or the directory's (or hub id's) last part."""
    if run:
        return run
    path = Path(source)
    while path.name.startswith("checkpoint") and path.parent.name:
        path = path.parent  # runs/NAME/checkpoint-000200 serves as NAME
    return path.name or source


def resolve(
    run: Optional[str],
    checkpoint: Optional[str],
    model: Optional[str],
    onnx: Optional[str],
    runs_dir: str,
    model_name: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> Source:
    """The source the flags name, with the project's one-line errors (no run, no directory, two sources)."""
    if onnx:
        if run or checkpoint or model:
            raise FinetuneError("pass --onnx alone, not with --run, --checkpoint or --model")
        if not Path(onnx).is_dir():
            raise FinetuneError(
                f"ONNX export directory '{onnx}' does not exist; make one with `finetune export --format onnx`"
            )
        return Source("onnx", onnx, model_name or source_name(None, str(Path(onnx).resolve())))
    from finetune.api import resolve_generation_source

    source = resolve_generation_source(run, checkpoint, model, runs_dir, log=log)
    return Source("torch", source, model_name or source_name(run, source))


def load(source: Source, max_batch_size: int, max_queue: int, trust_remote_code: bool = False) -> tuple[Engine, Codec]:
    """The engine and codec over the source; the ONNX path imports no torch."""
    from finetune.serving.engine import Engine

    if source.kind == "onnx":
        from finetune.serving.codec import onnx_codec
        from finetune.serving.onnx_backend import OnnxBackend

        backend = OnnxBackend.load(source.location)
        codec = onnx_codec(backend, source.location)
    else:
        from finetune.serving.codec import torch_codec
        from finetune.serving.torch_backend import TorchBackend

        backend = TorchBackend.load(source.location, trust_remote_code)
        codec = torch_codec(backend, source.location)
    return Engine(backend, max_batch_size=max_batch_size, max_queue=max_queue), codec


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts (a busy port is a one-line error)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FinetuneError(f"--host {host}: {exc.strerror}; pass an address such as 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise FinetuneError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(app, sock: socket.socket, grace_s: float, loader: Callable[[], None], log_level: str = "info") -> None:
    """Run uvicorn on `sock` until SIGTERM/Ctrl-C while `loader` loads the model in the background
    (/health answers 503 until it is done). In-flight requests get grace_s to finish. A load that
    fails stops the server and raises its error here (the CLI's one line)."""
    import threading

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.server.draining = True  # /health and new requests answer 503 from now on
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a clean drain exits 0, not by re-raising the signal

    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=max(1, int(grace_s)),
        lifespan="on",
        access_log=True,
    )
    server = DrainingServer(config)
    failed: list[BaseException] = []

    def load_in_background() -> None:
        try:
            loader()
        except BaseException as exc:  # reported by the main thread once the server has stopped
            failed.append(exc)
            server.should_exit = True

    threading.Thread(target=load_in_background, name="finetune-serve-load", daemon=True).start()
    server.run(sockets=[sock])
    if failed:
        raise failed[0]
    engine = app.state.server.engine
    if engine is not None and engine.running:  # loaded after the lifespan's shutdown ran
        engine.stop(grace_s)


def banner(url: str, source: Source, api_key: Optional[str], sampling: dict) -> list[str]:
    """What startup prints: where, which model, which backend, the sampling defaults, and a request to try."""
    auth = " -H 'Authorization: Bearer YOUR_API_KEY'" if api_key else ""
    body = f'{{"model": "{source.model_name}", "prompt": "Hello", "max_tokens": 20}}'
    return [
        f"serving '{source.model_name}' ({source.kind} backend) at {url}/v1 (GET {url}/health: 200 once loaded)",
        "a request that does not say gets " + ", ".join(f"{name} {value}" for name, value in sampling.items()),
        f"try: curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
    ]
