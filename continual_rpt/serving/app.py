"""The HTTP service of `crpt serve`: one frozen backbone answering every task of a prompt bank.

FastAPI on uvicorn: a standard ASGI stack whose request and response models (pydantic) give the
validation and the OpenAPI schema (/docs, /openapi.json) for free, and whose server runs several
worker processes on one port (`--workers`), each loading the backbone once. The service holds no
state but what it reads from the bank folder, so workers and machines behind a load balancer answer
alike over one read-only (shared or synced) bank.

Every worker loads the bank before it takes a connection: one worker before uvicorn listens (a bank
it cannot load is raised as it is: crpt's one-line error, exit 2); each of `--workers N` in its app
factory (`app_from_env`), while the port, bound by uvicorn's supervisor, holds connections for the
workers that are ready. A worker whose load fails writes the error to a file `serve` named for it and
exits with uvicorn's STARTUP_FAILURE (3). Its supervisor (uvicorn/supervisors/multiprocess.py, as of
0.55) takes that status as "would fail the same way on every restart": it stops the other workers and
returns (restarting only a worker that dies with another status), and `serve` raises the worker's
error as `WorkerLoadFailed`: `crpt serve` exits 2 with the line one worker would print (a bug in the
load is named by its type, its traceback in the worker's log). So no worker stays up unloaded
answering 503. The parent does not load the bank first: that would load the backbone once more in a
process that answers nothing, and a worker can fail where the parent would not (its device, its
memory), so the workers' report is needed either way.

Requests are parsed in the event loop's thread pool, queued, and answered in mixed-task batches by
`batcher.Batcher` (one forward at a time on the shared model). A background task looks at bank.json
every `watch_interval_s` (`ServedBank.refresh`: a stat unless it changed) and starts answering with
entries that land meanwhile. Bad input is a 4xx naming the field, row or limit; a 5xx is a bug, or a
broken entry.

A broken entry fails its own requests only: an entry whose prompt or head makes its scores NaN (one
that diverged, or imported with extreme values, its checksums passed) costs its mixed forward one
scoring again entry by entry (`state.ServedBank`), and only the requests needing that entry answer
500 with a message naming it (and `entries`); the other requests of the batch, other tenants', are
answered as they would be alone. 500, not 503: the fault is the server's own data and retrying
changes nothing until the entry is replaced, while 503 tells clients and load balancers to retry or
take the worker out (every worker holds the same entry). Each such batch is logged once per entry
and counted in `crpt_nan_scores_total{entry}`.

Non-finite floats: the only floats a response carries are `Result.scores` and `routing_score`. The
-inf that marks a choice an example lacks in a mixed batch (`evaluation.mixed_option_scores`: a COPA
row beside CB's three labels, ReCoRD rows with fewer candidates) is cut by `state.ServedBank`, which
keeps an example's own options only, and NaN scores are refused while scoring (NonFiniteScores). What
remains possible (an option's score overflowing to ±inf, a routing score of degenerate route state)
is written as JSON null (`ser_json_inf_nan`), as the fields' descriptions say, never a failed encoding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from continual_rpt import errors
from continual_rpt.serving.batcher import Batcher
from continual_rpt.serving.limits import Limits
from continual_rpt.serving.metrics import CLIENT_CLOSED, INVALID, ROUTED, ServingMetrics
from continual_rpt.serving.middleware import OUTCOME, ServingMiddleware
from continual_rpt.serving.state import EntryScoresNaN, RowError, ServedBank, UnknownTask

log = logging.getLogger(__name__)
OPTIONS_ENV = "CRPT_SERVE_OPTIONS"  # JSON: how `crpt serve` hands its options to uvicorn's worker processes
FAILURE_ENV = "CRPT_SERVE_FAILURE_FILE"  # where a worker that cannot load the bank writes why, for `serve` to raise


class WorkerLoadFailed(ValueError):
    """A worker of `crpt serve --workers N` could not load the bank; the message is the worker's error."""


