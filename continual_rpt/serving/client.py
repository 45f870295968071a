"""A Python client of `crpt serve`: a served bank's answers, tasks and health over HTTP.

    client = BankClient("http://127.0.0.1:8000")
    client.predict([{"idx": 7, "premise": "...", "hypothesis": "..."}], task="RTE")  # or task=None: each row routed
    # -> [{"task": "RTE", "prediction": "entailment", "index": 0, "options": [...], "scores": [...], "routing_score": None,
    #      "row": 0, "uid": "RTE/request/7"}]

It speaks HTTP through urllib from the standard library rather than httpx: a machine that only
asks a server needs the core package alone (not the `serve` extra), and the client sends few,
large requests (chunks of up to `max_rows` rows, one after another), where httpx's connection
pooling and async would buy nothing measurable.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_MAX_ROWS = 256  # the server's default limit of rows a request; a lower limit there is met by halving on 413


class ServerError(ValueError):
    """The server answered a request with an error: its HTTP status and its own message (4xx: the request's fault).

    `row` is the index, in the rows given to `predict`, of the row the server named (422), else None.
    """

    def __init__(self, url: str, status: int, message: str, row: int | None = None):
        super().__init__(f"{url}: HTTP {status}: {message}")
        self.url, self.status, self.message, self.row = url, status, message, row


class ServerUnreachable(ConnectionError):
    """No HTTP answer from the server at all (refused, reset, timed out); the message names the URL."""


def _error_detail(body: bytes) -> tuple[str, int | None]:
    """The server's message and the row it names, from an error body ({"detail": ..., "row": ...}: FastAPI's shape)."""
    text = body.decode(errors="replace").strip() or "(no message)"
    try:
        problem = json.loads(body)
    except ValueError:
        return text, None
    if not isinstance(problem, dict) or "detail" not in problem:
        return text, None
    detail, row = problem["detail"], problem.get("row")
    return (detail if isinstance(detail, str) else json.dumps(detail)), (row if isinstance(row, int) else None)


class BankClient:
    """A served prompt bank at `url` (e.g. http://127.0.0.1:8000); every call waits at most `timeout` seconds."""

    def __init__(self, url: str, timeout: float = 30, max_rows: int = DEFAULT_MAX_ROWS):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server URL {url!r} must start with http:// or https://")
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.url, self.timeout, self.max_rows = url.rstrip("/"), timeout, max_rows

    def health(self) -> dict:
        """GET /health: the server's state (a ServerError, 503, while its bank holds no entry yet)."""
        return self._request("GET", "/health")

    def wait_until_ready(self, within_s: float = 60) -> dict:
        """Poll /health until the server answers ready (listening, an entry served), at most `within_s` seconds."""
        deadline = time.monotonic() + within_s
        while True:
            try:
                return self.health()
            except (ServerUnreachable, ServerError) as err:
                if time.monotonic() > deadline:
                    raise ServerUnreachable(f"{self.url} not ready within {within_s:g} s: {err}") from None
            time.sleep(0.1)

    def tasks(self) -> list[dict]:
        """GET /v1/tasks: every entry served, with its labels, method, prompt shape, backbone and fields."""
        return self._request("GET", "/v1/tasks")["tasks"]

    def task(self, name: str) -> dict:
        """GET /v1/tasks/{name}: one entry (ServerError 404 naming the known tasks if none is called so)."""
        return self._request("GET", "/v1/tasks/" + urllib.parse.quote(name, safe=""))

    def predict(self, rows: list[dict], task: str | None = None) -> list[dict]:
        """One result per example, in row order (a MultiRC or ReCoRD row holds several): task, prediction, index, options,
        scores, routing_score (null unless routed: task None), row (its index in `rows`) and uid."""
        results = []
        for start in range(0, len(rows), self.max_rows):
            results += self._predict_chunk(rows[start:start + self.max_rows], task, start)
        return results

    def _predict_chunk(self, rows: list[dict], task: str | None, first: int) -> list[dict]:
        """The results of rows[first:…]; a chunk over the server's row or byte limit (413) is sent in halves."""
        try:
            results = self._request("POST", "/v1/predict", {"task": task, "rows": rows})["results"]
        except ServerError as err:
            if err.status == 413 and len(rows) > 1:
                half = len(rows) // 2
                return self._predict_chunk(rows[:half], task, first) + self._predict_chunk(rows[half:], task, first + half)
            if err.row is not None and first:  # the server counts rows within the chunk; the caller, within its list
                raise ServerError(err.url, err.status, f"{err.message} (in the request of rows {first}-{first + len(rows) - 1}: "
                                  f"row {first + err.row} of all)", first + err.row) from None
            raise
        if {result["row"] for result in results} != set(range(len(rows))):
            raise ServerError(self.url, 200, f"the answer does not answer every one of the {len(rows)} rows sent")
        return [{**result, "row": result["row"] + first} for result in results]

    def _request(self, method: str, path: str, payload: dict | None = None):
        """The decoded JSON answer to one request; an HTTP error is a ServerError, no answer a ServerUnreachable."""
        url = self.url + path
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(url, data, method=method, headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            message, row = _error_detail(err.read())
            raise ServerError(url, err.code, message, row) from None
        except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out
            reason = getattr(err, "reason", err)
            raise ServerUnreachable(f"no answer from the crpt server at {url}: {reason} (is `crpt serve` running there?)") from None
