"""The HTTP server of `fedcare serve`, bounded everywhere a client can push (issue 13).

The attacker this guards against sits inside the hospital network (or on the same host, for a
loopback service) and needs no token: everything below happens before authentication.

    what a client can push        bound (default)                     answer, then close
    request line                  8 KiB                                414
    request head (line+headers)   16 KiB in total, 100 header fields   431
    body                          64 KiB (`inference.middleware`)      413
    time to send the head         10 s from the connection / 1st byte  408 (silent: closed)
    time to send the body         10 s from the end of the head        408
    idle keep-alive               10 s after a response                closed
    not reading our answer        10 s with the send buffer full       closed
    open connections              4096, and never more than the        an idle connection is closed
                                  open-file limit (RLIMIT_NOFILE,      to make room; if none is idle,
                                  read at start) minus the files       503 + Retry-After + short body
                                  already open and a reserve

Why uvicorn with httptools, bounded here, and not another server. Measured on the unbounded
uvicorn + httptools: a 64 MiB header cost 5.3 s of CPU (httptools grows a partial header by
`bytes +=`, quadratic in the number of reads) and stalled every other request; nothing bounded
a silent or slow connection; 1,100 silent connections at a 1,024 open-file limit refused all
service. uvicorn's own knobs do not close these: `h11_max_incomplete_event_size` bounds the head
only with the h11 protocol (pure Python: a slower hot path), httptools has no head limit at all;
`timeout_keep_alive` is armed only after a response, so a connection that never sends anything
is held forever, and there is no header or body read timeout; `limit_concurrency` counts open
connections and running tasks but is checked only once a request head is complete (so silent
connections are never refused and still exhaust the open files), and it answers a bare 503 without
Retry-After. hypercorn (h11, pure Python) has a 16 KiB head limit and a keep-alive timeout but no
connection limit; granian (Rust) has header-read and keep-alive timeouts and a per-worker request
backpressure, but no connection limit either, and runs the app in its own worker model rather than
over the socket `fedcare serve` binds and checks. Either would still need the connection counting
below and would trade the measured hot path (bench/serve_latency.py) for a new dependency; they were
judged from their documented settings, not benchmarked here. So the hot path stays uvicorn's
httptools protocol, and `BoundedHttpToolsProtocol` adds what is missing in a few lines per event:

- `data_received` counts the bytes of the current request head *before* the parser sees them
  (one `find(b"\\r\\n\\r\\n")` per read while in the head), so an oversized head is refused after
  16 KiB, never parsed; `on_header` counts the fields;
- a timer armed at `connection_made` (and when a later request's head arrives in pieces), cancelled
  when the head is complete; a body timer armed only if the body does not come with the head;
- a shared `ConnectionGuard` counts open connections and keeps the idle ones (no request in
  progress: never spoke yet, or between keep-alive requests) oldest first. A connection past the
  limit first closes the oldest idle one; if every connection is busy, the new one gets
  `503 Service Unavailable` with `Retry-After` and closes. Refusals are half-closed and the
  client's remaining bytes read and dropped for up to 2 s and 256 KiB ("lingering close"), so the client reads
  the answer instead of a reset; at most 32 connections linger at once, beyond that a refused
  connection is reset.

Over TLS, handshakes are bounded by the header timeout (`ssl_handshake_timeout`); a connection is
counted once its handshake completes. SIGTERM stops the server gracefully like Ctrl-C (uvicorn
would re-raise it after shutdown and die without closing the audit log).
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
import socket
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from inference.middleware import MAX_BODY

MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
MAX_REQUEST_LINE = 8 * 1024
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
KEEP_ALIVE_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 4096
FILE_RESERVE = 64  # model files, audit log, tokens, ONNX Runtime, uvloop's own descriptors
LINGERING = 32  # refused connections being answered at once
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 * 1024
GRACEFUL_SHUTDOWN = 5.0
MAX_TIMEOUT = 3600.0

_HEAD_END = b"\r\n\r\n"


def _error(message: str) -> Exception:
    from inference.model import ServeError

    return ServeError(message)


@dataclass(frozen=True)
class ServeLimits:
    """What one client may push, and how many may at once."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    max_header_bytes: int = MAX_HEADER_BYTES
    max_headers: int = MAX_HEADERS
    max_request_line: int = MAX_REQUEST_LINE
    max_body: int = MAX_BODY
    lingering: int = LINGERING
    open_files: int = 0  # RLIMIT_NOFILE (soft) in effect, for the startup line

    @property
    def retry_after(self) -> int:
        """Seconds after which a refused client may retry: by then every connection still sending its head is closed."""
        return max(1, math.ceil(min(self.header_timeout, 60)))

    def describe(self) -> str:
        return (f"{self.max_connections} connections (open-file limit {self.open_files}; past it idle ones are "
                f"closed first, then 503 Retry-After {self.retry_after}), request head {self.max_header_bytes // 1024} "
                f"KiB / {self.max_headers} fields / request line {self.max_request_line // 1024} KiB, body "
                f"{self.max_body // 1024} KiB, header timeout {self.header_timeout:g} s, body timeout "
                f"{self.body_timeout:g} s, keep-alive {self.keep_alive_timeout:g} s")


