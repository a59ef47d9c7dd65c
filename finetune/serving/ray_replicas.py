"""`finetune serve --replicas N`: the same FastAPI app, as a Ray Serve deployment of N replicas.

The server is stateless (every request carries its whole prompt), so scaling it is running more copies
behind a load balancer. Ray Serve is that load balancer and replica manager: its HTTP proxy listens on
--host/--port and spreads requests over the replicas, restarts a replica that dies, and (with
--max-replicas) adds and removes replicas with the load. We write no distributed code of our own.

Each replica is a Ray actor that builds the app with create_app(), the factory the single-process
server uses, so routes, errors, auth and /metrics are the same; it loads the model and runs its own
continuous-batching engine. Without --ray-address a local Ray instance is started (and stopped on
exit); with it, the deployment goes to that cluster, whose nodes need finetune installed.

Ray is the optional `ray` extra, imported only here and only with --replicas.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from finetune.errors import FinetuneError, install_hint
from finetune.serving.server import Source

APP_NAME = "finetune"
REPLICA_HEADER = "x-finetune-replica"  # names the replica that answered: which one served is visible to clients


@dataclass
class ReplicaSpec:
    """Everything a replica needs to build its app; pickled to the replica, so plain values only."""

    source: Source
    api_key: Optional[str]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    max_batch_size: int
    max_queue: int
    grace: float
    trust_remote_code: bool


def require_ray_extra():
    """Ray Serve is an optional extra: say how to install it, in one line."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise FinetuneError(
            f"--replicas runs on Ray Serve ({exc.name or 'ray'} is missing): {install_hint('ray')}"
        ) from None
    return ray, serve


CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds when nothing listens at --ray-address: ray.init would retry the connection for minutes.

    "auto" (the cluster this machine belongs to) has no address to try; Ray finds it or says why.
    """
    if address == "auto":
        return
    where = address.split("://", 1)[-1].rstrip("/")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise FinetuneError(
            f"--ray-address {address}: expected HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:PORT or auto"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise FinetuneError(
            f"cannot reach the Ray cluster at --ray-address {address} ({exc.strerror or exc}); start it with "
            f"`ray start --head` there, check the address and port, or leave --ray-address out for a local instance"
        ) from None


def free_port(host: str) -> int:
    """A free port for --port 0: Ray Serve's proxy needs a number, and it binds the port itself."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def build_replica_app(spec: ReplicaSpec):
    """One replica's app: load the model, then create_app() over it, as the single-process server does.

    Runs inside the replica (Ray Serve calls the ingress builder there), so the model is loaded once per
    replica and never pickled. The replica reports ready only once this returns: the proxy sends it no
    request before the model is loaded.
    """
    from ray import serve

    from finetune.serving import server
    from finetune.serving.http_app import Defaults, create_app
    from finetune.serving.metrics_export import prometheus_metrics

    engine, codec = server.load(spec.source, spec.max_batch_size, spec.max_queue, spec.trust_remote_code)
    defaults = Defaults(max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k)
    app = create_app(
        engine,
        codec,
        spec.source.model_name,
        api_key=spec.api_key or None,
        defaults=defaults,
        metrics=prometheus_metrics(lambda: engine),
        shutdown_grace_s=spec.grace,  # the app's lifespan stops the engine when Serve stops the replica
    )
    app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_tag)
    return app


class ReplicaHeader:
    """Adds `x-finetune-replica: ID` to every response (plain ASGI: leaves streaming and disconnects alone)."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def deployment(serve, spec: ReplicaSpec, replicas: int, max_replicas: int):
    """The Ray Serve deployment: fixed at `replicas`, or autoscaled between replicas and max_replicas."""

    def build():  # a plain function: Ray Serve calls it in each replica (a functools.partial is not accepted)
        return build_replica_app(spec)

    @serve.ingress(build)
    class FinetuneReplica:
        pass

    room = spec.max_batch_size + spec.max_queue
    scaling: dict = {"num_replicas": replicas}
    if max_replicas > replicas:
        scaling = {
            "num_replicas": "auto",
            "autoscaling_config": {
                "min_replicas": replicas,
                "max_replicas": max_replicas,
                # scale up once a replica's batch is full on average, before requests queue
                "target_ongoing_requests": spec.max_batch_size,
            },
        }
    return serve.deployment(FinetuneReplica).options(
        name="FinetuneReplica",
        # Serve's default (5) would cap a replica below its batch. At batch + queue a replica is full; further
        # requests wait in Serve's router for whichever replica frees a slot first, rather than a 429 from one.
        max_ongoing_requests=room,
        graceful_shutdown_timeout_s=max(1.0, spec.grace),
        ray_actor_options={"num_cpus": 1},
        **scaling,
    )


def serve_replicas(
    spec: ReplicaSpec,
    *,
    host: str,
    port: int,
    replicas: int,
    max_replicas: int,
    ray_address: Optional[str],
    banner: Callable[[str], list[str]],
    log: Callable[[str], None] = print,
) -> None:
    """Start (or join) Ray, deploy the replicas behind Serve's proxy on host:port; on SIGTERM/Ctrl-C tear down."""
    if ray_address:
        check_reachable(ray_address)
    ray, serve = require_ray_extra()
    port = port or free_port(host)
    # SIGTERM stops as Ctrl-C does (KeyboardInterrupt in the main thread), while connecting, loading or serving
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if ray_address:
            try:
                ray.init(address=ray_address)
            except (ConnectionError, ValueError, RuntimeError) as exc:  # no cluster there, or it refused us
                raise FinetuneError(f"cannot join the Ray cluster at --ray-address {ray_address}: {exc}") from None
        else:  # "local": never attach to a cluster RAY_ADDRESS happens to name; CPUs are logical, one per replica
            ray.init(address="local", num_cpus=max_replicas, include_dashboard=False)
        # again: joining a cluster installs Ray's C++ failure handler on SIGTERM, which aborts the process (exit -6)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        serve.start(http_options={"host": host, "port": port})
        shown_host = f"[{host}]" if ":" in host else host
        for line in banner(f"http://{shown_host}:{port}"):
            log(line)
        scaling = f" (autoscaling up to {max_replicas})" if max_replicas > replicas else ""
        log(f"starting {replicas} replica(s) on Ray Serve{scaling}; each loads the model")
        try:
            serve.run(deployment(serve, spec, replicas, max_replicas).bind(), name=APP_NAME, route_prefix="/")
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a replica that cannot load the model: Serve gives up after its retries
            first = str(exc).strip().splitlines()[0]
            raise FinetuneError(f"the replicas did not start ({first}); see the replica's error above") from None
        log(f"ready: '{spec.source.model_name}' on {replicas} replica(s)")
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass  # Ctrl-C: a clean stop, like SIGTERM
    finally:
        if ray.is_initialized():
            log("stopping the replicas")
            try:
                # Deleting the app first drains it: Serve stops routing to the replicas and waits (up to --grace)
                # for their requests in flight, streams included, while the proxy still carries the answers.
                # serve.shutdown() alone stops the proxy at once and cuts every open stream.
                if APP_NAME in serve.status().applications:
                    serve.delete(APP_NAME)
                serve.shutdown()
            finally:
                ray.shutdown()  # a local instance stops with its processes; a cluster is only disconnected from
    log("server stopped")
