"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Plain counters and gauges under one lock-free owner: the event loop. No client library is
needed to scrape them; ``GET /metrics`` renders a snapshot.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from .._chunks import Chunk, Stats

__all__ = ["Metrics"]

_TTFC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


class Metrics:
    """What the server has done since it started."""

    def __init__(self, max_concurrent: int) -> None:
        self.max_concurrent = max_concurrent
        self.requests: defaultdict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.generations: defaultdict[tuple[tuple[str, str], ...], int] = defaultdict(int)
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

    # -- recording ----------------------------------------------------------------------------

    def request(self, endpoint: str, status: int) -> None:
        self.requests[(("endpoint", endpoint), ("status", str(status)))] += 1

    def generation_done(self, endpoint: str, outcome: str) -> None:
        self.generations[(("endpoint", endpoint), ("outcome", outcome))] += 1

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
        lines: list[str] = []

        def metric(
            name: str,
            kind: str,
            help_text: str,
            samples: list[tuple[tuple[tuple[str, str], ...], float]],
        ) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                number = repr(float(value)) if isinstance(value, float) else str(value)
                lines.append(f"{name}{_labels(labels)} {number}")

        metric(
            "dg_stream_http_requests_total",
            "counter",
            "HTTP requests by endpoint and status.",
            sorted(self.requests.items()),
        )
        metric(
            "dg_stream_generations_total",
            "counter",
            "Generations by endpoint and outcome (stop, length, cancelled, error, "
            "rejected: refused before any output, disconnected, shutdown: ended by the "
            "server stopping).",
            sorted(self.generations.items()),
        )
        metric(
            "dg_stream_generations_active", "gauge", "Generations running now.", [((), self.active)]
        )
        metric(
            "dg_stream_generations_max",
            "gauge",
            "The bound on concurrent generations.",
            [((), self.max_concurrent)],
        )
        metric(
            "dg_stream_rejected_overload_total",
            "counter",
            "Requests refused because the server was at capacity.",
            [((), self.rejected_overload)],
        )
        metric(
            "dg_stream_client_disconnects_total",
            "counter",
            "Generations stopped because the client went away.",
            [((), self.disconnects)],
        )
        metric(
            "dg_stream_prompt_tokens_total",
            "counter",
            "Prompt tokens of finished generations.",
            [((), self.prompt_tokens)],
        )
        metric(
            "dg_stream_completion_tokens_total",
            "counter",
            "Tokens generated.",
            [((), self.completion_tokens)],
        )
        metric(
            "dg_stream_verifier_calls_total",
            "counter",
            "Verifier steps, counted per generation (a batched round counts once per row).",
            [((), self.steps.verifier_calls)],
        )
        rounds = round(self.rounds)
        metric(
            "dg_stream_rounds_total",
            "counter",
            "Verifier forward passes (rounds), each shared by the generations batched in it.",
            [((), rounds)],
        )
        metric(
            "dg_stream_rows_per_round",
            "gauge",
            "Generations per verifier forward pass, averaged since start.",
            [((), self.steps.verifier_calls / self.rounds if self.rounds else 0.0)],
        )
        metric(
            "dg_stream_rows_last_round",
            "gauge",
            "Generations that shared the latest verifier forward pass.",
            [((), self.last_rows)],
        )
        metric(
            "dg_stream_drafted_tokens_total",
            "counter",
            "Draft tokens proposed.",
            [((), self.steps.drafted_tokens)],
        )
        metric(
            "dg_stream_accepted_tokens_total",
            "counter",
            "Draft tokens accepted.",
            [((), self.steps.accepted_tokens)],
        )
        metric(
            "dg_stream_mean_accepted_per_call",
            "gauge",
            "Accepted draft tokens per verifier call since start.",
            [((), self.steps.mean_accepted)],
        )
        lines.append(
            "# HELP dg_stream_time_to_first_chunk_seconds "
            "From the start of a generation to its first chunk."
        )
        lines.append("# TYPE dg_stream_time_to_first_chunk_seconds histogram")
        cumulative = 0
        name = "dg_stream_time_to_first_chunk_seconds_bucket"
        for bound, count in zip(_TTFC_BUCKETS, self.ttfc_counts, strict=False):
            cumulative += count
            lines.append(f'{name}{{le="{bound}"}} {cumulative}')
        cumulative += self.ttfc_counts[-1]
        lines.append(f'{name}{{le="+Inf"}} {cumulative}')
        lines.append(f"dg_stream_time_to_first_chunk_seconds_sum {self.ttfc_sum!r}")
        lines.append(f"dg_stream_time_to_first_chunk_seconds_count {cumulative}")
        return "\n".join(lines) + "\n"
