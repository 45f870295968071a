"""ASGI middleware of the server: the body-size limit, and one place that counts every predict request's outcome.

A plain ASGI wrapper rather than Starlette's BaseHTTPMiddleware: it reads the body once, refuses it
as soon as it passes the limit (by Content-Length before reading anything, else by the bytes actually
received, so a chunked body cannot slip past), and hands the app the bytes it read. It sees the status
of every response, those of FastAPI's own validation and of a crash (500) included, so the request
metrics count every outcome; the endpoint leaves the request's task and rows in the ASGI scope.
"""

from __future__ import annotations

import json
import os
import time

from continual_rpt.serving.metrics import INVALID, ServingMetrics

PREDICT_PATH = "/v1/predict"
OUTCOME = "crpt.outcome"  # scope key: (task label, rows by the entry they count under), set by the predict endpoint
PID_HEADER = (b"x-worker-pid", str(os.getpid()).encode())  # which worker process answered (several behind one port)


class ServingMiddleware:
    """Refuses bodies over `max_body_bytes` (413), counts predict requests in `metrics`, names the worker in a header."""

    def __init__(self, app, max_body_bytes: int, metrics: ServingMetrics) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        predict = scope["path"] == PREDICT_PATH

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), PID_HEADER]
                if predict:
                    self.count(scope, message["status"], started)
            await send(message)

        body = await self.read_body(scope, receive)
        if isinstance(body, int):  # over the limit by this many bytes at least
            await self.refuse(send_counted, body)
            return
        if body is None:  # the client went away while sending
            return
        replayed = False

        async def receive_read() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: what the server says next (a disconnect)

        try:
            await self.app(scope, receive_read, send_counted)
        except Exception:
            if predict:  # a bug: counted, then left to the server's error handling (a 500 with its traceback logged)
                self.count(scope, 500, started)
            raise

    async def read_body(self, scope, receive) -> bytes | int | None:
        """The whole body; or the bytes it holds (or declares) when over the limit; or None if the client disconnected."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return int(declared)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return size
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def refuse(self, send, size: int) -> None:
        """Answer 413, naming the limit."""
        body = json.dumps({"detail": f"request body of {size} bytes or more: at most {self.max_body_bytes} bytes are "
                                     "accepted (crpt serve --max-body-bytes); send fewer rows a request",
                           "limit": self.max_body_bytes}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def count(self, scope, status: int, started: float) -> None:
        """Count a finished predict request under the task and rows its endpoint recorded (none if it never got there)."""
        task, rows = scope.get(OUTCOME, (INVALID, {}))
        self.metrics.request(task, status, rows, time.perf_counter() - started)
