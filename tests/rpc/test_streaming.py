"""`stream_steps`: every step's message reaches the stream, in order, released when the loop's next model call
waits (as `TritonRunner` / `LocalRunner` do, through `run_pending`), the last one when the loop ends."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kinema.inference.runner import before_next_wait, run_pending
from kinema.rpc.streaming import stream_steps


def collect(loop_fn, steps_seen: list[threading.Event] | None = None) -> list:
    """Every message `stream_steps` yields for `loop_fn`; `steps_seen[i]` is set once step i's message arrived."""

    async def main() -> list:
        pool = ThreadPoolExecutor(1)
        out = []

        def run_blocking(fn):
            return asyncio.get_running_loop().run_in_executor(pool, fn)

        try:
            async for message in stream_steps(run_blocking, loop_fn, lambda i, n, x: ("step", i, n),
                                              lambda result: ("done", result)):  # fmt: skip
                out.append(message)
                if steps_seen is not None and message[0] == "step":
                    steps_seen[message[1]].set()
        finally:
            pool.shutdown()
        return out

    return asyncio.run(main())


def test_a_steps_message_travels_while_the_next_call_waits() -> None:
    steps = 4
    seen = [threading.Event() for _ in range(steps)]
    waited_for = []

    def loop_fn(callback):
        for i in range(steps):
            if i:  # step i's network call: a runner releases pending work, then waits
                run_pending()
                waited_for.append(seen[i - 1].wait(timeout=10))  # held back until the end, this would time out
            callback(i, steps, None)
        return "latents"

    out = collect(loop_fn, seen)
    assert out == [("step", i, steps) for i in range(steps)] + [("done", "latents")]
    assert waited_for == [True] * (steps - 1)


def test_messages_without_a_following_call_arrive_when_the_loop_ends() -> None:
    def loop_fn(callback):
        for i in range(3):
            callback(i, 3, None)
        return 7

    assert collect(loop_fn) == [("step", 0, 3), ("step", 1, 3), ("step", 2, 3), ("done", 7)]


def test_a_failed_loop_still_delivers_its_steps_then_its_error() -> None:
    def loop_fn(callback):
        callback(0, 2, None)
        raise ValueError("network failed")

    got = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async for message in stream_steps(lambda fn: loop.run_in_executor(None, fn), loop_fn,
                                          lambda i, n, x: ("step", i, n), lambda r: ("done", r)):  # fmt: skip
            got.append(message)

    with pytest.raises(ValueError, match="network failed"):
        asyncio.run(main())
    assert got == [("step", 0, 2)]


def test_pending_work_runs_once_in_order_on_its_own_thread() -> None:
    ran = []
    before_next_wait(lambda: ran.append(1))
    before_next_wait(lambda: ran.append(2))
    other = threading.Thread(target=run_pending)  # another thread's pending list is its own
    other.start()
    other.join()
    assert ran == []
    run_pending()
    run_pending()
    assert ran == [1, 2]
