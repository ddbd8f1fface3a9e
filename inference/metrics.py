"""Hand-written Prometheus metrics (text exposition format 0.0.4) for the prediction service,
including the audit log's state: whether it can be written (and why not), failed writes, requests
refused for it, rotations, its size on disk, and the unauthenticated requests it summarizes."""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inference.audit import AuditLog

# Request latency buckets (seconds), around the service's 2 ms goal.
BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self, info: dict[str, str], audit: AuditLog | None = None) -> None:
        self.info = info
        self.audit = audit
        self.requests: defaultdict[tuple[str, str, int], int] = defaultdict(int)
        self.predictions: defaultdict[str, int] = defaultdict(int)
        self.buckets: defaultdict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.sums: defaultdict[str, float] = defaultdict(float)
        self.unhandled = 0
        self.connections: Any = None  # the server's `inference.server.ConnectionGuard`, set when it runs

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
        if self.audit is not None:
            lines += self._audit_lines(self.audit)
        if self.connections is not None:
            lines += self._connection_lines(self.connections)
        return "\n".join(lines) + "\n"

    @staticmethod
    def _connection_lines(guard: Any) -> list[str]:
        """What the transport bounds (`inference.server`) did: open connections against the limit, and
        what they refused before any request reached the app (no token involved, so never audited)."""
        return [
            "# HELP fedcare_serve_connections_open Open client connections, and the limit (--max-connections).",
            "# TYPE fedcare_serve_connections_open gauge",
            f"fedcare_serve_connections_open {guard.open}",
            f"fedcare_serve_connections_limit {guard.limits.max_connections}",
            "# HELP fedcare_serve_connections_refused_total Connections turned away at the limit (503, every one busy) "
            "or closed to make room (an idle one).",
            "# TYPE fedcare_serve_connections_refused_total counter",
            f'fedcare_serve_connections_refused_total{{reason="busy"}} {guard.refused_busy}',
            f'fedcare_serve_connections_refused_total{{reason="idle_evicted"}} {guard.evicted_idle}',
            "# HELP fedcare_serve_requests_refused_by_bounds_total Requests refused by a transport bound "
            "(408 timeout, 414 request line, 431 head) before the app saw them.",
            "# TYPE fedcare_serve_requests_refused_by_bounds_total counter",
            f"fedcare_serve_requests_refused_by_bounds_total {guard.refused_requests}",
        ]

    @staticmethod
    def _audit_lines(audit: AuditLog) -> list[str]:
        failure = audit.failure
        lines = [
            "# HELP fedcare_serve_audit_writable 1 when the audit log can be written; 0 when it cannot (audited requests get 503).",
            "# TYPE fedcare_serve_audit_writable gauge",
            f"fedcare_serve_audit_writable {0 if failure is not None else 1}",
            "# HELP fedcare_serve_audit_failure Why the audit log cannot be written now (present only while it cannot).",
            "# TYPE fedcare_serve_audit_failure gauge",
        ]
        if failure is not None:
            lines.append(f'fedcare_serve_audit_failure{{reason="{_label(failure)}"}} 1')
        lines += [
            "# HELP fedcare_serve_audit_write_failures_total Audit log writes that failed.",
            "# TYPE fedcare_serve_audit_write_failures_total counter",
            f"fedcare_serve_audit_write_failures_total {audit.write_failures}",
            "# HELP fedcare_serve_audit_refused_total Requests answered 503 because their audit line could not be written.",
            "# TYPE fedcare_serve_audit_refused_total counter",
            f"fedcare_serve_audit_refused_total {audit.refused}",
            "# HELP fedcare_serve_audit_rotations_total Audit log rotations.",
            "# TYPE fedcare_serve_audit_rotations_total counter",
            f"fedcare_serve_audit_rotations_total {audit.rotations}",
            "# HELP fedcare_serve_audit_deleted_files_total Rotated audit files deleted (keep or the disk cap).",
            "# TYPE fedcare_serve_audit_deleted_files_total counter",
            f"fedcare_serve_audit_deleted_files_total {audit.deleted}",
            "# HELP fedcare_serve_audit_bytes The audit log on disk: the current file and the rotated ones.",
            "# TYPE fedcare_serve_audit_bytes gauge",
            f"fedcare_serve_audit_bytes {audit.disk_bytes()}",
            "# HELP fedcare_serve_audit_max_bytes The cap on fedcare_serve_audit_bytes.",
            "# TYPE fedcare_serve_audit_max_bytes gauge",
            f"fedcare_serve_audit_max_bytes {audit.settings.max_total_bytes}",
            "# HELP fedcare_serve_unauthenticated_total Audited-endpoint requests without a valid token, by reason "
            "(summarized in the audit log, at most one line per second).",
            "# TYPE fedcare_serve_unauthenticated_total counter",
        ]
        for reason, n in sorted(audit.unauthenticated_total.items()):
            lines.append(f'fedcare_serve_unauthenticated_total{{reason="{_label(reason)}"}} {n}')
        return lines
