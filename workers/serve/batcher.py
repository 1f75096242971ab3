"""Query texts that arrive together are encoded in one model call.

One encode runs at a time, in a worker thread; the texts that queue up meanwhile (up to
``max_batch``, waiting at most ``wait_s`` for company once one is queued) go into the next
call. On a CPU a batch of 16 short queries costs little more than one, so under load this is
the difference between encoding 16 queries and encoding 1.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

__all__ = ["EncodeBatcher"]

Encode = Callable[[list[str]], npt.NDArray[np.float32]]


class EncodeBatcher:
    """``await batcher.encode(text)`` -> that text's vector, encoded with its neighbours."""

    def __init__(self, encode: Encode, *, max_batch: int = 32, wait_s: float = 0.002,
                 observe: Callable[[int], None] | None = None) -> None:
        self._encode = encode
        self._max = max_batch
        self._wait = wait_s
        self._observe = observe
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[npt.NDArray[np.float32]]]] = (
            asyncio.Queue())
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the batching task on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="encode-batcher")

    async def stop(self) -> None:
        """Stop the task; requests still queued are failed, not left waiting."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("the service is shutting down"))

    async def encode(self, text: str) -> npt.NDArray[np.float32]:
        """The vector of ``text``."""
        fut: asyncio.Future[npt.NDArray[np.float32]] = asyncio.get_running_loop().create_future()
        await self._queue.put((text, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._wait
            while len(batch) < self._max:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            live = [(t, f) for t, f in batch if not f.done()]  # a timed-out request left
            if not live:
                continue
            if self._observe is not None:
                self._observe(len(live))
            try:
                vectors = await asyncio.to_thread(self._encode, [t for t, _ in live])
            except Exception as exc:
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), vec in zip(live, vectors, strict=True):
                if not fut.done():
                    fut.set_result(np.asarray(vec, dtype=np.float32))
