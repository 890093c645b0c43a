"""What HTTP and gRPC share: inference through cache and batcher, health, auth, the model lookups behind
metadata (rendered by ``metadata.py``).

The front ends decode their wire format into an :class:`InferRequest`, call :meth:`Service.infer`, and
encode the outputs; everything between (validation, cache, batching, timeout, metrics) lives here. How a
failure is answered is ``error_map.py``'s.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kiln.errors import ClientClosedError, KilnError, NotFoundError, ProtocolError, UnauthorizedError
from kiln.execution.batcher import Outputs
from kiln.execution.errors import BatcherClosedError, RequestTimeoutError
from kiln.repository import parse_version
from kiln.serving import metadata
from kiln.serving.body_budget import BodyBudget
from kiln.serving.cache import ResponseCache, cache_key
from kiln.serving.manager import ModelManager, ServedVersion
from kiln.serving.metrics import Metrics, outcome_for
from kiln.serving.protocol import InferRequest, check_outputs
from kiln.serving.raw import PREDICTIONS, RAW_INPUT, predictions_tensor
from kiln.serving.settings import ServerSettings
from kiln.serving.shared_memory import SharedMemoryRegistry
from kiln.spec import ModelSpec

_CONTENTION_MEMORY_S = 0.5
_FOLLOW_ATTEMPTS = 4  # how often a request follows its model to a new version, or into a reload, before failing
_WATCH_AFTER_S = 0.02  # a queued request listens for its client's disconnect once it has waited this long
REPOSITORY_ENDPOINTS = "the model-repository endpoints"  # what a token guards, as error messages name it
SHM_ENDPOINTS = "the shared-memory endpoints"


def client_timeout_s(parameters: dict[str, Any]) -> float | None:
    """The request's own timeout (``parameters.timeout``, microseconds, as tritonclient sends it); 0: none."""
    t = parameters.get("timeout")
    if t is None:
        return None
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise ProtocolError("parameters.timeout", f"must be a whole number of microseconds (0: none), got {t!r}")
    return t / 1e6 if t else None


def check_load_parameters(parameters: Any) -> None:
    """kiln loads what the repository holds; Triton's config and file overrides are refused, not ignored."""
    if not isinstance(parameters, dict):
        raise ProtocolError("parameters", "must be an object")
    unsupported = sorted(k for k in parameters if k == "config" or k.startswith("file:"))
    if unsupported:
        raise ProtocolError(
            "parameters",
            f"{unsupported} are not supported: kiln loads the model as the repository holds it; "
            "change model.yaml (or import a new version) and load again",
        )


