"""Continuous batching of sampling loops that run side by side in one process.

Each loop (one thread per request) calls the velocity network once per step. `Gang` holds a call until every
loop that has joined is waiting for its own, then runs them as one forward pass per shape and hands each loop its
rows: requests batch at every step however their starts fall, with no queue delay to tune. A loop that joins
while a batch runs takes part from its next call; one that leaves (done, failed or stopped) stops being waited for.

Triton's loop model (`kinema.inference.triton_sampler`) runs its requests' loops this way, in place of the
dynamic batching the per-step `denoiser` model gets from Triton.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

Velocity = Callable[..., Tensor]  # (x (B, ...), t (B,), context (B, L, D), pooled (B, P), context_mask (B, L))


class _Call:
    __slots__ = ("args", "done", "error", "out")

    def __init__(self, args: tuple[Tensor, ...]) -> None:
        self.args, self.out, self.error, self.done = args, None, None, False

    def key(self) -> tuple:
        return tuple(a.shape[1:] for a in self.args) + tuple(a.dtype for a in self.args)


class Gang:
    """A velocity network shared by the loops of one process: calls made inside `member()` are batched with the
    other members' calls (rows concatenated where every argument's per-row shape agrees, up to `max_rows` rows a
    pass); a call made outside it runs at once, alone."""

    def __init__(self, network: Velocity, max_rows: int = 64) -> None:
        self.network, self.max_rows = network, max_rows
        self._cv = threading.Condition()
        self._members = 0
        self._waiting: list[_Call] = []
        self.passes = 0  # forward passes run (the tests read it)

    @contextlib.contextmanager
    def member(self) -> Iterator[None]:
        with self._cv:
            self._members += 1
        try:
            yield
        finally:
            with self._cv:
                self._members -= 1
                self._run_if_all_waiting()

    def __call__(self, *args: Tensor) -> Tensor:
        call = _Call(args)
        with self._cv:
            self._waiting.append(call)
            self._run_if_all_waiting()
            while not call.done:
                self._cv.wait()
        if call.error is not None:
            raise call.error
        return call.out

    def _run_if_all_waiting(self) -> None:
        """With the lock held: run the waiting calls once no member is still computing its own next call."""
        if not self._waiting or len(self._waiting) < self._members:
            return
        calls, self._waiting = self._waiting, []
        groups: dict[tuple, list[_Call]] = {}
        for call in calls:
            groups.setdefault(call.key(), []).append(call)
        try:
            for group in groups.values():
                while group:
                    chunk, rows = [], 0
                    while group and (not chunk or rows + group[0].args[0].shape[0] <= self.max_rows):
                        rows += group[0].args[0].shape[0]
                        chunk.append(group.pop(0))
                    self._run(chunk)
        finally:
            self._cv.notify_all()

    def _run(self, chunk: list[_Call]) -> None:
        self.passes += 1
        try:
            with torch.inference_mode():
                if len(chunk) == 1:  # alone: exactly the call the loop made
                    outs = [self.network(*chunk[0].args)]
                else:
                    batched = [torch.cat(parts) for parts in zip(*(c.args for c in chunk), strict=True)]
                    outs = self.network(*batched).split([c.args[0].shape[0] for c in chunk])
        except Exception as e:
            if len(chunk) > 1:  # one loop's rows may be at fault: each alone, so only that loop fails
                for call in chunk:
                    self._run([call])
                return
            chunk[0].error, chunk[0].done = e, True
            return
        for call, out in zip(chunk, outs, strict=True):
            call.out, call.done = out, True
