"""Request batching for the service: concurrent requests become one model call on one worker thread.

One collector takes the first waiting request, waits ``window_s`` for company, and hands up to
``max_batch`` requests to the worker as one call. While the worker is busy, new requests queue
up and form the next batch, so under load batches grow by themselves and the event loop never
blocks on the model. A batch that fails is answered one request at a time, so a bad request
fails alone.
"""

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """The request queue is full."""


class BatchStats:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests = 0
        self.batches = 0
        self.max_batch = 0
        self.failed_batches = 0
        self.busy_s = 0.0
        self.sizes: dict[int, int] = {}

    def add(self, size: int, seconds: float, ok: bool) -> None:
        self.batches += 1
        self.requests += size
        self.max_batch = max(self.max_batch, size)
        self.busy_s += seconds
        self.sizes[size] = self.sizes.get(size, 0) + 1
        self.failed_batches += not ok

    def to_dict(self, queued: int) -> dict[str, Any]:
        return {"requests": self.requests, "batches": self.batches, "max_batch_size": self.max_batch,
                "mean_batch_size": round(self.requests / self.batches, 3) if self.batches else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                "failed_batches": self.failed_batches, "model_busy_s": round(self.busy_s, 3),
                "queued": queued, "uptime_s": round(time.time() - self.started, 1)}


class Batcher:
    """Collects concurrent requests into batches for one worker thread running ``work``."""

    def __init__(self, work, max_batch: int, window_s: float, max_queue: int):
        self.work = work  # list[query] -> list[result], run on the worker thread
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queue = max_queue
        self.stats = BatchStats()
        self.queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigrec-model")

    async def start(self) -> None:
        self.queue = asyncio.Queue(self.max_queue)
        self._task = asyncio.create_task(self._collect(), name="bigrec-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self.queue is not None and not self.queue.empty():
            _, future = self.queue.get_nowait()
            if not future.done():
                future.set_exception(Busy("the server is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, query):
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((query, future))
        except asyncio.QueueFull:
            raise Busy(f"{self.max_queue} requests are already waiting; try again shortly") from None
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            if self.window_s > 0 and self.queue.qsize() < self.max_batch - 1:
                await asyncio.sleep(self.window_s)
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            batch = [(q, f) for q, f in batch if not f.done()]  # drop requests whose client went away
            if not batch:
                continue
            await self._run(loop, batch)

    async def _run(self, loop, batch: list) -> None:
        """One call for the batch; if it fails, each request again on its own, so that a request
        the checks before batching let through fails alone, never its neighbours."""
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self.work, [q for q, _ in batch])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request(s)
            self.stats.add(len(batch), time.perf_counter() - start, ok=False)
            if len(batch) > 1:
                log.warning("batch of %d failed (%s); answering its requests one by one", len(batch), exc)
                for one in batch:
                    await self._run(loop, [one])
                return
            log.exception("request failed")
            if not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return
        self.stats.add(len(batch), time.perf_counter() - start, ok=True)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
