"""The HTTP service of `crpt serve`: one frozen backbone answering every task of a prompt bank.

FastAPI on uvicorn: a standard ASGI stack whose request and response models (pydantic) give the
validation and the OpenAPI schema (/docs, /openapi.json) for free, and whose server runs several
worker processes on one port (`--workers`), each loading the backbone once. The service holds no
state but what it reads from the bank folder, so workers and machines behind a load balancer answer
alike over one read-only (shared or synced) bank.

Requests are parsed in the event loop's thread pool, queued, and answered in mixed-task batches by
`batcher.Batcher` (one forward at a time on the shared model). A background task looks at bank.json
every `watch_interval_s` (`ServedBank.refresh`: a stat unless it changed) and starts answering with
entries that land meanwhile. Bad input is a 4xx naming the field, row or limit; a 5xx is a bug.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from continual_rpt.serving.batcher import Batcher
from continual_rpt.serving.limits import Limits
from continual_rpt.serving.metrics import CLIENT_CLOSED, INVALID, ROUTED, ServingMetrics
from continual_rpt.serving.middleware import OUTCOME, ServingMiddleware
from continual_rpt.serving.state import RowError, ServedBank, UnknownTask

log = logging.getLogger(__name__)
OPTIONS_ENV = "CRPT_SERVE_OPTIONS"  # JSON: how `crpt serve` hands its options to uvicorn's worker processes


class PredictRequest(BaseModel):
    """Rows to answer, of one task or (task null) each routed to the entry that should answer it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"task": "RTE", "rows": [{"premise": "A cat sat on the mat.", "hypothesis": "A cat sat."}]}]})
    task: str | None = Field(None, description="entry answering every row; null: each row routed to an entry")
    rows: list[dict[str, Any]] = Field(min_length=1, description="rows in the task's own format (the fields crpt bank predict reads)")


class Result(BaseModel):
    """One example's answer (a MultiRC or ReCoRD row holds several examples)."""

    task: str = Field(description="the entry that answered: the one given, or the one the row was routed to")
    prediction: str = Field(description="the label name, or the chosen candidate's text")
    index: int = Field(description="the chosen option's index in `options`")
    options: list[str]
    scores: list[float] = Field(description="the model's score of each option")
    routing_score: float | None = Field(description="how sure the router was; null when the task was given")
    row: int = Field(description="the request's row this answers")
    uid: str = Field(description="the example's id as its task names it")


class PredictResponse(BaseModel):
    """The answers, in the order of the rows."""

    results: list[Result]


class TaskInfo(BaseModel):
    """One served entry."""

    name: str
    task: str
    kind: str
    labels: list[str]
    method: str | None
    prompt_shape: list[int] | None
    backbone: str | None
    fields: list[str] = Field(description="the row fields the task reads")
    routed: bool = Field(description="whether rows without a task are routed to it")


class TaskList(BaseModel):
    """Every served entry, in bank.json order."""

    tasks: list[TaskInfo]


class Health(BaseModel):
    """Whether this worker answers (the backbone and the bank's entries loaded), and which worker it is."""

    ready: bool
    pid: int
    tasks: int
    generation: int
    error: str | None = None


class Problem(BaseModel):
    """An error: `detail` says what is wrong (the field, row or limit); other keys add the row, field or limit."""

    model_config = ConfigDict(extra="allow")
    detail: str


def problem(status: int, detail: str, **extra) -> JSONResponse:
    """An error response in FastAPI's shape ({"detail": ...}) with extra keys."""
    return JSONResponse({"detail": detail, **extra}, status_code=status)


