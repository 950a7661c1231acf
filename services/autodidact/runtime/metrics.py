"""Prometheus metrics of a process, and the endpoint that exposes them.

RPC metrics are recorded by the metrics interceptor for every method; data
metrics (tokens, samples) by the services that produce the data.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_REQUESTS = Counter(
    "autodidact_rpc_requests_total",
    "RPCs handled, by method and status code.",
    ["method", "code"],
)
RPC_LATENCY = Histogram(
    "autodidact_rpc_latency_seconds",
    "Time from receiving an RPC to its last response, by method.",
    ["method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
GENERATED_SAMPLES = Counter("autodidact_generated_samples_total", "Samples generated.", ["backend"])
GENERATED_TOKENS = Counter("autodidact_generated_tokens_total", "Tokens generated.", ["backend"])
PROMPT_TOKENS = Counter("autodidact_prompt_tokens_total", "Prompt tokens evaluated.", ["backend"])
STAGE_DECISIONS = Counter(
    "autodidact_stage_decisions_total",
    "Candidates decided by recipe stages, by outcome ('kept' or the filter that dropped).",
    ["stage", "outcome"],
)
# Jobs running together share the label: it shows the limit the last of them moved to,
# which, as they call the same services, tells the same story.
STAGE_CONCURRENCY_LIMIT = Gauge(
    "autodidact_stage_concurrency_limit",
    "A recipe stage's adaptive limit on concurrent computations (coordinator/concurrency.py), as last set by a job.",
    ["stage"],
)
SCORED_TOKENS = Counter("autodidact_scored_tokens_total", "Tokens the scorer's model evaluated, by method.", ["method"])
TOOL_CALL_DECISIONS = Counter("autodidact_tool_call_decisions_total", "Toolformer candidate calls judged by the scorer.", ["outcome"])
TOOL_CALLS = Counter("autodidact_tool_calls_total", "Tool calls executed, by tool and outcome ('ok' or the error).", ["tool", "outcome"])
DEDUP_ITEMS = Counter("autodidact_dedup_items_total", "Items judged by the diversity filter.", ["outcome"])


def start_metrics_endpoint(port: int, host: str = "0.0.0.0") -> int:
    """Serves /metrics over HTTP on a daemon thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
