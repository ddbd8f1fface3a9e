"""Hand-written Prometheus metrics (text exposition format 0.0.4) for the prediction service."""

from __future__ import annotations

import bisect
from collections import defaultdict

# Request latency buckets (seconds), around the service's 2 ms goal.
BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self, info: dict[str, str]) -> None:
        self.info = info
        self.requests: defaultdict[tuple[str, str, int], int] = defaultdict(int)
        self.predictions: defaultdict[str, int] = defaultdict(int)
        self.buckets: defaultdict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.sums: defaultdict[str, float] = defaultdict(float)
        self.unhandled = 0

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, method, status)] += 1
        self.buckets[endpoint][bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sums[endpoint] += seconds

    def render(self) -> str:
        lines = [
            "# HELP fedcare_serve_info The served package and execution provider.",
            "# TYPE fedcare_serve_info gauge",
            "fedcare_serve_info{" + ",".join(f'{k}="{_label(v)}"' for k, v in sorted(self.info.items())) + "} 1",
            "# HELP fedcare_serve_requests_total HTTP requests by endpoint, method and status code.",
            "# TYPE fedcare_serve_requests_total counter",
        ]
        for (endpoint, method, status), n in sorted(self.requests.items()):
            lines.append(f'fedcare_serve_requests_total{{endpoint="{_label(endpoint)}",method="{_label(method)}",code="{status}"}} {n}')
        lines += [
            "# HELP fedcare_serve_request_duration_seconds Time from request start to the end of the response.",
            "# TYPE fedcare_serve_request_duration_seconds histogram",
        ]
        for endpoint, counts in sorted(self.buckets.items()):
            running = 0
            for bound, n in zip((*BUCKETS, float("inf")), counts):
                running += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'fedcare_serve_request_duration_seconds_bucket{{endpoint="{_label(endpoint)}",le="{le}"}} {running}')
            lines.append(f'fedcare_serve_request_duration_seconds_sum{{endpoint="{_label(endpoint)}"}} {self.sums[endpoint]!r}')
            lines.append(f'fedcare_serve_request_duration_seconds_count{{endpoint="{_label(endpoint)}"}} {running}')
        lines += [
            "# HELP fedcare_serve_predictions_total Risk predictions returned, by model.",
            "# TYPE fedcare_serve_predictions_total counter",
        ]
        for model, n in sorted(self.predictions.items()):
            lines.append(f'fedcare_serve_predictions_total{{model="{_label(model)}"}} {n}')
        lines += [
            "# HELP fedcare_serve_unhandled_errors_total Requests answered by the last-resort error handler (should stay 0).",
            "# TYPE fedcare_serve_unhandled_errors_total counter",
            f"fedcare_serve_unhandled_errors_total {self.unhandled}",
        ]
        return "\n".join(lines) + "\n"