class PredictRequest(BaseModel):
    """Rows to answer, of one task or (task null) each routed to the entry that should answer it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"task": "RTE", "rows": [{"premise": "A cat sat on the mat.", "hypothesis": "A cat sat."}]}]})
    task: str | None = Field(None, description="entry answering every row; null: each row routed to an entry")
    rows: list[dict[str, Any]] = Field(min_length=1, description="rows in the task's own format (the fields crpt bank predict reads)")


class Result(BaseModel):
    """One example's answer (a MultiRC or ReCoRD row holds several examples)."""

    model_config = ConfigDict(ser_json_inf_nan="null")  # a float JSON cannot hold is null, not a failed response (500)
    task: str = Field(description="the entry that answered: the one given, or the one the row was routed to")
    prediction: str = Field(description="the label name, or the chosen candidate's text")
    index: int = Field(description="the chosen option's index in `options`")
    options: list[str]
    scores: list[float | None] = Field(description="the model's score of each option (one per option); null where it is "
                                                   "not finite (a score that overflowed)")
    routing_score: float | None = Field(description="how sure the router was; null when the task was given "
                                                    "(or where the router's score is not finite)")
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
    """Whether this worker answers (an entry of the bank loaded, with the backbone), and which worker it is."""

    ready: bool
    pid: int
    tasks: int
    generation: int


class Problem(BaseModel):
    """An error: `detail` says what is wrong (the field, row or limit); other keys add the row, field or limit."""

    model_config = ConfigDict(extra="allow")
    detail: str


def problem(status: int, detail: str, **extra) -> JSONResponse:
    """An error response in FastAPI's shape ({"detail": ...}) with extra keys."""
    return JSONResponse({"detail": detail, **extra}, status_code=status)


class Service:
    """What one app serves: the loaded bank, the batcher, the metrics, and the background tasks."""

    def __init__(self, served: ServedBank, limits: Limits) -> None:
        self.served = served
        self.limits = limits
        self.metrics = ServingMetrics()
        self.batcher = Batcher(self.answer, limits.max_batch, limits.max_wait_ms, self.metrics)

    def answer(self, batch: list) -> list:
        """Answer a batch (in the batcher's model thread); an entry whose scores are NaN is logged and counted once."""
        answers = self.served.answer(batch)
        failed = Counter(name for answer in answers if isinstance(answer, EntryScoresNaN) for name in answer.entries)
        for name, requests in failed.items():
            log.error("%s: entry %r scores NaN (its prompt or head is broken): the %d of this batch's %d requests needing it "
                      "fail with 500, the others are answered", self.served.path, name, requests, len(answers))
            self.metrics.nan_scores.labels(name).inc()
        return answers

    def ready(self) -> bool:
        """Whether requests can be answered: the backbone and an entry loaded (an empty bank waits for its first)."""
        return self.served.ready

    async def watch(self) -> None:
        """Look for new entries every watch_interval_s until cancelled."""
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


