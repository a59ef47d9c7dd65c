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
class Served:
    """A loaded model, ready for create_app."""

    engine: Engine
    codec: Codec
    model_name: str
    backend: str


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


def load(
    run: Optional[str],
    checkpoint: Optional[str],
    model: Optional[str],
    onnx: Optional[str],
    runs_dir: str,
    max_batch_size: int,
    max_queue: int,
    model_name: Optional[str] = None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] = print,
) -> Served:
    """The engine over the chosen source; --onnx imports no torch."""
    from finetune.serving.engine import Engine

    if max_batch_size < 1:
        raise FinetuneError("--max-batch-size must be at least 1")
    if max_queue < 0:
        raise FinetuneError("--max-queue must be >= 0 (0: refuse whenever every slot is busy)")
    if onnx:
        if run or checkpoint or model:
            raise FinetuneError("pass --onnx alone, not with --run, --checkpoint or --model")
        from finetune.serving.codec import onnx_codec
        from finetune.serving.onnx_backend import OnnxBackend

        backend = OnnxBackend.load(onnx)
        codec, name = onnx_codec(backend, onnx), source_name(None, str(Path(onnx).resolve()))
    else:
        from finetune.api import resolve_generation_source
        from finetune.serving.codec import torch_codec
        from finetune.serving.torch_backend import TorchBackend

        source = resolve_generation_source(run, checkpoint, model, runs_dir, log=log)
        backend = TorchBackend.load(source, trust_remote_code)
        codec = torch_codec(backend, source)
        name = source_name(run, source)
    engine = Engine(backend, max_batch_size=max_batch_size, max_queue=max_queue)
    return Served(engine, codec, model_name or name, backend.name)


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


def serve(app, sock: socket.socket, grace_s: float, log_level: str = "info") -> None:
    """Run uvicorn on `sock` until SIGTERM/Ctrl-C; in-flight requests get grace_s to finish."""
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
    DrainingServer(config).run(sockets=[sock])


def banner(url: str, served: Served, api_key: Optional[str]) -> list[str]:
    """What startup prints: where, which model, which backend, and a request to try."""
    auth = ' -H "Authorization: Bearer $FINETUNE_API_KEY"' if api_key else ""
    body = f'{{"model": "{served.model_name}", "prompt": "Hello", "max_tokens": 20}}'
    return [
        f"serving '{served.model_name}' ({served.backend} backend) at {url}/v1",
        f"try: curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
    ]
