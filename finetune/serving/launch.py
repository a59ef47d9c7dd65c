"""`finetune serve` end to end: check options, load the model, build the app, print where it is, serve.

The CLI's serve command calls serve_command(); the pieces live in server.py (source, socket,
uvicorn) and http_app.py (the routes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

from finetune.errors import FinetuneError


def sampling_defaults(
    location: str, max_tokens: Optional[int], temperature: Optional[float], top_k: Optional[int], top_p: Optional[float]
) -> dict:
    """What a request that does not say gets: the flag, else the model's generation_config.json (the sampling
    its authors recommend, e.g. temperature 0.6 and top-p 0.9 for Llama 3, kept by training and export), else
    `finetune generate`'s default. No torch or transformers: the ONNX server runs without them."""
    from finetune import files
    from finetune.config import GenerateConfig, default

    path = Path(location) / "generation_config.json"
    # read as loading a model directory reads it (modeling.MODEL_JSON_FILES): a damaged file is one line
    saved = files.read_json(path, "generation config") if path.exists() else {}
    if saved.get("do_sample") is False:  # the model is meant to be decoded greedily
        saved = {**saved, "temperature": 0.0}
    given = {"max_new_tokens": max_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    resolved = {}
    for key, flag in given.items():
        fallback, recommended = default(GenerateConfig, key), saved.get(key)
        if flag is None and isinstance(recommended, (int, float)) and not isinstance(recommended, bool):
            flag = type(fallback)(recommended)
        resolved["max_tokens" if key == "max_new_tokens" else key] = fallback if flag is None else flag
    return resolved


SAMPLING_RULES = {  # flag: (the value is fine, what the value must be)
    "max_tokens": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: v >= 0, ">= 0 (0 means greedy)"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 disables it)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 disables it)"),
}


def _sampling_problem(values: dict) -> Optional[str]:
    """The first value breaking its rule, as "--flag must be RULE" (None values were not given)."""
    for name, value in values.items():
        ok, rule = SAMPLING_RULES[name]
        if value is not None and not ok(value):
            return f"--{name.replace('_', '-')} must be {rule}"
    return None


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
    max_tokens: Optional[int],
    temperature: Optional[float],
    top_k: Optional[int],
    top_p: Optional[float],
    grace: float,
    trust_remote_code: bool = False,
    replicas: Optional[int] = None,
    max_replicas: Optional[int] = None,
    ray_address: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> None:
    from finetune.serving import server

    problem = _sampling_problem(dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p))
    if problem:
        raise FinetuneError(problem)
    if grace < 0:
        raise FinetuneError("--grace must be >= 0 seconds")
    if not 0 <= port <= 65535:
        raise FinetuneError(f"--port must be between 0 and 65535, not {port}")
    server.require_serve_extra()
    source = server.resolve(run, checkpoint, model, onnx, runs_dir, model_name, log)
    sampling = sampling_defaults(source.location, max_tokens, temperature, top_k, top_p)
    problem = _sampling_problem(sampling)
    if problem:  # the flags were fine, so the value came from the model's file
        saved = Path(source.location) / "generation_config.json"
        raise FinetuneError(f"{saved} recommends a value serve cannot use: {problem}; pass that flag to override it")
    if max_batch_size < 1:
        raise FinetuneError("--max-batch-size must be at least 1")
    if max_queue < 0:
        raise FinetuneError("--max-queue must be >= 0 (0: refuse whenever every slot is busy)")
    if replicas is not None:  # Ray Serve runs the replicas; ray is imported only on this path
        from finetune.serving.ray_replicas import ReplicaSpec, serve_replicas

        max_replicas = _check_replicas(replicas, max_replicas)
        if Path(source.location).exists():  # replicas run in other processes (or nodes), with another cwd
            source = server.Source(source.kind, str(Path(source.location).resolve()), source.model_name)
        spec = ReplicaSpec(source, api_key, **sampling, max_batch_size=max_batch_size, max_queue=max_queue, grace=grace,
                           trust_remote_code=trust_remote_code)  # fmt: skip
        serve_replicas(
            spec,
            host=host,
            port=port,
            replicas=replicas,
            max_replicas=max_replicas,
            ray_address=ray_address,
            banner=lambda url: server.banner(url, source, api_key, sampling),
            log=log,
        )
        return
    if max_replicas is not None or ray_address:
        raise FinetuneError("--max-replicas and --ray-address go with --replicas N (serving on Ray Serve)")
    sock = server.bind(host, port)
    from finetune.serving.http_app import Defaults, create_app
    from finetune.serving.metrics_export import prometheus_metrics

    defaults = Defaults(**sampling)
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
    for line in server.banner(f"http://{shown_host}:{bound_port}", source, api_key, sampling):
        log(line)
    try:
        server.serve(app, sock, grace, load)
    finally:
        sock.close()
    log("server stopped")
