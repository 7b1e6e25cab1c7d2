"""Counting the scheduler's preemptions in an in-process engine (scheduler_probe.py, test_eviction.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def counting_preemptions(scheduler) -> Iterator[list[str]]:
    """While inside, the ids of the requests ``scheduler`` preempts (a wrapper on ``Scheduler._preempt_request``)."""
    preempted: list[str] = []
    original = scheduler._preempt_request

    def counting(request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(request, *args, **kwargs)

    scheduler._preempt_request = counting
    try:
        yield preempted
    finally:
        del scheduler._preempt_request