class Service:
    """What one app serves: the bank (once loaded), the batcher, the metrics, and the background tasks."""

    def __init__(self, served: ServedBank | Callable[[], ServedBank], limits: Limits) -> None:
        self.served = served if isinstance(served, ServedBank) else None
        self.load = None if self.served else served
        self.error: str | None = None
        self.limits = limits
        self.metrics = ServingMetrics()
        self.batcher = Batcher(self.answer, limits.max_batch, limits.max_wait_ms, self.metrics)

    def answer(self, batch: list) -> list:
        """Answer a batch (in the batcher's model thread)."""
        return self.served.answer(batch)

    def ready(self) -> bool:
        """Whether requests can be answered: the bank loaded, and the backbone with its first entry."""
        return self.served is not None and self.served.ready

    async def load_and_watch(self) -> None:
        """Load the bank (if given a loader), then look for new entries every watch_interval_s until cancelled."""
        if self.served is None:
            try:
                self.served = await asyncio.to_thread(self.load)
            except Exception as err:  # kept and shown by /health (503) and the log; the process stays up, unready
                self.error = f"{type(err).__name__}: {err}"
                log.exception("could not load the bank; /health answers 503")
                return
        self.metrics.bank(len(self.served.snapshot.entries), self.served.generation)
        while True:
            await asyncio.sleep(self.limits.watch_interval_s)
            try:
                added = await asyncio.to_thread(self.served.refresh)
            except Exception:  # a bug in refresh must not stop serving what is loaded; logged with its traceback
                log.exception("refreshing the bank failed; serving the entries loaded before")
                continue
            if added:
                log.info("now serving %s (generation %d)", ", ".join(added), self.served.generation)
                self.metrics.bank(len(self.served.snapshot.entries), self.served.generation)

    def label(self, task: str | None) -> str:
        """The metrics label of a request naming `task`: an entry's name, ROUTED, or INVALID (never a client's string)."""
        if task is None:
            return ROUTED
        return task if task in self.served.snapshot.entries else INVALID


def create_app(served: ServedBank | Callable[[], ServedBank], max_batch: int = Limits.max_batch, max_wait_ms: float = Limits.max_wait_ms,
               max_rows: int = Limits.max_rows, max_body_bytes: int = Limits.max_body_bytes,
               watch_interval_s: float = Limits.watch_interval_s) -> FastAPI:
    """The app serving `served`, or the bank a loader returns (called in a thread at startup: /health is 503 until it is done)."""
    service = Service(served, Limits(max_batch=max_batch, max_wait_ms=max_wait_ms, max_rows=max_rows,
                                     max_body_bytes=max_body_bytes, watch_interval_s=watch_interval_s))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(service.batcher.run()), asyncio.create_task(service.load_and_watch())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            service.batcher.close()

    app = FastAPI(title="continual-rpt bank server", lifespan=lifespan,
                  description="One frozen backbone answering every task of a prompt bank; entries added to the bank are served as they land.")
    app.state.service = service
    app.add_middleware(ServingMiddleware, max_body_bytes=max_body_bytes, metrics=service.metrics)
    errors = {503: {"model": Problem, "description": "still loading"}}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_problem(err.errors())

    @app.exception_handler(UnknownTask)
    async def unknown_task(request: Request, err: UnknownTask) -> JSONResponse:
        return problem(404, str(err), tasks=list(service.served.snapshot.entries))

    @app.post("/v1/predict", response_model=PredictResponse, responses={
        400: {"model": Problem, "description": "the body is not JSON"}, 404: {"model": Problem, "description": "unknown task"},
        413: {"model": Problem, "description": "too many rows or bytes"},
        422: {"model": Problem, "description": "a row or field that cannot be read (named)"}, **errors})
    async def predict(body: PredictRequest, request: Request):
        """Answer every row: with the given task's entry, or (task null) with the entry each row is routed to."""
        if not service.ready():
            return not_ready(service)
        label = service.label(body.task)
        request.scope[OUTCOME] = (label, {label: len(body.rows)})
        if len(body.rows) > service.limits.max_rows:
            return problem(413, f"{len(body.rows)} rows: at most {service.limits.max_rows} rows a request are accepted "
                                "(crpt serve --max-rows); send them in several requests", limit=service.limits.max_rows)
        try:
            parsed = await asyncio.to_thread(service.served.parse, body.task, body.rows)
        except RowError as err:
            return problem(422, str(err), row=err.row, field=err.field)
        answers = await service.batcher.submit(parsed, len(parsed))
        request.scope[OUTCOME] = (label, Counter(answer.task for answer in answers))
        if await request.is_disconnected():  # nobody to answer: counted as nginx's 499, the response goes nowhere
            return Response(status_code=CLIENT_CLOSED)
        return {"results": [asdict(answer) for answer in answers]}

    @app.get("/v1/tasks", response_model=TaskList, responses=errors)
    async def tasks():
        """Every served entry: its labels, method, prompt shape, backbone and the fields its rows need."""
        return {"tasks": service.served.tasks()} if service.ready() else not_ready(service)

    @app.get("/v1/tasks/{name}", response_model=TaskInfo, responses={404: {"model": Problem, "description": "unknown task"}, **errors})
    async def task(name: str):
        """One served entry."""
        return service.served.task(name) if service.ready() else not_ready(service)

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "not ready"}})
    async def health():
        """Ready (200) once the backbone and the bank's entries are loaded; 503 before (or if loading failed: `error`)."""
        snapshot = service.served.snapshot if service.served else None
        state = {"ready": service.ready(), "pid": os.getpid(), "tasks": len(snapshot.entries) if snapshot else 0,
                 "generation": snapshot.generation if snapshot else 0, "error": service.error}
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics():
        """Prometheus metrics: requests and rows by task and status, batch sizes, queue wait and latency histograms."""
        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def not_ready(service: Service) -> JSONResponse:
    """503: the bank or its backbone is not loaded (yet)."""
    why = f"loading the bank failed: {service.error}" if service.error else "loading the backbone and the bank's entries; retry shortly"
    return problem(503, why)


