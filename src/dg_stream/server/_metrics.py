"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Plain counters and gauges under one lock-free owner: the event loop. ``GET /metrics`` renders a
snapshot through prometheus_client, with a registry of this app's own (several apps in one
process never share or clash).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .._chunks import Chunk, Stats

__all__ = ["Metrics"]

_TTFC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """What the server has done since it started."""

    def __init__(self, max_concurrent: int) -> None:
        self.max_concurrent = max_concurrent
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)  # endpoint, status
        self.generations: defaultdict[tuple[str, str], int] = defaultdict(int)  # endpoint, outcome
        self.active = 0
        self.rejected_overload = 0
        self.disconnects = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.steps = Stats()  # every verifier call's statistics, summed
        # A round shared by R generations gives each of them a step with rows=R, so the
        # rounds are the sum of 1/R over steps.
        self.rounds = 0.0
        self.last_rows = 0
        self.ttfc_counts = [0] * (len(_TTFC_BUCKETS) + 1)
        self.ttfc_sum = 0.0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # a collector: the registry calls collect() to render

    # -- recording ----------------------------------------------------------------------------

    def request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, str(status))] += 1

    def generation_done(self, endpoint: str, outcome: str) -> None:
        self.generations[(endpoint, outcome)] += 1

    def chunk(self, chunk: Chunk) -> None:
        step = chunk.step
        if step is not None:
            self.steps = self.steps.add(step)
            self.rounds += 1.0 / max(1, step.rows)
            self.last_rows = step.rows
        # Count committed tokens as they stream: a disconnected client's tokens were still made.
        self.completion_tokens += (
            len(chunk.token_ids) if chunk.token_ids else (step.committed if step is not None else 0)
        )
        if chunk.usage is not None:
            self.prompt_tokens += chunk.usage.prompt_tokens

    def first_chunk(self, seconds: float) -> None:
        self.ttfc_counts[bisect.bisect_left(_TTFC_BUCKETS, seconds)] += 1
        self.ttfc_sum += seconds

    # -- rendering ----------------------------------------------------------------------------

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def collect(self) -> Iterator[Any]:
        """The metric families, as prometheus_client's registry asks for them (counters are
        named without ``_total``, which the exposition adds)."""

        def labelled(name: str, help_text: str, label: str, counts: dict) -> Any:
            family = CounterMetricFamily(name, help_text, labels=["endpoint", label])
            for labels, value in sorted(counts.items()):
                family.add_metric(labels, value)
            return family

        yield labelled(
            "dg_stream_http_requests",
            "HTTP requests by endpoint and status.",
            "status",
            self.requests,
        )
        yield labelled(
            "dg_stream_generations",
            "Generations by endpoint and outcome (stop, length, cancelled, error, "
            "rejected: refused before any output, disconnected, shutdown: ended by the "
            "server stopping).",
            "outcome",
            self.generations,
        )
        counter, gauge = CounterMetricFamily, GaugeMetricFamily
        rows = self.steps.verifier_calls / self.rounds if self.rounds else 0.0
        for kind, name, help_text, value in (
            (gauge, "generations_active", "Generations running now.", self.active),
            (gauge, "generations_max", "The bound on concurrent generations.", self.max_concurrent),
            (
                counter,
                "rejected_overload",
                "Requests refused because the server was at capacity.",
                self.rejected_overload,
            ),
            (
                counter,
                "client_disconnects",
                "Generations stopped because the client went away.",
                self.disconnects,
            ),
            (
                counter,
                "prompt_tokens",
                "Prompt tokens of finished generations.",
                self.prompt_tokens,
            ),
            (counter, "completion_tokens", "Tokens generated.", self.completion_tokens),
            (
                counter,
                "verifier_calls",
                "Verifier steps, counted per generation (a batched round counts once per row).",
                self.steps.verifier_calls,
            ),
            (
                counter,
                "rounds",
                "Verifier forward passes (rounds), each shared by the generations batched in it.",
                round(self.rounds),
            ),
            (
                gauge,
                "rows_per_round",
                "Generations per verifier forward pass, averaged since start.",
                rows,
            ),
            (
                gauge,
                "rows_last_round",
                "Generations that shared the latest verifier forward pass.",
                self.last_rows,
            ),
            (counter, "drafted_tokens", "Draft tokens proposed.", self.steps.drafted_tokens),
            (counter, "accepted_tokens", "Draft tokens accepted.", self.steps.accepted_tokens),
            (
                gauge,
                "mean_accepted_per_call",
                "Accepted draft tokens per verifier call since start.",
                self.steps.mean_accepted,
            ),
        ):
            yield kind(f"dg_stream_{name}", help_text, value=value)
        cumulative, buckets = 0, []
        for bound, count in zip((*_TTFC_BUCKETS, "+Inf"), self.ttfc_counts, strict=True):
            cumulative += count
            buckets.append((str(bound), cumulative))
        yield HistogramMetricFamily(
            "dg_stream_time_to_first_chunk_seconds",
            "From the start of a generation to its first chunk.",
            buckets=buckets,
            sum_value=self.ttfc_sum,
        )
