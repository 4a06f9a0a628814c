"""
A dynamic batcher: rows of requests that arrive together are scored together.

Each request hands its rows to [`DynamicBatcher.submit`]. A single worker takes the first waiting request, then keeps
taking requests for up to `max_wait_ms` or until `max_batch_size` rows are gathered, scores them in one call of
`score_rows` (on one worker thread, so the model runs one batch at a time), and hands each request its own slice of
the result. A request larger than `max_batch_size` is scored alone. An error in a batch goes to every request of it.
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
        self._queue: asyncio.Queue[_Waiting] | None = None
        self._worker: asyncio.Task | None = None
        self._carried: _Waiting | None = None  # the request that did not fit the last batch: it starts the next

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
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

    async def _gather(self) -> list[_Waiting]:
        first, self._carried = self._carried, None
        batch = [first if first is not None else await self._queue.get()]
        size = len(batch[0].rows)
        loop = asyncio.get_running_loop()
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
            if size + len(waiting.rows) > self.max_batch_size:
                self._carried = waiting
                break
            batch.append(waiting)
            size += len(waiting.rows)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            rows = [row for waiting in batch for row in waiting.rows]
            try:
                results = await loop.run_in_executor(self.executor, self.score_rows, rows)
            except Exception as error:  # every request of the batch gets it; the worker goes on
                logger.exception("Scoring a batch of %d rows failed", len(rows))
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)
                continue
            if self.on_batch is not None:
                self.on_batch(len(rows))
            start = 0
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_result(results[start : start + len(waiting.rows)])
                start += len(waiting.rows)