def validation_problem(errors: list[dict]) -> JSONResponse:
    """FastAPI's validation errors as one message naming each field (and the row): 400 for a body that is not JSON, else 422."""
    for error in errors:
        if error["type"] == "json_invalid":
            return problem(400, f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])} "
                                f"at character {error['loc'][-1]}")
        if error["type"] == "missing" and tuple(error["loc"]) == ("body",):
            return problem(400, 'the body is empty: send JSON {"task": ..., "rows": [...]}')
    named = [{"field": field_name(error["loc"]), "message": error["msg"]} for error in errors]
    rows = [error["loc"][2] for error in errors if tuple(error["loc"][:2]) == ("body", "rows") and len(error["loc"]) > 2]
    return problem(422, "; ".join(f"{n['field']}: {n['message']}" for n in named), errors=named,
                   **({"row": rows[0]} if rows and isinstance(rows[0], int) else {}))


def field_name(loc: tuple | list) -> str:
    """A validation error's place: ("body", "rows", 3) -> rows[3]; the body itself -> body."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        name += f"[{part}]" if isinstance(part, int) else f"{'.' if name else ''}{part}"
    return name or "body"


def bank_loader(options: dict) -> tuple[Callable[[], ServedBank], dict]:
    """From `crpt serve`'s options: a function loading the bank it names (ServedBank's options), and the limits (checked)."""
    options = dict(options)
    limits = asdict(Limits(**{key: options.pop(key) for key in Limits.__dataclass_fields__ if key in options}))
    bank, forward_batch = options.pop("bank"), limits.pop("forward_batch")
    return (lambda: ServedBank(bank, batch_size=forward_batch, **options)), limits


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker: `crpt serve`'s options from $CRPT_SERVE_OPTIONS, the bank loaded in the background."""
    log_to_stderr()
    load, limits = bank_loader(json.loads(os.environ[OPTIONS_ENV]))
    return create_app(load, **limits)


def log_to_stderr() -> None:
    """Show continual_rpt's log (entries added or refused, load errors) beside uvicorn's."""
    package = logging.getLogger("continual_rpt")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     [%(process)d] %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def serve(bank: str, host: str, port: int, workers: int, **options) -> None:
    """Run uvicorn on host:port with `workers` processes, each serving `bank` (options: ServedBank's and Limits')."""
    import uvicorn

    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    log_to_stderr()
    load, limits = bank_loader({"bank": str(bank), **options})
    if workers == 1:  # loaded before listening: a bank or backbone that cannot load is crpt's one-line error (exit 2)
        uvicorn.run(create_app(load(), **limits), host=host, port=port)
        return
    # Workers are new processes (spawned): they import the app by name and read the options from the environment.
    os.environ[OPTIONS_ENV] = json.dumps({"bank": str(bank), **options})
    uvicorn.run("continual_rpt.serving.app:app_from_env", factory=True, host=host, port=port, workers=workers)
