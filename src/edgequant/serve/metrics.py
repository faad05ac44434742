"""Prometheus metrics of one server (its own registry, so two apps in one process — tests,
the arena's benchmark — never mix their counts). Names follow vLLM's and llama-server's:
requests by outcome, prompt and generated tokens, time to first token, time per output
token, end-to-end latency, queue depth and slot use per model."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PER_TOKEN = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "edgequant"
        self.requests = Counter(f"{p}_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "prompt tokens processed",
                                     ["model"], registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "tokens generated",
                                         ["model"], registry=r)
        self.finished = Counter(f"{p}_request_success", "generations finished, by reason",
                                ["model", "finish_reason"], registry=r)
        self.cancelled = Counter(f"{p}_request_cancelled",
                                 "generations stopped because the client went away",
                                 ["model"], registry=r)
        self.rejected = Counter(f"{p}_request_rejected", "requests refused: queue full",
                                ["model"], registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds",
                              "request received to first token", ["model"],
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds",
                              "mean decode time per token after the first, per request",
                              ["model"], buckets=_PER_TOKEN, registry=r)
        self.latency = Histogram(f"{p}_e2e_request_latency_seconds",
                                 "request received to last token", ["model"],
                                 buckets=_LATENCY, registry=r)
        self.queue = Gauge(f"{p}_requests_waiting", "requests waiting for a slot", ["model"],
                           registry=r)
        self.busy = Gauge(f"{p}_slots_busy", "slots generating now", ["model"], registry=r)
        self.slots = Gauge(f"{p}_slots_total", "slots (--parallel)", ["model"], registry=r)
        self.batch = Histogram(f"{p}_batch_size", "sequences advanced per decode step",
                               ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
