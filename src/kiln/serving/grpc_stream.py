"""Triton's bidirectional ``ModelStreamInfer``: the stream's mechanics, apart from what each request does.

Each request is answered as soon as it completes (completion order, not arrival order), concurrently with
the others. Memory stays bounded whatever the client does: at most :data:`MAX_IN_FLIGHT` requests of a
stream are unanswered at once, and while that many are, the stream is not read; an answer is written only
as the client's HTTP/2 flow-control window allows, and its slot is freed once it is written, so a client
that stops reading stops the server reading it. The client half-closing ends the stream once every
request read is answered; cancelling it (or its deadline passing) cancels the requests in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any

from prometheus_client import Gauge

MAX_IN_FLIGHT = 64  # requests of one stream read and not yet answered


async def answer_stream(
    requests: AsyncIterable[Any],
    context: Any,
    answer: Callable[[Any], Awaitable[Any]],
    in_flight: Gauge,
    limit: int = MAX_IN_FLIGHT,
) -> None:
    """Write ``await answer(request)`` (a ``ModelStreamInferResponse``, which carries any error itself) for
    each request of the stream; ``in_flight`` counts each request from its read until its answer is written.
    Returns when the client has half-closed and every answer is written."""
    slots = asyncio.Semaphore(limit)
    writing = asyncio.Lock()  # grpc.aio allows one write at a time; the lock's queue keeps completion order

    async def one(request: Any) -> None:
        in_flight.inc()
        try:
            response = await answer(request)
            async with writing:
                await context.write(response)  # waits for the client's flow-control window
        finally:
            in_flight.dec()
            slots.release()

    # A cancelled handler (client cancel, deadline) cancels the group: every request in flight is cancelled,
    # and one still queued in a batcher is dropped before it runs.
    async with asyncio.TaskGroup() as group:
        await slots.acquire()
        async for request in requests:
            group.create_task(one(request))
            await slots.acquire()  # a slot for the next request before reading it
