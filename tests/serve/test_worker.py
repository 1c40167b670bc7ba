"""The model worker: batching of identical settings, the bounded queue, time-outs and cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from serve_helpers import SpyPipeline, wait_until

from turbokit.errors import InvalidRequestError
from turbokit.serve.worker import (
    BatchKey,
    ClientGoneError,
    GenerationTimeoutError,
    ModelWorker,
    QueueFullError,
    new_job,
)

T = TypeVar("T")
KEY = BatchKey(negative_prompt="", steps=1, guidance_scale=0.0, width=64, height=64, sampler=None)
OTHER_KEY = BatchKey(negative_prompt="", steps=2, guidance_scale=0.0, width=64, height=64, sampler=None)


def run_with_worker(spy: SpyPipeline, scenario: Callable[[ModelWorker], Awaitable[T]], **options: Any) -> T:
    worker = ModelWorker(spy, max_queue=options.get("max_queue", 8), max_batch=options.get("max_batch", 4))
    worker.start()
    try:
        return asyncio.run(scenario(worker))
    finally:
        spy.gate.set()
        worker.stop()


async def hold_first_call(spy: SpyPipeline, worker: ModelWorker) -> asyncio.Task:
    """Start a job that holds the model (the gate is closed) and wait until it runs."""
    spy.gate.clear()
    task = asyncio.create_task(worker.generate(new_job(KEY, "first", 1, 0), timeout=30))
    while not spy.entered.is_set():
        await asyncio.sleep(0.005)
    return task


def test_new_job_numbers_seeds_like_the_cli() -> None:
    assert new_job(KEY, "a", 3, 5).seeds == (5, 6, 7)
    assert len(new_job(KEY, "a", 2, None).seeds) == 2
    with pytest.raises(InvalidRequestError, match="seed"):
        new_job(KEY, "a", 2, 2**63 - 1)


def test_queued_requests_with_identical_settings_run_as_one_call(spy: SpyPipeline) -> None:
    async def scenario(worker: ModelWorker) -> list[Any]:
        first = await hold_first_call(spy, worker)
        jobs = [new_job(KEY, "b", 2, 10), new_job(OTHER_KEY, "other", 1, 0), new_job(KEY, "c", 1, 20)]
        tasks = [asyncio.create_task(worker.generate(job, timeout=30)) for job in jobs]
        while worker.queued < 3:
            await asyncio.sleep(0.005)
        spy.gate.set()
        return await asyncio.gather(first, *tasks)

    _, b, other, c = run_with_worker(spy, scenario)
    # The oldest waiting request and the later one with its settings share a call; "other" runs alone.
    assert spy.prompts == [["first"], ["b", "b", "c"], ["other"]]
    assert spy.calls[1][1]["seed"] == [10, 11, 20]
    assert [p.seed for p in b.parameters] == [10, 11] and [p.seed for p in c.parameters] == [20]
    assert (len(b.images), len(c.images), b.batch_images, other.batch_images) == (2, 1, 3, 1)
    assert {p.prompt for p in b.parameters} == {"b"} and other.parameters[0].steps == 2


def test_a_batch_holds_at_most_max_batch_images(spy: SpyPipeline) -> None:
    async def scenario(worker: ModelWorker) -> None:
        first = await hold_first_call(spy, worker)
        tasks = [asyncio.create_task(worker.generate(new_job(KEY, p, 2, 0), timeout=30)) for p in "bcd"]
        while worker.queued < 3:
            await asyncio.sleep(0.005)
        spy.gate.set()
        await asyncio.gather(first, *tasks)

    run_with_worker(spy, scenario, max_batch=4)
    assert spy.prompts == [["first"], ["b", "b", "c", "c"], ["d", "d"]]


def test_a_full_queue_refuses_with_a_retry_estimate(spy: SpyPipeline) -> None:
    async def scenario(worker: ModelWorker) -> QueueFullError:
        first = await hold_first_call(spy, worker)
        queued = asyncio.create_task(worker.generate(new_job(KEY, "b", 1, 0), timeout=30))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError) as refused:
            await worker.generate(new_job(KEY, "c", 1, 0), timeout=30)
        spy.gate.set()
        await asyncio.gather(first, queued)
        return refused.value

    refused = run_with_worker(spy, scenario, max_queue=1)
    assert refused.retry_after >= 1 and "busy" in str(refused)
    assert spy.prompts == [["first"], ["b"]]


def test_time_out_drops_the_queued_job(spy: SpyPipeline) -> None:
    async def scenario(worker: ModelWorker) -> None:
        first = await hold_first_call(spy, worker)
        with pytest.raises(GenerationTimeoutError, match=r"within 0\.05 s"):
            await worker.generate(new_job(KEY, "late", 1, 0), timeout=0.05)
        assert worker.queued == 0
        spy.gate.set()
        await first

    run_with_worker(spy, scenario)
    assert spy.prompts == [["first"]]


def test_a_disconnected_or_cancelled_client_leaves_the_queue(spy: SpyPipeline) -> None:
    async def scenario(worker: ModelWorker) -> None:
        first = await hold_first_call(spy, worker)
        gone = asyncio.Event()
        waiting = asyncio.create_task(
            worker.generate(new_job(KEY, "gone", 1, 0), timeout=30, until_disconnected=gone.wait)
        )
        cancelled = asyncio.create_task(worker.generate(new_job(KEY, "cancelled", 1, 0), timeout=30))
        while worker.queued < 2:
            await asyncio.sleep(0.005)
        gone.set()
        cancelled.cancel()
        with pytest.raises(ClientGoneError):
            await waiting
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert worker.queued == 0
        spy.gate.set()
        await first
        # The worker goes on serving others.
        await worker.generate(new_job(KEY, "next", 1, 0), timeout=30)

    run_with_worker(spy, scenario)
    assert spy.prompts == [["first"], ["next"]]


def test_a_pipeline_error_reaches_every_request_of_its_batch(spy: SpyPipeline) -> None:
    too_small = BatchKey(negative_prompt="", steps=1, guidance_scale=0.0, width=8, height=64, sampler=None)

    async def scenario(worker: ModelWorker) -> list[Any]:
        first = await hold_first_call(spy, worker)
        tasks = [asyncio.create_task(worker.generate(new_job(too_small, p, 1, 0), timeout=30)) for p in "ab"]
        while worker.queued < 2:
            await asyncio.sleep(0.005)
        spy.gate.set()
        await first
        return await asyncio.gather(*tasks, return_exceptions=True)

    errors = run_with_worker(spy, scenario)
    assert all(isinstance(err, InvalidRequestError) and "width must be a multiple" in str(err) for err in errors)


def test_stop_cancels_what_is_queued(spy: SpyPipeline) -> None:
    worker = ModelWorker(spy, max_queue=4, max_batch=1)
    spy.gate.clear()
    worker.start()
    running, queued = new_job(KEY, "running", 1, 0), new_job(KEY, "queued", 1, 0)
    worker.submit(running)
    wait_until(spy.entered.is_set)
    worker.submit(queued)
    stopping = threading.Thread(target=worker.stop)
    stopping.start()
    wait_until(queued.future.cancelled)
    spy.gate.set()  # the running batch finishes
    stopping.join()
    assert running.future.result().images
