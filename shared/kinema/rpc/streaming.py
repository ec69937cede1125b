"""A blocking step loop (a sampler) run from an async servicer, its progress streamed as steps finish.

What every sampling service shares: the loop runs on the model family's thread pool and reports each finished
step through a callback; the servicer yields one message per step and a final one from the loop's result. When
the client cancels or the deadline passes (the servicer's generator is closed), the callback raises `Stopped` at
the loop's next step, so no network call outlives the request by more than one step.

A step's message is handed to the event loop just before the loop's next network call waits
(`kinema.inference.runner.before_next_wait`), the last one when the loop ends. Handed over between two steps, the
event loop it woke competed with the loop's thread for the interpreter while the next request was being built
(docs/serving.md, "Where a served step's time goes").
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from kinema.inference.runner import before_next_wait, run_pending

M = TypeVar("M")  # a response message
R = TypeVar("R")  # what the loop returns

StepCallback = Callable[[int, int, Any], None]  # (i, n, x) once per finished step, i = 0..n-1


class Stopped(Exception):
    """Raised inside the loop's thread at its next step once the client went away."""


async def stream_steps(
    run_blocking: Callable[[Callable[[], R]], Awaitable[R]],
    loop_fn: Callable[[StepCallback], R],
    progress: Callable[[int, int, Any], M],
    finish: Callable[[R], M],
) -> AsyncIterator[M]:
    """Run `loop_fn(callback)` through `run_blocking` (e.g. `ModelFamily.run_blocking`); yield `progress(i, n, x)`
    for every finished step, then `finish(result)`. The loop's errors end the stream as they are."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    end = object()

    def callback(i: int, n: int, x: Any) -> None:
        if stop.is_set():
            raise Stopped
        message = progress(i, n, x)
        before_next_wait(lambda: loop.call_soon_threadsafe(events.put_nowait, message))

    def run() -> R:
        try:
            return loop_fn(callback)
        finally:
            run_pending()  # the last step's message: no call follows it
            loop.call_soon_threadsafe(events.put_nowait, end)

    task = asyncio.ensure_future(run_blocking(run))
    try:
        while (event := await events.get()) is not end:
            yield event
        yield finish(await task)
    finally:
        stop.set()  # client cancel or error: the loop stops at its next step
        # The loop then ends in Stopped, which nobody awaits: retrieve it so that it is not logged as an error.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
