"""`finetune serve` end to end: check options, load the model, build the app, print where it is, serve.

The CLI's serve command calls serve_command(); the pieces live in server.py (source, socket,
uvicorn) and http_app.py (the routes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

from finetune.errors import FinetuneError


def _check_sampling(max_tokens: int, temperature: float, top_k: int, top_p: float, grace: float) -> None:
    if max_tokens < 1:
        raise FinetuneError("--max-tokens must be at least 1")
    if temperature < 0:
        raise FinetuneError("--temperature must be >= 0 (0 means greedy)")
    if top_k < 0:
        raise FinetuneError("--top-k must be >= 0 (0 disables it)")
    if not 0 < top_p <= 1:
        raise FinetuneError("--top-p must be in (0, 1] (1 disables it)")
    if grace < 0:
        raise FinetuneError("--grace must be >= 0 seconds")


def _check_replicas(replicas: int, max_replicas: Optional[int]) -> int:
    if replicas < 1:
        raise FinetuneError("--replicas must be at least 1")
    if max_replicas is None:
        return replicas
    if max_replicas < replicas:
        raise FinetuneError(f"--max-replicas ({max_replicas}) must be at least --replicas ({replicas})")
    return max_replicas


def serve_command(
    *,
    run: Optional[str],
    checkpoint: Optional[str],
    model: Optional[str],
    onnx: Optional[str],
    runs_dir: str,
    host: str,
    port: int,
    model_name: Optional[str],
    api_key: Optional[str],
    max_batch_size: int,
    max_queue: int,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    grace: float,
    trust_remote_code: bool = False,
    replicas: Optional[int] = None,
    max_replicas: Optional[int] = None,
    ray_address: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> None:
    from finetune.serving import server

    _check_sampling(max_tokens, temperature, top_k, top_p, grace)
    if not 0 <= port <= 65535:
        raise FinetuneError(f"--port must be between 0 and 65535, not {port}")
    server.require_serve_extra()
    source = server.resolve(run, checkpoint, model, onnx, runs_dir, model_name, log)
    if max_batch_size < 1:
        raise FinetuneError("--max-batch-size must be at least 1")
    if max_queue < 0:
        raise FinetuneError("--max-queue must be >= 0 (0: refuse whenever every slot is busy)")
    if replicas is not None:  # Ray Serve runs the replicas; ray is imported only on this path
        from finetune.serving.ray_replicas import ReplicaSpec, serve_replicas

        max_replicas = _check_replicas(replicas, max_replicas)
        if Path(source.location).exists():  # replicas run in other processes (or nodes), with another cwd
            source = server.Source(source.kind, str(Path(source.location).resolve()), source.model_name)
        spec = ReplicaSpec(
            source, api_key, max_tokens, temperature, top_k, top_p, max_batch_size, max_queue, grace, trust_remote_code
        )
        serve_replicas(
            spec,
            host=host,
            port=port,
            replicas=replicas,
            max_replicas=max_replicas,
            ray_address=ray_address,
            banner=lambda url: server.banner(url, source, api_key),
            log=log,
        )
        return
    if max_replicas is not None or ray_address:
        raise FinetuneError("--max-replicas and --ray-address go with --replicas N (serving on Ray Serve)")
    sock = server.bind(host, port)
    from finetune.serving.http_app import Defaults, create_app
    from finetune.serving.metrics_export import prometheus_metrics

    defaults = Defaults(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    app = create_app(
        None,  # attached once loaded; /health answers 503 until then
        None,
        source.model_name,
        api_key=api_key or None,
        defaults=defaults,
        metrics=prometheus_metrics(lambda: app.state.server.engine),
        shutdown_grace_s=grace,
    )

    def load() -> None:
        engine, codec = server.load(source, max_batch_size, max_queue, trust_remote_code)
        app.state.server.attach(engine, codec)
        log(f"ready: '{source.model_name}' loaded")

    bound_host, bound_port = sock.getsockname()[:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    for line in server.banner(f"http://{shown_host}:{bound_port}", source, api_key):
        log(line)
    try:
        server.serve(app, sock, grace, load)
    finally:
        sock.close()
    log("server stopped")
