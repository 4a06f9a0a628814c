"""
The model's one thread, with two priorities: scoring first, feedback's scoring when no scoring waits.

The model runs one call at a time on one thread. Scoring requests (`/score`, `/get_reward`: their encoding and their
batches) are what RL engines wait on; feedback only has to be scored before it is recorded. [`ModelWorker`] is a
`concurrent.futures.Executor` whose `submit` queues at the scoring priority and whose `submit_background` queues behind
every waiting scoring call, so a `/score` waits at most for the one feedback call already running, however many
feedback requests are queued. Calls of one priority run in the order they came.
"""

from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Executor, Future

SCORING, BACKGROUND = 0, 1


class ModelWorker(Executor):
    """One worker thread taking calls by priority (see the module docstring); a drop-in single-thread executor."""

    def __init__(self, thread_name: str = "trl-micro-model"):
        self._calls: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._shutdown = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self._submit(SCORING, fn, args, kwargs)

    def submit_background(self, fn, /, *args, **kwargs) -> Future:
        """Queue `fn(*args, **kwargs)` behind every scoring call that is waiting or comes before it starts."""
        return self._submit(BACKGROUND, fn, args, kwargs)

    def _submit(self, priority: int, fn, args, kwargs) -> Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            future: Future = Future()
            self._calls.put((priority, next(self._order), future, fn, args, kwargs))
            return future

    def _run(self) -> None:
        while True:
            _, _, future, fn, args, kwargs = self._calls.get()
            if future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as error:  # the worker outlives any call; the caller gets the error
                future.set_exception(error)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while not self._calls.empty():
                    call = self._calls.get_nowait()
                    if call[2] is not None:
                        call[2].cancel()
            self._calls.put((BACKGROUND + 1, next(self._order), None, None, (), {}))
        if wait:
            self._thread.join()
