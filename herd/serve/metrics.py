"""Prometheus metrics of one server: requests, tokens, queue, running sequences, cache blocks, latencies."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from herd.generate import Generator
from herd.generate.scheduler import SchedulerStats

# up to --timeout's default (600 s) and past it: a slower request in +Inf alone had no quantile
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)


class Metrics:
    def __init__(self, engine: Generator):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("herd_requests", "HTTP API requests by route and status", ["route", "status"],
                                registry=registry)
        self.prompt_tokens = Counter("herd_prompt_tokens", "prompt tokens of finished requests", registry=registry)
        self.cached_tokens = Counter("herd_cached_prompt_tokens", "prompt tokens served from the prefix cache",
                                     registry=registry)
        self.generated_tokens = Counter("herd_generation_tokens", "tokens generated", registry=registry)
        self.ttft = Histogram("herd_time_to_first_token_seconds", "time to first token", buckets=_LATENCY,
                              registry=registry)
        self.itl = Histogram("herd_inter_token_latency_seconds", "time between tokens of a stream",
                             buckets=_LATENCY, registry=registry)
        self.e2e = Histogram("herd_request_latency_seconds", "request time, end to end", buckets=_LATENCY,
                             registry=registry)
        scheduler, pool = engine.scheduler, engine.cache.pool
        Gauge("herd_queue_depth", "sequences waiting to run", registry=registry).set_function(
            lambda: engine.waiting)
        Gauge("herd_running_sequences", "sequences in the running batch", registry=registry).set_function(
            lambda: len(scheduler.running))
        Gauge("herd_cache_blocks_in_use", "KV-cache blocks held by sequences", registry=registry).set_function(
            lambda: pool.in_use)
        Gauge("herd_cache_blocks_cached", "free KV-cache blocks that keep a prefix", registry=registry).set_function(
            lambda: len(pool.evictable))
        Gauge("herd_cache_blocks_total", "KV-cache blocks", registry=registry).set(pool.num_blocks)
        registry.register(_DraftCounters(scheduler.stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DraftCounters:
    """Speculative decoding's running totals, read from the scheduler when scraped (counters, so that rate() works):
    accepted / drafted is the share of guesses that saved a forward."""

    def __init__(self, stats: SchedulerStats):
        self.stats = stats

    def collect(self):
        yield CounterMetricFamily("herd_draft_tokens", "tokens guessed by prompt lookup",
                                  value=self.stats.drafted_tokens)
        yield CounterMetricFamily("herd_draft_tokens_accepted", "guessed tokens the model chose too",
                                  value=self.stats.accepted_tokens)