def connection_capacity() -> tuple[int, int]:
    """(RLIMIT_NOFILE soft limit, how many connections fit under it): the limit minus the descriptors open
    now, the file reserve and the lingering refusals."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 32
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return soft, soft - open_now - FILE_RESERVE - LINGERING


def _seconds(flag: str, value: float | None, default: float) -> float:
    if value is None:
        return default
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise _error(f"{flag}: expected seconds in (0, {MAX_TIMEOUT:g}], got {value:g}")
    return float(value)


def serve_limits(max_connections: int | None = None, header_timeout: float | None = None,
                 body_timeout: float | None = None, keep_alive_timeout: float | None = None) -> ServeLimits:
    """The limits in effect, from `fedcare serve`'s flags (None: the default); each bad value is one named error.

    A `--max-connections` above what the open-file limit leaves raises the soft limit towards the hard
    one if it can, and is refused otherwise."""
    soft, capacity = connection_capacity()
    if max_connections is None:
        count = min(DEFAULT_MAX_CONNECTIONS, capacity)
        if count < 1:
            raise _error(f"the open-file limit (RLIMIT_NOFILE {soft}) leaves no room for connections; raise it (ulimit -n)")
    else:
        count = max_connections
        if count < 1:
            raise _error(f"--max-connections: expected a positive number, got {count}")
        if count > capacity:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            wanted = soft + count - capacity
            if hard == resource.RLIM_INFINITY or wanted <= hard:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                except (ValueError, OSError):
                    pass
                soft, capacity = connection_capacity()
            if count > capacity:
                raise _error(f"--max-connections: {count} does not fit under the open-file limit (RLIMIT_NOFILE "
                             f"{soft}, hard {hard}): at most {max(capacity, 0)}; raise it (ulimit -n) or give fewer")
    return ServeLimits(
        max_connections=count,
        header_timeout=_seconds("--header-timeout", header_timeout, HEADER_TIMEOUT),
        body_timeout=_seconds("--body-timeout", body_timeout, BODY_TIMEOUT),
        keep_alive_timeout=_seconds("--keep-alive-timeout", keep_alive_timeout, KEEP_ALIVE_TIMEOUT),
        open_files=soft,
    )


class ConnectionGuard:
    """Shared by every connection of one server: how many are open, which are idle (oldest first), how
    many refusals linger, and counts of what was refused."""

    def __init__(self, limits: ServeLimits) -> None:
        self.limits = limits
        self.open = 0
        self.lingering = 0
        self.idle: dict[BoundedHttpToolsProtocol, None] = {}  # insertion order = idle since
        self.refused_busy = 0  # 503s: every connection was busy
        self.evicted_idle = 0  # idle connections closed to make room
        self.refused_requests = 0  # 408/413-by-parser/414/431

    def make_room(self) -> bool:
        """True if a new connection may be served: below the limit, or an idle one was closed for it."""
        if self.open < self.limits.max_connections:
            return True
        if not self.idle:
            return False
        oldest = next(iter(self.idle))
        del self.idle[oldest]
        oldest.evict()
        self.evicted_idle += 1
        return True


def _answer(status: int, detail: str, *extra: bytes) -> bytes:
    body = orjson.dumps({"detail": detail})
    return b"".join([STATUS_LINE[status], b"content-type: application/json\r\ncontent-length: ",
                     str(len(body)).encode(), b"\r\nconnection: close\r\n", *extra, b"\r\n", body])


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head size and count limits, header/body/send timeouts and a
    connection limit (see the module docstring)."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, guard: ConnectionGuard) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self.limits = guard.limits
        self._state = 0  # 0 not admitted, 1 serving, 2 refused (lingering), 3 reset
        self._in_head = True  # reading (or waiting for) a request head
        self._head_bytes = 0
        self._line_done = False
        self._tail = b""
        self._fields = 0
        self._timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None

    # -- connections -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        self.transport = transport
        if not guard.make_room():
            guard.refused_busy += 1
            self._linger(_answer(503, "the service is at its connection limit; retry later",
                                 b"retry-after: %d\r\n" % self.limits.retry_after))
            return
        guard.open += 1
        self._state = 1
        super().connection_made(transport)
        guard.idle[self] = None
        self._timer = self.loop.call_later(self.limits.header_timeout, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        state, self._state = self._state, 0
        self._cancel_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if state == 2:
            self.guard.lingering -= 1
            return
        if state == 0:
            return  # reset at the door, or evicted (already uncounted)
        self.guard.open -= 1
        self.guard.idle.pop(self, None)
        super().connection_lost(exc)

    def evict(self) -> None:
        """Close this idle connection to make room for a new one (it no longer counts from now)."""
        self._state = 0
        self.guard.open -= 1
        self._cancel_timer()
        self._unset_keepalive_if_required()
        self.connections.discard(self)
        self.transport.abort()

    def _linger(self, answer: bytes) -> None:
        """Answer, stop sending, drop what the client still sends for a while, then close."""
        transport = self.transport
        if self.guard.lingering >= self.limits.lingering:
            self._state = 3
            transport.abort()
            return
        self.guard.lingering += 1
        self._state = 2
        self._head_bytes = 0  # now: bytes dropped while lingering
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self.loop.call_later(LINGER_SECONDS, transport.close)

    def _refuse(self, status: int, detail: str) -> None:
        """Refuse the request in progress (head too large, too slow, ...); the connection closes."""
        self.guard.refused_requests += 1
        self._cancel_timer()
        self._unset_keepalive_if_required()
        self.guard.idle.pop(self, None)
        busy = self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started
        self.guard.open -= 1
        self.connections.discard(self)
        if busy:  # an answer is already on its way on this connection: no second one
            self._state = 0
            self.transport.abort()
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app waiting for this body gets http.disconnect
            self.cycle.message_event.set()
        self._linger(_answer(status, detail))
        if self._state == 3:
            self._state = 0

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._state != 1 or self.transport.is_closing():
            return
        if self._in_head and self._head_bytes == 0:  # never said anything (or nothing since its last answer)
            self.guard.idle.pop(self, None)
            self.transport.close()
            return
        what = "request head" if self._in_head else "request body"
        limit = self.limits.header_timeout if self._in_head else self.limits.body_timeout
        self._refuse(408, f"the {what} did not arrive within {limit:g} s")

    # -- reading ---------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._state != 1:
            if self._state == 2:  # refused: drop what the client still sends, up to a point
                self._head_bytes += len(data)
                if self._head_bytes > LINGER_BYTES:
                    self.transport.close()
            return
        self.guard.idle.pop(self, None)
        if self._in_head:
            limits = self.limits
            before = self._head_bytes
            end = data.find(_HEAD_END)
            if end < 0 and before:
                joined = self._tail + data[:3]
                end = joined.find(_HEAD_END)
                if end >= 0:
                    end -= len(self._tail)
            size = before + (len(data) if end < 0 else end + 4)
            if not self._line_done:
                line_end = data.find(b"\r\n")
                if line_end < 0 and before and data[:1] == b"\n" and self._tail.endswith(b"\r"):
                    self._line_done = True  # the CRLF spans two reads: the line ended with the last one
                if not self._line_done and (line_end >= 0 or before + len(data) > limits.max_request_line):
                    line = before + (line_end if line_end >= 0 else len(data))
                    if line > limits.max_request_line:
                        return self._refuse(414, f"the request line is longer than {limits.max_request_line} bytes")
                    self._line_done = line_end >= 0
            if size > limits.max_header_bytes:
                return self._refuse(431, f"the request head is larger than {limits.max_header_bytes} bytes")
            self._head_bytes = size
            if end < 0:
                self._tail = (self._tail + data)[-3:]
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            refusal, self._refusal = self._refusal, None
            if refusal is not None:
                return self._refuse(*refusal)
            self.logger.warning("Invalid HTTP request received.")
            return self._refuse(400, "invalid HTTP request")
        if self._timer is None and self._state == 1:  # arrived in pieces: the rest has a deadline
            if self._in_head:
                if self._head_bytes:
                    self._timer = self.loop.call_later(self.limits.header_timeout, self._timed_out)
            elif self.cycle is not None and self.cycle.more_body:
                self._timer = self.loop.call_later(self.limits.body_timeout, self._timed_out)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > self.limits.max_headers:
            self._refusal = (431, f"more than {self.limits.max_headers} header fields")
            raise ValueError("too many header fields")  # stops the parser; data_received answers
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes, self._line_done, self._fields, self._tail = True, 0, False, 0, b""
        self._cancel_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._state == 1 and self.timeout_keep_alive_task is not None:
            self.guard.idle[self] = None  # between keep-alive requests

    def timeout_keep_alive_handler(self) -> None:
        self.guard.idle.pop(self, None)
        super().timeout_keep_alive_handler()

    def shutdown(self) -> None:
        if self._state == 1:
            super().shutdown()

    # -- writing ---------------------------------------------------------------------------------

    def pause_writing(self) -> None:
        if self.flow is None:  # refused at the door
            return
        super().pause_writing()
        if self._send_timer is None:  # the client does not read its answers
            self._send_timer = self.loop.call_later(self.limits.send_timeout, self.transport.abort)

    def resume_writing(self) -> None:
        if self.flow is None:
            return
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None


class BoundedServer(uvicorn.Server):
    """uvicorn's server over already-bound sockets with `BoundedHttpToolsProtocol`; SIGTERM stops it like Ctrl-C."""

    def __init__(self, config: uvicorn.Config, limits: ServeLimits) -> None:
        super().__init__(config)
        self.guard = ConnectionGuard(limits)
        self.stopped_by: int | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            self.should_exit = True
            return
        config, guard = self.config, self.guard
        assert sockets, "BoundedServer serves sockets bound by `fedcare serve`"

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return BoundedHttpToolsProtocol(config=config, server_state=self.server_state,
                                            app_state=self.lifespan.state, _loop=_loop, guard=guard)

        loop = asyncio.get_running_loop()
        handshake = guard.limits.header_timeout if config.ssl else None
        self.servers = [await loop.create_server(create_protocol, sock=sock, ssl=config.ssl, backlog=config.backlog,
                                                 ssl_handshake_timeout=handshake) for sock in sockets]
        self.started = True

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self.stopped_by = sig
        self._captured_signals.clear()  # stop gracefully and return; do not re-raise the signal afterwards


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_server(app: Any, sock: socket.socket, limits: ServeLimits, *, tls_cert: str | None = None,
               tls_key: str | None = None) -> int | None:
    """Serve `app` on the bound `sock` until SIGINT or SIGTERM; returns the signal that stopped it."""
    config = uvicorn.Config(
        app,
        loop="uvloop" if _has("uvloop") else "asyncio",
        http="httptools",
        lifespan="off",
        access_log=False,  # the audit log records every API request, without patient ids
        log_level="warning",
        server_header=False,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  # a float works (call_later)
        timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN),
        backlog=min(2048, limits.max_connections),
    )
    server = BoundedServer(config, limits)
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    if metrics is not None:
        metrics.connections = server.guard  # /metrics shows what the bounds refused
    server.run(sockets=[sock])
    return server.stopped_by
