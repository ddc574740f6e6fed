"""Prometheus metrics of the server (`GET /metrics`), through prometheus_client.

Everything the scheduler runs is counted, browser visitors and API clients alike: requests
running and queued (read at scrape time), prompt tokens read and tokens generated, the batch size
of every tick, how long requests waited in the queue; plus the API's requests by route and status.
Each server has its own registry (tests run several in one process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .scheduler import SchedulerObserver

CONTENT_TYPE = CONTENT_TYPE_LATEST
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _SchedulerGauges:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        status = self.engine.scheduler.status()
        running = GaugeMetricFamily("rwkv_requests_running", "Requests the model is working on (generations and "
                                    "tasks), browser and API together", labels=["kind"])
        running.add_metric(["generation"], status["generating"])
        running.add_metric(["task"], status["tasks"])
        yield running
        yield GaugeMetricFamily("rwkv_requests_queued", "Requests waiting for a place in the batch",
                                value=status["waiting"])
        yield GaugeMetricFamily("rwkv_model_loaded", "1 when a model is loaded",
                                value=1 if self.engine.current is not None else 0)


class Metrics(SchedulerObserver):
    """The registry, and the scheduler's observer feeding it."""

    def __init__(self, engine):
        self.registry = CollectorRegistry(auto_describe=True)
        self.prompt_tokens_total = Counter("rwkv_prompt_tokens", "Prompt tokens read for generations (browser and API) "
                                         "and the API's conversation states", registry=self.registry)
        self.generated_tokens_total = Counter("rwkv_generated_tokens", "Tokens generated", registry=self.registry)
        self.batch_size = Histogram("rwkv_batch_size", "Generations advanced by one batched step (per tick)",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("rwkv_queue_wait_seconds", "Time from a request's submission to its start",
                                    ["kind"], buckets=WAIT_BUCKETS, registry=self.registry)
        self.api_requests = Counter("rwkv_api_requests", "OpenAI-compatible API requests by route and status",
                                    ["route", "status"], registry=self.registry)
        self.registry.register(_SchedulerGauges(engine))
        engine.scheduler.observer = self

    # ---- SchedulerObserver (the scheduler's thread)
    def admitted(self, kind: str, waited_s: float) -> None:
        self.queue_wait.labels(kind).observe(waited_s)

    def tick(self, batch_size: int) -> None:
        self.batch_size.observe(batch_size)

    def prompt_tokens(self, n: int) -> None:
        self.prompt_tokens_total.inc(n)

    def generated_tokens(self, n: int) -> None:
        self.generated_tokens_total.inc(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
