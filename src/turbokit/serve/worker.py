"""The single model worker: one thread owns the pipeline, so the event loop never waits on inference.

Requests wait in a bounded queue (full: `QueueFullError`, answered 429). When the model is free
the worker takes the oldest request and every queued request with identical settings (a `BatchKey`:
steps, size, guidance, sampler, strength, negative prompt, source image) up to `max_batch` images,
and runs them as one pipeline call: one prompt and one seed per image. A request whose client
gives up — time-out, disconnect, a newer live frame — leaves the queue at once; a batch that is
already running finishes and its images for that client are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from turbokit.errors import InvalidRequestError, TurbokitError
from turbokit.metadata import GenerationParameters
from turbokit.pipeline import MAX_SEED

log = logging.getLogger("turbokit")


class QueueFullError(TurbokitError):
    """The queue holds `max_queue` requests; `retry_after` is an estimate of when to try again, in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GenerationTimeoutError(TurbokitError):
    """The request did not finish within the server's time limit."""


class ClientGoneError(TurbokitError):
    """The client disconnected before its images were ready."""


@dataclass(frozen=True)
class BatchKey:
    """Every setting but the prompt and the seeds: requests with equal keys can share one pipeline call."""

    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    sampler: str | None
    strength: float | None = None
    """Image-to-image only: the denoising strength."""
    image_digest: str | None = None
    """Image-to-image only: the pipeline takes one source image per call, so only equal images batch."""


@dataclass(frozen=True, eq=False)
class Job:
    """One request's images: `len(seeds)` images of `prompt`, image i with seed i."""

    key: BatchKey
    prompt: str
    seeds: tuple[int, ...]
    image: Image.Image | None = None
    future: Future[JobResult] = field(default_factory=Future)


@dataclass(frozen=True)
class JobResult:
    images: list[Image.Image]
    parameters: list[GenerationParameters]
    batch_images: int
    """How many images the pipeline call that made these had (more than len(images) when batched)."""


def new_job(key: BatchKey, prompt: str, n: int, seed: int | None, image: Image.Image | None = None) -> Job:
    """A job of `n` images with seeds seed, seed+1, ... (a random base seed when None), as the CLI numbers them."""
    base = random.randrange(2**32) if seed is None else seed
    if base + n - 1 > MAX_SEED:
        raise InvalidRequestError(f"seed + n - 1 must be at most {MAX_SEED}: image i gets seed + i")
    return Job(key, prompt, tuple(range(base, base + n)), image)


class ModelWorker:
    """Runs queued jobs on `pipe` in one background thread; `generate` is the asyncio-side entry point."""

    def __init__(self, pipe: Any, *, max_queue: int, max_batch: int) -> None:
        self.pipe = pipe
        self.max_queue, self.max_batch = max_queue, max_batch
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seconds_per_call = 1.0  # running mean of one pipeline call, for Retry-After

    @property
    def queued(self) -> int:
        """Jobs waiting for the model (not counting the batch it is running)."""
        with self._cond:
            return len(self._pending)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="turbokit-model", daemon=True)
        self._thread.start()

    def stop(self, wait: float = 10.0) -> None:
        """Cancel the queued jobs and end the thread once its running batch (if any) finishes."""
        with self._cond:
            self._stopping = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in pending:
            job.future.cancel()
        if self._thread is not None:
            self._thread.join(wait)

    def submit(self, job: Job) -> None:
        """Queue `job`; cancelling its future removes it from the queue. Raises QueueFullError."""
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down", retry_after=5)
            if len(self._pending) >= self.max_queue:
                calls_ahead = len(self._pending) / self.max_batch + 1
                retry_after = max(1, math.ceil(calls_ahead * self._seconds_per_call))
                raise QueueFullError(
                    f"the server is busy: {len(self._pending)} requests are waiting (the limit); "
                    f"retry in about {retry_after} s",
                    retry_after,
                )
            job.future.add_done_callback(lambda future: self._forget(job) if future.cancelled() else None)
            self._pending.append(job)
            self._cond.notify()

    async def generate(
        self, job: Job, *, timeout: float, until_disconnected: Callable[[], Awaitable[Any]] | None = None
    ) -> JobResult:
        """Queue `job` and wait for its images, at most `timeout` seconds and only until the awaitable
        `until_disconnected()` (when given) completes. Giving up, or being cancelled, drops the job if still queued."""
        self.submit(job)
        result = asyncio.wrap_future(job.future)
        watcher = None if until_disconnected is None else asyncio.ensure_future(until_disconnected())
        try:
            done, _ = await asyncio.wait(
                [result] if watcher is None else [result, watcher],
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if watcher is not None:
                watcher.cancel()
            if not result.done():
                job.future.cancel()  # leaves the queue now, unless the worker has started it
                result.cancel()
        if result in done:
            return result.result()
        if watcher is not None and watcher in done:
            raise ClientGoneError("the client disconnected")
        raise GenerationTimeoutError(
            f"the images were not ready within {timeout:g} s (the server's --timeout); "
            "ask for fewer images or steps, a smaller size, or retry when the server is less busy"
        )

    # ------------------------------------------------------------------ the model thread

    def _forget(self, job: Job) -> None:
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the queued jobs with the same key, up to max_batch images; None when stopping."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending.popleft()
            batch, images = [first], len(first.seeds)
            for job in list(self._pending):
                if job.key == first.key and images + len(job.seeds) <= self.max_batch:
                    self._pending.remove(job)
                    batch.append(job)
                    images += len(job.seeds)
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        key = batch[0].key
        img2img = {} if key.strength is None else {"image": batch[0].image, "strength": key.strength}
        start = time.perf_counter()
        try:
            result = self.pipe(
                [job.prompt for job in batch for _ in job.seeds],
                negative_prompt=key.negative_prompt or None,
                steps=key.steps,
                guidance_scale=key.guidance_scale,
                width=key.width,
                height=key.height,
                num_images=1,
                seed=[seed for job in batch for seed in job.seeds],
                sampler=key.sampler,
                **img2img,
            )
            images = result.images
        except Exception as err:
            if not isinstance(err, TurbokitError):
                log.exception("generation failed")
            for job in batch:
                job.future.set_exception(err)
            return
        self._seconds_per_call = 0.8 * self._seconds_per_call + 0.2 * (time.perf_counter() - start)
        first = 0
        for job in batch:
            last = first + len(job.seeds)
            job.future.set_result(JobResult(images[first:last], result.parameters[first:last], len(images)))
            first = last
