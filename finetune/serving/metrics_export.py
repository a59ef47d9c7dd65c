"""GET /metrics: the engine's EngineStats in Prometheus text format (prometheus-client, the serve extra).

A registry of its own per engine (not the process-global one), read at scrape time: counters and
gauges from EngineStats.snapshot(), latency histograms fed from the samples taken since the last scrape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from finetune.serving.engine import Engine

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


def prometheus_metrics(current: Callable[[], Optional[Engine]]) -> Optional[Callable[[], tuple[bytes, str]]]:
    """A scrape function for create_app over the engine `current()` returns (None while the model loads),
    or None when prometheus-client is not installed."""
    try:
        from prometheus_client import CollectorRegistry, Histogram, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.exposition import CONTENT_TYPE_LATEST
    except ImportError:
        return None

    registry = CollectorRegistry(auto_describe=False)
    ttft = Histogram(
        "finetune_time_to_first_token_seconds", "Submit to first token", buckets=TTFT_BUCKETS, registry=registry
    )
    per_token = Histogram(
        "finetune_time_per_output_token_seconds", "Between a request's tokens", buckets=TOKEN_BUCKETS, registry=registry
    )

    class EngineCollector:
        def collect(self):
            engine = current()
            if engine is None:
                return
            stats = engine.stats.snapshot()
            requests = CounterMetricFamily("finetune_requests", "Requests finished, by status", labels=["status"])
            for reason, count in sorted(stats["finished"].items()):
                requests.add_metric([reason], count)
            requests.add_metric(["rejected"], stats["rejected"])
            yield requests
            yield CounterMetricFamily("finetune_prompt_tokens", "Prompt tokens prefilled", value=stats["prompt_tokens"])
            yield CounterMetricFamily("finetune_completion_tokens", "Tokens generated", value=stats["tokens_generated"])
            yield CounterMetricFamily("finetune_decode_steps", "Batched decode steps", value=stats["steps"])
            yield GaugeMetricFamily("finetune_queue_depth", "Requests waiting for a slot", value=stats["queue_depth"])
            yield GaugeMetricFamily("finetune_batch_size", "Requests in the running batch", value=stats["batch_size"])

    registry.register(EngineCollector())

    def scrape() -> tuple[bytes, str]:
        engine = current()
        first, later = engine.stats.take_samples() if engine is not None else ([], [])
        for seconds in first:
            ttft.observe(seconds)
        for seconds in later:
            per_token.observe(seconds)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    return scrape