def create_app(served: ServedBank, max_batch: int = Limits.max_batch, max_wait_ms: float = Limits.max_wait_ms,
               max_rows: int = Limits.max_rows, max_body_bytes: int = Limits.max_body_bytes,
               watch_interval_s: float = Limits.watch_interval_s) -> FastAPI:
    """The app serving the loaded bank `served` (/health is 503 while it holds no entry)."""
    service = Service(served, Limits(max_batch=max_batch, max_wait_ms=max_wait_ms, max_rows=max_rows,
                                     max_body_bytes=max_body_bytes, watch_interval_s=watch_interval_s))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(service.batcher.run()), asyncio.create_task(service.watch())]
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
    unready = {503: {"model": Problem, "description": "no entry served yet (an empty bank)"}}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_problem(err.errors())

    @app.exception_handler(UnknownTask)
    async def unknown_task(request: Request, err: UnknownTask) -> JSONResponse:
        return problem(404, str(err), tasks=list(service.served.snapshot.entries))

    @app.exception_handler(EntryScoresNaN)
    async def entry_scores_nan(request: Request, err: EntryScoresNaN) -> JSONResponse:
        return problem(500, str(err), entries=err.entries)

    @app.post("/v1/predict", response_model=PredictResponse, responses={
        400: {"model": Problem, "description": "the body is not JSON"}, 404: {"model": Problem, "description": "unknown task"},
        413: {"model": Problem, "description": "too many rows or bytes"},
        422: {"model": Problem, "description": "a row or field that cannot be read (named)"},
        500: {"model": Problem, "description": "an entry the rows need scores NaN (named, also as `entries`)"}, **unready})
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

    @app.get("/v1/tasks", response_model=TaskList, responses=unready)
    async def tasks():
        """Every served entry: its labels, method, prompt shape, backbone and the fields its rows need."""
        return {"tasks": service.served.tasks()} if service.ready() else not_ready(service)

    @app.get("/v1/tasks/{name}", response_model=TaskInfo, responses={404: {"model": Problem, "description": "unknown task"}, **unready})
    async def task(name: str):
        """One served entry."""
        return service.served.task(name) if service.ready() else not_ready(service)

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "not ready"}})
    async def health():
        """Ready (200) while an entry is served; 503 while the bank holds none (an empty bank, until its first entry lands)."""
        snapshot = service.served.snapshot
        state = {"ready": service.ready(), "pid": os.getpid(), "tasks": len(snapshot.entries), "generation": snapshot.generation}
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics():
        """Prometheus metrics: requests and rows by task and status, batch sizes, queue wait and latency histograms."""
        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def not_ready(service: Service) -> JSONResponse:
    """503: the bank holds no entry yet."""
    return problem(503, f"{service.served.path} holds no entry yet; entries are served as they land, retry later")


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
    """The app of one uvicorn worker: `crpt serve`'s options from $CRPT_SERVE_OPTIONS, the bank loaded before it listens.

    A load that fails is written to $CRPT_SERVE_FAILURE_FILE and ends the worker with STARTUP_FAILURE, which
    stops the server (a worker left up unloaded would answer 503 forever; one exiting otherwise is restarted).
    """
    from uvicorn.config import STARTUP_FAILURE

    log_to_stderr()
    load, limits = bank_loader(json.loads(os.environ[OPTIONS_ENV]))
    try:
        return create_app(load(), **limits)
    except Exception as err:  # a bug too: it would fail again in every worker the supervisor started in its place
        if isinstance(err, errors.EXPECTED):
            message = str(err)
            log.error("cannot load the bank, stopping the server: %s", message)
        else:
            message = f"{type(err).__name__}: {err} (a bug: its traceback is in the log above)"
            log.exception("cannot load the bank, stopping the server")
        with open(os.environ[FAILURE_ENV], "a", encoding="utf-8") as failure:  # workers failing together each add a line
            failure.write(json.dumps(message) + "\n")
        sys.exit(STARTUP_FAILURE)


def log_to_stderr() -> None:
    """Show continual_rpt's log (entries added or refused, load errors) beside uvicorn's."""
    package = logging.getLogger("continual_rpt")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     [%(process)d] %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def serve(bank: str, host: str, port: int, workers: int, **options) -> None:
    """Run uvicorn on host:port with `workers` processes, each serving `bank` (options: ServedBank's and Limits') until stopped.

    The bank's load error (WorkerLoadFailed, with several workers) if it cannot be loaded.
    """
    import uvicorn

    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    log_to_stderr()
    load, limits = bank_loader({"bank": str(bank), **options})
    if workers == 1:  # loaded before listening: a bank or backbone that cannot load is crpt's one-line error (exit 2)
        uvicorn.run(create_app(load(), **limits), host=host, port=port)
        return
    # Workers are new processes (spawned): they import the app by name and read the options from the environment.
    descriptor, failures = tempfile.mkstemp(prefix="crpt-serve-", suffix=".failure")
    os.close(descriptor)
    os.environ[OPTIONS_ENV], os.environ[FAILURE_ENV] = json.dumps({"bank": str(bank), **options}), failures
    try:
        uvicorn.run("continual_rpt.serving.app:app_from_env", factory=True, host=host, port=port, workers=workers)
        failed = Path(failures).read_text(encoding="utf-8").splitlines()
    finally:
        os.unlink(failures)
    if failed:  # the supervisor returned because a worker could not load: crpt's one-line error, the worker's words
        raise WorkerLoadFailed(json.loads(failed[0]))