class Service:
    def __init__(self, settings: ServerSettings, manager: ModelManager, metrics: Metrics) -> None:
        self.settings = settings
        self.manager = manager
        self.metrics = metrics
        self.cache = ResponseCache(settings.cache_max_bytes)
        manager.on_retire.append(lambda sv: self.cache.discard((sv.model, sv.generation)))
        self.live = True
        self.started = False
        self._children: dict[tuple[str, str, str, str], Any] = {}
        self._timers: dict[tuple[str, str, str], Any] = {}
        self.active = 0  # requests inside infer(); all on the event loop's thread
        self._contended_until = 0.0  # requests overlapped recently: use the batcher, not inline runs
        self._pool: ThreadPoolExecutor | None = None
        self.shared_memory = SharedMemoryRegistry(max_bytes=settings.shm_max_bytes or 64 * settings.max_body_bytes)
        self.body_budget = BodyBudget(settings.max_inflight_bytes or 16 * settings.max_body_bytes)
        metrics.inflight_bytes.set_function(lambda: self.body_budget.held)

    @property
    def processing_pool(self) -> ThreadPoolExecutor:
        """Threads for pre- and post-processing, so that decoding never blocks the event loop."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.settings.processing_threads, thread_name_prefix="kiln-processing")
        return self._pool

    def close(self) -> None:
        self.shared_memory.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ---- health and auth ----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.started and not self.manager.draining

    def check_token(self, authorization: str | None, endpoints: str = REPOSITORY_ENDPOINTS) -> None:
        token = self.settings.token
        if token is None:
            return
        given = (authorization or "").removeprefix("Bearer ").removeprefix("bearer ").strip()
        if not given or not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            raise UnauthorizedError(f"{endpoints} need the server's token: send 'Authorization: Bearer <token>'")

    # ---- inference ----------------------------------------------------------------------------------------
    async def resolve(self, model: str, version: str | None) -> ServedVersion:
        v = parse_version(version)
        sv = self.manager.lookup(model, v)
        return sv if sv is not None else await self.manager.get(model, v)

    async def _may_run_inline(self, sv: ServedVersion, rows: int) -> bool:
        """True when this request is alone: no overlap seen of late, and a run short enough to block the loop
        (or one that is awaited: a Ray Serve handle call blocks nothing)."""
        awaited = sv.batcher.lends == "await"
        if not awaited and sv.batcher.row_seconds * rows >= self.settings.inline_below_ms / 1e3:
            return False
        if time.monotonic() < self._contended_until:
            return False
        await asyncio.sleep(0)  # let requests that arrived together start first, so they count in `active`
        return self.active == 1

    async def infer(
        self,
        sv: ServedVersion,
        req: InferRequest,
        deadline_s: float | None = None,
        disconnected: Callable[[], Awaitable[object]] | None = None,
    ) -> Outputs:
        """Validate, look in the cache, queue on the batcher, await the outputs (within the timeout).

        ``deadline_s`` is the time the client gives the request (a gRPC deadline); Triton's ``timeout``
        parameter, when smaller, wins."""
        spec = sv.spec
        mbs = spec.serving.max_batch_size
        sv.check_inputs(req.inputs, max_batch=mbs or None)
        client_s = client_timeout_s(req.parameters) if req.parameters else None
        if deadline_s is not None:
            client_s = deadline_s if client_s is None else min(client_s, deadline_s)
        rows = next(iter(req.inputs.values())).shape[0] if mbs else 1
        key = None
        if sv.cache_enabled:
            key = cache_key(f"{sv.model}#{sv.generation}", sv.version, req.inputs, req.output_names)
            hit = self.cache.get(key)
            self.metrics.cache_lookup(sv.model, sv.version, hit is not None)
            if hit is not None:
                return hit
        self.active += 1
        if self.active > 1:
            self._contended_until = time.monotonic() + _CONTENTION_MEMORY_S
        try:
            outputs = await self._run(sv, req, rows, client_s, disconnected)
        finally:
            self.active -= 1
        if req.outputs is not None:
            outputs = {o.name: outputs[o.name] for o in req.outputs}
        if key is not None:
            self.cache.put(key, outputs, owner=(sv.model, sv.generation))
        return outputs

    async def infer_v2(
        self,
        sv: ServedVersion,
        req: InferRequest,
        deadline_s: float | None = None,
        disconnected: Callable[[], Awaitable[object]] | None = None,
    ) -> Outputs:
        """A decoded V2 request: the ``raw`` input goes through processing, tensors straight to :meth:`infer`."""
        if RAW_INPUT not in req.inputs or not sv.processing.takes_raw:
            if sv.processing.takes_raw and req.output_names:
                check_outputs(sv.spec, req.output_names)  # 'predictions' needs the raw input
            return await self.infer(sv, req, deadline_s, disconnected)
        if len(req.inputs) != 1:
            others = sorted(n for n in req.inputs if n != RAW_INPUT)
            raise ProtocolError(
                "inputs", f"the {RAW_INPUT!r} input goes alone (pre-processing makes the tensors); drop {others}"
            )
        instances = sv.processing.instances_from_tensor(req.inputs[RAW_INPUT])
        predictions, outputs = await self.predict(sv, instances, req.id, req.parameters, deadline_s)
        loop = asyncio.get_running_loop()
        results = dict(outputs)
        results[PREDICTIONS] = await loop.run_in_executor(self.processing_pool, predictions_tensor, predictions)
        return {n: results[n] for n in (req.output_names or (PREDICTIONS,))}

    async def predict(
        self,
        sv: ServedVersion,
        instances: Sequence[Any],
        request_id: str = "",
        parameters: dict[str, Any] | None = None,
        deadline_s: float | None = None,
    ) -> tuple[list[Any], Outputs]:
        """Raw instances through pre-processing (in the processing pool), :meth:`infer`, and post-processing."""
        mbs = sv.spec.serving.max_batch_size
        if mbs and len(instances) > mbs:
            raise ProtocolError(
                "instances", f"{len(instances)} instances exceed model {sv.model!r}'s max batch size {mbs}; "
                f"send at most {mbs} per request",
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        batch = await loop.run_in_executor(self.processing_pool, sv.processing.preprocess, instances)
        request = InferRequest(id=request_id, inputs=batch.inputs, parameters=parameters or {})
        outputs = await self.infer(sv, request, deadline_s)
        predictions = await loop.run_in_executor(self.processing_pool, sv.processing.postprocess, outputs, batch)
        return predictions, outputs

    async def _run(
        self,
        sv: ServedVersion,
        req: InferRequest,
        rows: int,
        client_s: float | None,
        disconnected: Callable[[], Awaitable[object]] | None = None,
    ) -> Outputs:
        """Run inline when alone, else through the batcher within the smaller of the model's and the client's
        timeout. The batcher admits the request only if its expected wait fits the client's timeout (when
        it sent one) or the model's queue budget. ``disconnected`` resolves when the client goes away: a
        request still queued then is dropped before it runs."""
        batcher = sv.batcher
        if await self._may_run_inline(sv, rows):
            awaited = batcher.lends == "await"  # a Ray Serve handle call: awaited here, never run in this thread
            runner = batcher.lend(awaiting=awaited)  # nothing else in flight and the engine idle: no hand-off
            if runner is not None:
                if awaited:
                    return await batcher.run_lent_async(runner, req.inputs, rows)
                return batcher.run_lent(runner, req.inputs, rows)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outputs] = loop.create_future()

        def done(out: Outputs | None, err: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, fut, out, err)

        for attempt in range(_FOLLOW_ATTEMPTS):
            timeout_s = sv.timeout_s if client_s is None else min(sv.timeout_s, client_s)
            try:
                pending = sv.batcher.submit(req.inputs, rows, done, timeout_s, budget_s=client_s)
                break
            except BatcherClosedError:
                # A reload switched versions after this request resolved its model: follow it to the new one.
                # Evicted (or unloaded) meanwhile in lazy mode: load it again, as a request arriving now would.
                fresh = self.manager.lookup(sv.model, req.version)
                if fresh is None and self.settings.load_mode == "lazy" and attempt + 1 < _FOLLOW_ATTEMPTS:
                    fresh = await self.manager.get(sv.model, req.version)
                if fresh is None or fresh is sv:
                    raise
                sv = fresh
        else:
            raise BatcherClosedError(sv.model)  # unloaded under it each time: the models outgrow the memory budget
        timer = loop.call_later(timeout_s, _drop, fut, pending, RequestTimeoutError, sv.model, timeout_s)
        watching: list[asyncio.Task[object]] = []
        watch_timer = None
        if disconnected is not None:  # a request still queued after a while listens for its client leaving
            model = sv.model

            def watch() -> None:
                task = asyncio.ensure_future(disconnected())
                task.add_done_callback(
                    lambda t: None if t.cancelled() else _drop(fut, pending, ClientClosedError, model)
                )
                watching.append(task)

            watch_timer = loop.call_later(_WATCH_AFTER_S, watch)  # a timer costs the hot path less than a task
        try:
            return await fut
        except asyncio.CancelledError:  # the client went away: do not run it if it is still queued
            pending.cancelled = True
            raise
        finally:
            timer.cancel()
            if watch_timer is not None:
                watch_timer.cancel()
            for task in watching:
                task.cancel()

    def record(self, model: str, version: str, protocol: str, status: int, seconds: float) -> None:
        """Count a finished request; ``model`` is empty for names the repository does not hold."""
        k = (model, version, protocol, outcome_for(status))
        child = self._children.get(k)
        if child is None:
            child = self._children[k] = self.metrics.requests.labels(*k)
        child.inc()
        if version:
            self.metrics.request_done(model, version, status < 400, seconds)
        if status < 400:
            tk = (model, version, protocol)
            timer = self._timers.get(tk)
            if timer is None:
                timer = self._timers[tk] = self.metrics.request_seconds.labels(*tk)
            timer.observe(seconds)
        elif status == 503:  # how fast overload is refused, as the server sees it (from its handler's start)
            self.metrics.refusal_seconds.labels(protocol).observe(seconds)

    def model_label(self, name: str) -> str:
        return name if name in self.manager.entries or self.manager.repository.has_model(name) else ""

    # ---- metadata and configuration ---------------------------------------------------------------------
    def model_ready(self, model: str, version: str | None) -> bool:
        """Whether ``model`` (``version``) is ready; an unknown model or version raises, as metadata does."""
        v = parse_version(version)
        if self.manager.is_ready(model, v):
            return True
        self._spec_versions(model, version)  # unknown model or unserved version: 404 rather than 'not ready'
        return False

    def model_metadata(self, model: str, version: str | None) -> dict[str, Any]:
        spec, versions = self._spec_versions(model, version)
        return metadata.model_metadata(model, versions, spec, self.manager.engine(model, parse_version(version)))

    def statistics(self, model: str | None, version: str | None) -> list[dict[str, object]]:
        """The statistics extension: every model's, or ``model``'s (a served ``version``'s), as Triton's."""
        if model is None:
            if version:
                raise ProtocolError("version", "statistics of a version need the model's name too")
            return self.metrics.statistics()
        self._spec_versions(model, version)  # unknown model or unserved version: 404; a bad one: 400
        return self.metrics.statistics(model, str(parse_version(version)) if version else None)

    def model_config(self, model: str, version: str | None = None) -> dict[str, Any]:
        spec, _ = self._spec_versions(model, version)
        engine = self.manager.engine(model, parse_version(version))
        return metadata.model_config(model, spec, engine, self.settings.request_timeout_s)

    def _spec_versions(self, model: str, version: str | None) -> tuple[ModelSpec, list[int]]:
        spec = self.manager.spec(model)
        versions = self.manager.served_versions(model)
        v = parse_version(version)
        if v is not None and v not in versions:
            raise NotFoundError("served version", v, versions, owner=f"model {model!r}")
        return spec, versions


def _settle(fut: asyncio.Future[Outputs], out: Outputs | None, err: BaseException | None) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(out if out is not None else {})


def _drop(fut: asyncio.Future[Outputs], pending: Any, error: type[KilnError], *args: Any) -> None:
    """The request is over for its client (timed out, or gone): not run if still queued, answered
    ``error(*args)`` (built only then: the timer of every request carries the recipe, not the error)."""
    pending.cancelled = True
    if not fut.done():
        fut.set_exception(error(*args))


__all__ = ["REPOSITORY_ENDPOINTS", "SHM_ENDPOINTS", "Service", "check_load_parameters", "client_timeout_s"]
