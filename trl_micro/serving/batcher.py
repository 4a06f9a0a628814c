"""
A dynamic batcher: rows of requests that arrive together are scored together.

Each request hands its rows to [`DynamicBatcher.submit`]. A single worker takes the first waiting request, then keeps
taking requests for up to `max_wait_ms` or until `max_batch_size` rows are gathered, scores them in one call of
`score_rows` (on one worker thread, so the model runs one batch at a time), and hands each request its own slice of
the result. A request larger than `max_batch_size` is scored alone.

What it promises under failure:

- A request whose caller stopped waiting (its client hung up, its deadline passed: the awaiting task was cancelled) is
  dropped when the worker reaches it, before it is scored.
- A failing batch fails no request that did not cause it: the worker scores each of its requests alone, and only the
  requests that fail alone get the error.
- The worker survives anything a scoring call raises, `BaseException` included (a `SystemExit` or
  `KeyboardInterrupt` raised inside `score_rows` reaches the caller as its error); should the worker task end anyway,
  it is started again (`restarts` counts it) and the requests it held get an error instead of waiting forever.
  `running` says whether a worker is alive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class _Waiting:
    rows: list
    future: asyncio.Future = field(repr=False)


class ScoringInterrupted(RuntimeError):
    """A scoring call raised a `BaseException` that is not an `Exception` (`SystemExit`, `KeyboardInterrupt`)."""


class WorkerStopped(RuntimeError):
    """The batcher's worker ended while it held this request (it has been started again: retry the request)."""


class DynamicBatcher:
    """
    Args:
        score_rows: `rows -> list of per-row results` (same length and order), run on `executor`.
        executor: where `score_rows` runs (one thread: the model is not shared between threads).
        max_batch_size (`int`): rows per call of `score_rows` at most (a larger request is scored alone).
        max_wait_ms (`float`): how long the first request of a batch waits for others.
        on_batch: called with the number of rows of every batch scored (metrics).
    """

    def __init__(
        self,
        score_rows: Callable[[list], list],
        executor: Executor,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1, got {max_batch_size}.")
        if max_wait_ms < 0:
            raise ValueError(f"`max_wait_ms` must be >= 0, got {max_wait_ms}.")
        self.score_rows, self.executor = score_rows, executor
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.on_batch = on_batch
        self.restarts = 0
        self._queue: asyncio.Queue[_Waiting] | None = None
        self._worker: asyncio.Task | None = None
        self._stopping = False
        self._held: list[_Waiting] = []  # the requests the worker has taken off the queue and not yet answered
        self._carried: _Waiting | None = None  # the request that did not fit the last batch: it starts the next

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._stopping = False
        self._start_worker()

    @property
    def running(self) -> bool:
        """Whether the worker is alive (the server's `/health`)."""
        return self._worker is not None and not self._worker.done()

    async def stop(self) -> None:
        self._stopping = True
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def submit(self, rows: list) -> list:
        """Score `rows` with whatever else arrives meanwhile; returns their results in order."""
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not called.")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Waiting(list(rows), future))
        return await future

    def _start_worker(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())
        self._worker.add_done_callback(self._worker_ended)

    def _worker_ended(self, worker: asyncio.Task) -> None:
        if self._stopping:
            return
        error = None if worker.cancelled() else worker.exception()
        logger.error("The batcher's worker ended (%r); starting it again.", error or "cancelled")
        self.restarts += 1
        for waiting in self._held + ([self._carried] if self._carried is not None else []):
            if not waiting.future.done():
                waiting.future.set_exception(WorkerStopped("The batcher's worker stopped while holding this request."))
        self._held, self._carried = [], None
        self._start_worker()

    def _take(self, waiting: _Waiting) -> bool:
        """Hold `waiting` for scoring, or drop it if nobody waits for it any more."""
        if waiting.future.done():
            return False
        self._held.append(waiting)
        return True

    async def _gather(self) -> list[_Waiting]:
        loop = asyncio.get_running_loop()
        self._held = []
        first, self._carried = self._carried, None
        while not (first is not None and self._take(first)):
            first = await self._queue.get()
        size = len(first.rows)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    waiting = await asyncio.wait_for(self._queue.get(), timeout=remaining)
                except asyncio.TimeoutError:
                    break
            else:
                waiting = self._queue.get_nowait()
            if waiting.future.done():
                continue  # dropped: nobody waits for it
            if size + len(waiting.rows) > self.max_batch_size:
                self._carried = waiting
                break
            self._take(waiting)
            size += len(waiting.rows)
        return list(self._held)

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            await self._score(batch)
            self._held = []

    async def _score(self, batch: list[_Waiting]) -> None:
        batch = [waiting for waiting in batch if not waiting.future.done()]
        if not batch:
            return
        rows = [row for waiting in batch for row in waiting.rows]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.score_rows, rows)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: B036 (a SystemExit raised by a scoring call must not end the worker)
            if len(batch) > 1:
                logger.warning("A batch of %d requests failed (%r); scoring each alone.", len(batch), error)
                for waiting in batch:
                    await self._score([waiting])
                return
            logger.error("Scoring a request of %d rows failed: %r", len(rows), error, exc_info=error)
            if not isinstance(error, Exception):  # raised in an awaiting task, a SystemExit would stop the event loop
                error = ScoringInterrupted(f"The scoring call raised {error!r}.")
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        if self.on_batch is not None:
            self.on_batch(len(rows))
        start = 0
        for waiting in batch:
            if not waiting.future.done():
                waiting.future.set_result(results[start : start + len(waiting.rows)])
            start += len(waiting.rows)
