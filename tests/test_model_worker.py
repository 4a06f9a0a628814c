"""The server's model thread: scoring calls run before queued feedback scoring; errors reach the caller, not the worker."""

import threading

import pytest

from trl_micro.serving.model_worker import ModelWorker


def test_scoring_overtakes_queued_background_calls_and_the_worker_survives_errors():
    worker = ModelWorker()
    gate, order = threading.Event(), []
    first = worker.submit_background(gate.wait)  # occupies the thread
    background = [worker.submit_background(order.append, f"feedback-{i}") for i in range(3)]
    scoring = [worker.submit(order.append, f"score-{i}") for i in range(2)]
    gate.set()
    for future in [first, *background, *scoring]:
        future.result(timeout=10)
    assert order == ["score-0", "score-1", "feedback-0", "feedback-1", "feedback-2"]

    def fail():
        raise KeyboardInterrupt  # a BaseException: goes to its caller, the worker keeps serving

    with pytest.raises(KeyboardInterrupt):
        worker.submit(fail).result(timeout=10)
    assert worker.submit(sum, [1, 2]).result(timeout=10) == 3
    worker.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        worker.submit(sum, [1])
