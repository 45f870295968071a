"""Dynamic mixed-task batching: requests of any tasks queue up and are answered together in one forward.

One loop takes the first waiting request, keeps collecting until the batch holds `max_batch` rows or
`max_wait_ms` has passed since that first request, and runs `answer` on the whole batch in a single
worker thread: the model is shared, so forwards run one at a time, while the event loop keeps
reading and queueing the next requests. `answer` gives each request its answers or the exception
that request alone fails with (the others of its batch are answered). A request is never split
across batches (it may exceed `max_batch` alone); one that would overflow the batch being collected
opens the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from continual_rpt.serving.metrics import ServingMetrics


@dataclass
class Pending:
    """One parsed request waiting for its answers."""

    parsed: object
    rows: int
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Merges queued requests into batches and answers each with `answer(list of parsed) -> list of answers or exceptions`."""

    def __init__(self, answer: Callable[[list], list], max_batch: int, max_wait_ms: float, metrics: ServingMetrics):
        self.answer = answer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.metrics = metrics
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crpt-forward")

    async def submit(self, parsed: object, rows: int) -> list:
        """Queue a parsed request and wait for its answers (a cancelled wait leaves the rest of its batch alone)."""
        pending = Pending(parsed, rows, asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        return await pending.future

    async def run(self) -> None:
        """Collect and answer batches until cancelled."""
        carried: Pending | None = None
        while True:
            first = carried or await self.queue.get()
            batch, carried = await self.collect(first)
            await self.answer_batch(batch)

    async def collect(self, first: Pending) -> tuple[list[Pending], Pending | None]:
        """The batch opened by `first`, and the request that did not fit in it (None if none)."""
        # The wait counts from the first request's arrival: a request queued behind a long forward waits no longer.
        batch, rows, deadline = [first], first.rows, first.queued + self.max_wait
        while rows < self.max_batch:
            if self.queue.empty():
                try:
                    item = await asyncio.wait_for(self.queue.get(), deadline - time.perf_counter())
                except asyncio.TimeoutError:
                    break
            else:  # what is queued already joins even when the wait is over (max_wait_ms 0 still batches a backlog)
                item = self.queue.get_nowait()
            if rows + item.rows > self.max_batch:
                return batch, item
            batch.append(item)
            rows += item.rows
        return batch, None

    async def answer_batch(self, batch: list[Pending]) -> None:
        """Answer the requests of `batch` still waiting, together; each gets its own answers (or its error, or the batch's)."""
        live = [p for p in batch if not p.future.done()]  # a client that went away no longer costs a forward
        if not live:
            return
        started = time.perf_counter()
        for pending in live:
            self.metrics.queue_wait.observe(started - pending.queued)
        self.metrics.batch(sum(p.rows for p in live), len(live))
        try:
            answers = await asyncio.get_running_loop().run_in_executor(self.model_thread, self.answer, [p.parsed for p in live])
        except Exception as err:  # a bug in the forward: every request of the batch gets it (and answers 500), the loop goes on
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(err)
            return
        for pending, answer in zip(live, answers):
            if pending.future.done():  # cancelled meanwhile: its client disconnected, the result is dropped
                continue
            if isinstance(answer, Exception):  # this request's own failure (an entry it needs scores NaN)
                pending.future.set_exception(answer)
            else:
                pending.future.set_result(answer)

    def close(self) -> None:
        """Stop the model thread (after the batch it is running, if any)."""
        self.model_thread.shutdown(wait=True, cancel_futures=True)
