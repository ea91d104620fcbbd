"""HTTP plumbing of the local provider server: a threading HTTP/1.1 server and its handler.

The handler reads the body, hands ``(method, path, body)`` to an ``App``, and implements the
``Responder`` the routes write to: JSON answers, and ``text/event-stream`` answers sent with
chunked transfer encoding so keep-alive connections survive a stream. It logs one DEBUG line
per request (method, path, status, ms; never headers) and counts every ``/v1`` request in the
app's ``RequestStats`` just before its status line leaves. It knows nothing about OpenAI
shapes, models, auth or faults.
"""

from __future__ import annotations

import json
import logging
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from interpq.providers.local.backends import ApiError
from interpq.providers.local.faults import RequestStats

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
IDLE_TIMEOUT_S = 300.0
"""Socket timeout of a connection: an idle keep-alive connection is closed after this."""


class App(Protocol):
    """What the server serves: routes a request and keeps the ``/v1`` counts."""

    stats: RequestStats

    def dispatch(self, out: Handler, method: str, path: str, body: bytes) -> None: ...


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection; implements the ``Responder`` the routes write to."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    server: HTTPServer

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # one line per request is logged by _handle

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http: " + format, *args)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.status_sent = code
        self._record(code)  # before any byte leaves, so /stats never lags what a client saw
        super().send_response(code, message)

    def _record(self, status: int) -> None:
        """Count this request in ``/stats`` (``/v1`` paths only, once)."""
        path = getattr(self, "stats_path", None)
        if path is not None:
            self.stats_path = None
            self.server.app.stats.record(path, status, self.t_unix_s)

    def _handle(self, method: str) -> None:
        t0_s, self.t_unix_s = time.monotonic(), time.time()
        self.status_sent = 0
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self.stats_path = path if path.startswith("/v1/") else None
        try:
            self.server.app.dispatch(self, method, path, self._read_body(method))
        except ApiError as exc:
            if self.status_sent:  # a stream already started: all we can do is hang up
                self.close_connection = True
            else:
                self.send_json(exc.status, exc.body(), exc.headers)
        except ConnectionError:
            self.close_connection = True
        except Exception:
            logger.exception("internal error on %s %s", method, path)
            self.close_connection = True
            if not self.status_sent:
                body = ApiError(500, "internal server error", err_type="server_error").body()
                self.send_json(500, body)
        finally:
            self._record(self.status_sent)  # 0 when nothing was sent (a hang)
            ms = (time.monotonic() - t0_s) * 1000
            logger.debug("%s %s %d %.1fms", method, path, self.status_sent, ms)

    def _read_body(self, method: str) -> bytes:
        if method != "POST":
            return b""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(
                413, f"request body must be 0..{MAX_BODY_BYTES} bytes with Content-Length"
            )
        return self.rfile.read(length)

    # ---- Responder ---------------------------------------------------------------------------

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_event(self, data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        payload = f"data: {text}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.server.stopping.wait(seconds)


class HTTPServer(ThreadingHTTPServer):
    """One daemon thread per connection; ``stopping`` wakes sleeping and hanging requests."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: benchmarks open many connections at once
    app: App
    stopping: threading.Event

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            logger.debug("client went away: %s", sys.exc_info()[1])
        else:
            logger.exception("unhandled error serving a request")
