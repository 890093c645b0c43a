"""The model manager: which model versions are loaded, and their lifecycle.

Versions follow each model's policy (latest N, all, or specific). A model loads at start
(``preload``) or on its first request (``lazy``), is warmed before it reports ready, reloads without
failing a request (the new versions load and warm beside the old, the switch is one assignment in the
event loop, the old ones drain), and unloads for real (engines closed, memory handed back to the OS).
With a memory budget, models are unloaded to make room: under ``eviction: predictive`` (the default)
those whose forecast demand × reload time per byte is lowest, and a background task prefetches the
models expected soon and restores the ones loaded before a restart (``prefetch.py``, ``demand.py``);
under ``eviction: lru`` the least recently used.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kiln.engines.base import release_memory
from kiln.errors import (
    KilnError,
    MemoryBudgetError,
    ModelNotReadyError,
    NotFoundError,
    VersionNotServedError,
    WarmupFailedError,
    first_line,
)
from kiln.execution.admission import AUTO
from kiln.execution.batcher import Batcher, BatchPolicy, Runner
from kiln.execution.errors import ShuttingDownError
from kiln.execution.instances import FallbackState, open_instances, warm_up, warmup_inputs
from kiln.memory import tune_allocator
from kiln.repository import CHOSEN, REFERENCE, REFERENCE_ENGINE, Repository, Variant, policy_versions
from kiln.serving.demand import Candidate, LoadOrigin, UsageHistory, victims
from kiln.serving.metrics import Metrics
from kiln.serving.prefetch import Prefetcher
from kiln.serving.raw import RawModel
from kiln.serving.settings import ServerSettings
from kiln.spec import InputCheck, ModelSpec

log = logging.getLogger("kiln.serving")


class State(enum.StrEnum):
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"


@dataclass(eq=False)
class ServedVersion:
    """One loaded model version: its spec, its batcher (and, through it, its instances)."""

    model: str
    version: int
    spec: ModelSpec
    batcher: Batcher
    variant: str
    memory_bytes: int
    generation: int
    fallback: FallbackState
    timeout_s: float
    processing: RawModel  # pre/post-processing for raw inputs (V1 predict, the V2 ``raw`` input)
    engine: str  # the chosen variant's engine
    reference_engine: str | None  # the fallback's engine; None when the reference itself is served
    check_inputs: InputCheck = field(init=False)  # the spec's input rules, precomputed for the hot path

    def __post_init__(self) -> None:
        self.check_inputs = InputCheck(self.spec)

    @property
    def cache_enabled(self) -> bool:
        return self.spec.serving.response_cache

    @property
    def serving_engine(self) -> str:
        """The engine answering now: the reference's once the fallback has latched."""
        if self.reference_engine is not None and self.fallback.latched:
            return self.reference_engine
        return self.engine


@dataclass(eq=False)
class ModelEntry:
    name: str
    state: State = State.UNAVAILABLE
    versions: dict[int, ServedVersion] = field(default_factory=dict)
    default: ServedVersion | None = None
    reason: str = ""
    last_used: float = 0.0
    origin: LoadOrigin = LoadOrigin.EXPLICIT  # why the versions served now were loaded
    used: bool = False  # whether a request used them (a prefetch that was not is counted wasted at unload)
    held_back: bool = False  # unloaded on request: not prefetched until it is requested or loaded again

    @property
    def memory_bytes(self) -> int:
        return sum(v.memory_bytes for v in self.versions.values())


def policy_text(spec: ModelSpec) -> str:
    s = spec.serving
    if s.version_policy == "latest":
        return f"latest {s.num_versions}"
    return "all" if s.version_policy == "all" else f"specific {s.versions}"


def version_bytes(repository: Repository, served: Variant, reference_copies: int | None = None) -> int:
    """The memory estimate of one served version: its instances, plus the reference they fall back on.

    ``reference_copies`` is what was loaded; before the load it is estimated as one shared copy.
    """
    own = served.artifact_bytes() * served.spec.serving.instances
    if served.large is not None:  # the partner for large batches, loaded beside it in each instance
        own += served.large.artifact_bytes() * served.spec.serving.instances
    if served.is_reference:
        return own
    reference = repository.variant(served.model, served.version, REFERENCE)
    return own + reference.artifact_bytes() * (1 if reference_copies is None else reference_copies)


class ModelManager:
    def __init__(
        self,
        settings: ServerSettings,
        metrics: Metrics,
        repository: Repository | None = None,
        clock: Callable[[], float] = time.monotonic,
        usage_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repository = repository or Repository(settings.repo, show_root=False)
        self.clock = clock
        # the usage history is kept (and read at the first load) only under predictive eviction
        self.usage = UsageHistory(usage_clock) if settings.eviction == "predictive" else None
        self.prefetcher = Prefetcher(self, self.usage) if self.usage is not None else None
        tune_allocator()  # so that an unload hands its memory back to the OS (see kiln.memory)
        self.entries: dict[str, ModelEntry] = {}
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None  # where a worker thread reports a failing model
        self._recoveries: set[asyncio.Task[None]] = set()
        self.on_retire: list[Callable[[ServedVersion], object]] = []  # e.g. the response cache forgets it
        self._generation = 0
        self._lock: asyncio.Lock | None = None

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # ---- startup and shutdown ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Restore the models loaded before a restart (lazy mode, the first ones before this returns),
        start prefetching, then preload (preload mode)."""
        self._loop = asyncio.get_running_loop()
        if self.prefetcher is not None:
            await self.prefetcher.start()
        if self.settings.load_mode == "lazy":
            return
        names = self.settings.models or self.repository.models()
        for name in names:
            await self.load(name)

    async def close(self) -> None:
        self.draining = True
        for task in list(self._recoveries):
            task.cancel()
        if self.prefetcher is not None:
            await self.prefetcher.stop()
            await self.prefetcher.save(self.loaded_names())  # the snapshot a restart restores
        async with self.lock:
            for entry in list(self.entries.values()):
                await self._unload_entry(entry)

    # ---- lookups (the hot path) ---------------------------------------------------------------------------
    def lookup(self, name: str, version: int | None) -> ServedVersion | None:
        """The served version when ready, without awaiting; None when the slow path must decide."""
        entry = self.entries.get(name)
        if entry is None or entry.state is not State.READY:
            return None
        sv = entry.default if version is None else entry.versions.get(version)
        if sv is not None:
            entry.last_used = self.clock()
            if self.usage is not None:
                self.usage.record(name, sv.version)
            if not entry.used:
                entry.used = True
                if entry.origin in (LoadOrigin.PREFETCH, LoadOrigin.RESTORE):
                    self.metrics.prefetch_hits.labels(name).inc()
        return sv

    async def get(self, name: str, version: int | None) -> ServedVersion:
        sv = self.lookup(name, version)
        if sv is not None:
            return sv
        if self.draining:
            raise ShuttingDownError("the server is shutting down and takes no new requests")
        spec = self.repository.spec(name)  # NotFoundError names the models there are
        entry = self.entries.get(name)
        if entry is None or entry.state is not State.READY:
            if self.settings.load_mode == "lazy":
                await self.load(name, if_needed=True, origin=LoadOrigin.REQUEST)
            elif entry is not None and entry.state is State.LOADING:
                raise ModelNotReadyError(f"model {name!r} is loading; retry when /v2/models/{name}/ready says so")
            else:
                raise ModelNotReadyError(
                    f"model {name!r} is not loaded{f' ({entry.reason})' if entry and entry.reason else ''}; "
                    f"load it with POST /v2/repository/models/{name}/load"
                )
        sv = self.lookup(name, version)
        if sv is not None:
            return sv
        available = self.repository.versions(name)
        if version is not None and version in available:
            served = sorted(self.entries[name].versions)
            raise VersionNotServedError(name, version, policy_text(spec), served)
        raise NotFoundError("version", version, available, owner=f"model {name!r}")

    def spec(self, name: str) -> ModelSpec:
        """The spec of a loaded model, else the one on disk (metadata needs no load)."""
        entry = self.entries.get(name)
        if entry is not None and entry.default is not None:
            return entry.default.spec
        return self.repository.spec(name)

    def served_versions(self, name: str) -> list[int]:
        entry = self.entries.get(name)
        if entry is not None and entry.versions:
            return sorted(entry.versions)
        spec = self.repository.spec(name)
        return policy_versions(spec, self.repository.versions(name))

    def engine(self, name: str, version: int | None = None) -> str:
        """The engine serving ``name`` (its default version, or ``version``), loaded or not."""
        entry = self.entries.get(name)
        if entry is not None and entry.versions:
            sv = entry.default if version is None else entry.versions.get(version)
            if sv is not None:
                return sv.serving_engine
        spec = self.repository.spec(name)
        if version is None:
            served = policy_versions(spec, self.repository.versions(name))
            version = served[-1] if served else None
        if version is None:
            return REFERENCE_ENGINE
        return self.repository.variant(name, version, CHOSEN).engine

    def is_ready(self, name: str, version: int | None = None) -> bool:
        entry = self.entries.get(name)
        if entry is None or entry.state is not State.READY:
            return False
        return version is None or version in entry.versions

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        for name in sorted(set(self.repository.models()) | set(self.entries)):
            entry = self.entries.get(name)
            versions = self.repository.versions(name) or sorted(entry.versions if entry else [])
            for v in versions:
                served = entry is not None and v in entry.versions
                state = State.READY if served and entry and entry.state is State.READY else State.UNAVAILABLE
                if entry is not None and entry.state in (State.LOADING, State.UNLOADING) and not served:
                    state = entry.state
                if ready_only and state is not State.READY:
                    continue
                row = {"name": name, "version": str(v), "state": state.value, "reason": ""}
                if entry is not None and entry.reason and state is not State.READY:
                    row["reason"] = entry.reason
                rows.append(row)
        return rows

    # ---- load / reload / unload --------------------------------------------------------------------------
    async def load(self, name: str, if_needed: bool = False, origin: LoadOrigin = LoadOrigin.EXPLICIT) -> ModelEntry:
        """Load (or reload) ``name``: new versions load and warm first, then replace the served ones."""
        if self.draining:
            raise ShuttingDownError("the server is shutting down and loads no models")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self.prefetcher is not None:
            self.prefetcher.begin()  # reads the saved history, once, if start() did not
            if origin in (LoadOrigin.REQUEST, LoadOrigin.EXPLICIT):
                self.prefetcher.skip.discard(name)
        spec = self.repository.spec(name)
        async with self.lock:
            entry = self.entries.setdefault(name, ModelEntry(name))
            if if_needed and entry.state is State.READY:
                return entry
            if origin in (LoadOrigin.PREFETCH, LoadOrigin.RESTORE) and entry.held_back:
                return entry  # unloaded on request meanwhile
            spec = self.repository.spec(name)
            versions = self._served(name, spec)
            await self._make_room(entry, self._bytes_of(name, versions))
            was = entry.state
            if was is not State.READY:
                entry.state = State.LOADING
            start = time.perf_counter()
            try:
                loaded = await asyncio.to_thread(self._open_versions, spec, versions)
            except Exception as exc:
                entry.state = was if was is State.READY else State.UNAVAILABLE
                entry.reason = (
                    self.repository.relative(str(exc))
                    if isinstance(exc, KilnError)
                    else "load failed; see the server log"
                )
                if not isinstance(exc, KilnError):
                    log.exception("loading model %s failed", name)
                raise
            old = list(entry.versions.values())
            entry.versions = {sv.version: sv for sv in loaded}
            entry.default = entry.versions[max(entry.versions)]
            entry.state = State.READY
            entry.reason = ""
            entry.last_used = self.clock()
            entry.origin, entry.used, entry.held_back = origin, False, False
            for sv in loaded:
                self.metrics.batchers.track(name, sv.version, sv.batcher)
            took = time.perf_counter() - start
            self.metrics.load_seconds.labels(name).observe(took)
            if origin is LoadOrigin.REQUEST:
                self.metrics.cold_loads.labels(name).inc()
            elif origin is not LoadOrigin.EXPLICIT:
                self.metrics.prefetches.labels(name, origin.value).inc()
            if self.usage is not None:
                self.usage.load_took(name, took, entry.memory_bytes)
            self._update_gauges()
            log.info(
                "model %s ready: versions %s on %s", name, sorted(entry.versions),
                ", ".join(sorted({sv.variant for sv in loaded})), extra={"model": name},
            )  # fmt: skip
        if old:
            await asyncio.to_thread(self._retire, old)
        return entry

    async def unload(self, name: str) -> None:
        entry = self.entries.get(name)
        if entry is None:
            self.repository.spec(name)  # a model that does not exist: NotFoundError
            return
        async with self.lock:
            await self._unload_entry(entry)
            entry.held_back = True

    async def _unload_entry(self, entry: ModelEntry) -> None:
        old = list(entry.versions.values())
        if old and not entry.used and entry.origin in (LoadOrigin.PREFETCH, LoadOrigin.RESTORE):
            self.metrics.prefetch_wasted.labels(entry.name).inc()
            log.info("model %s was %s and unloaded unused", entry.name,
                     "prefetched" if entry.origin is LoadOrigin.PREFETCH else "restored", extra={"model": entry.name})  # fmt: skip
        entry.versions = {}
        entry.default = None
        entry.state = State.UNLOADING
        try:
            await asyncio.to_thread(self._retire, old)
        finally:
            entry.state = State.UNAVAILABLE
            self._update_gauges()
        if old:
            log.info("model %s unloaded", entry.name, extra={"model": entry.name})

    async def _make_room(self, entry: ModelEntry, need: int) -> None:
        budget = self.settings.max_memory
        if budget is None:
            return
        if need > budget:
            raise MemoryBudgetError(entry.name, need, budget)
        others = [e for e in self.entries.values() if e is not entry and e.versions]
        free = budget - sum(e.memory_bytes for e in others)
        policy = self.settings.eviction
        for c in victims(self.candidates(entries=others), need, free, policy) or []:
            victim = self.entries[c.name]
            if policy == "lru":
                why = "least recently used"
            else:
                why = f"{c.reason}; reload {c.cost_s:.2f} s; the least expected use per byte"
            log.info("evicting model %s (%s) to load %s", victim.name, why, entry.name, extra={"model": victim.name})
            self.metrics.evictions.inc()
            await self._unload_entry(victim)
            victim.reason = f"evicted to fit {entry.name!r} in the memory budget"

    # ---- what the eviction choice and the prefetcher read ----------------------------------------------------
    def need_bytes(self, name: str) -> int:
        """The memory estimate of loading ``name``: the versions its policy serves (reads the repository)."""
        return self._bytes_of(name, self._served(name, self.repository.spec(name)))

    def _served(self, name: str, spec: ModelSpec) -> list[int]:
        versions = policy_versions(spec, self.repository.versions(name))
        if not versions:
            raise NotFoundError("version", None, owner=f"model {name!r}", where="the repository")
        return versions

    def _bytes_of(self, name: str, versions: list[int]) -> int:
        return sum(version_bytes(self.repository, self.repository.variant(name, v, CHOSEN)) for v in versions)

    def loaded_bytes(self) -> int:
        return sum(e.memory_bytes for e in self.entries.values() if e.versions)

    def loaded_names(self) -> list[str]:
        return [e.name for e in self.entries.values() if e.state is State.READY and e.versions]

    def may_prefetch(self, name: str) -> bool:
        """Whether ``name`` is neither loaded, nor loading, nor held back by an explicit unload."""
        entry = self.entries.get(name)
        return entry is None or (entry.state is State.UNAVAILABLE and not entry.versions and not entry.held_back)

    def candidates(self, now: float | None = None, entries: list[ModelEntry] | None = None) -> list[Candidate]:
        """The loaded models as the eviction choice sees them: forecast, reload cost, size, last use."""
        chosen = [e for e in self.entries.values() if e.versions] if entries is None else entries
        usage, window = self.usage, self.settings.prefetch_window_s
        out = []
        for e in chosen:
            nbytes = e.memory_bytes
            if usage is None:
                out.append(Candidate(e.name, nbytes, 0.0, 0.0, e.last_used))
                continue
            f = usage.forecast(e.name, window, now)
            out.append(Candidate(e.name, nbytes, f.p, usage.reload_cost(e.name, nbytes), e.last_used, f.reason))
        return out

    # ---- work done in a thread -----------------------------------------------------------------------------
    def _open_versions(self, spec: ModelSpec, versions: list[int]) -> list[ServedVersion]:
        loaded: list[ServedVersion] = []
        try:
            for v in versions:
                loaded.append(self._open_version(spec, v))
        except BaseException:
            self._retire(loaded)
            raise
        return loaded

    def _open_version(self, spec: ModelSpec, version: int) -> ServedVersion:
        s = spec.serving
        name = spec.name
        served = self.repository.variant(name, version, CHOSEN)
        processing = RawModel.build(spec, served.version_dir)  # before the engines: a bad step fails the load at once
        counter = self.metrics.fallbacks.labels(name, str(version))
        reference = self.repository.variant(name, version, REFERENCE)
        if self.settings.ray:  # the replicas run on Ray Serve; this server batches and sends them the batches
            from kiln.ray.serve import open_ray_instances

            inst = open_ray_instances(served, reference, counter.inc, self.settings.max_memory)
        else:
            inst = open_instances(served, reference, self.settings.engine_threads, counter.inc)
        runners = inst.runners
        timeout_s = (s.timeout_ms / 1e3) if s.timeout_ms else self.settings.request_timeout_s
        policy = BatchPolicy(
            max_batch_size=s.max_batch_size,
            preferred_batch_sizes=tuple(sorted(s.preferred_batch_sizes)),
            max_queue_delay_s=s.max_queue_delay_us / 1e6,
            max_queue_size=s.max_queue_size,
            queue_budget_s=AUTO if s.queue_budget_ms is None else s.queue_budget_ms / 1e3,
            compute_timeout_s=(s.compute_timeout_ms / 1e3) if s.compute_timeout_ms else timeout_s,
            fail_after=s.unhealthy_after,
            merge_rows=1 if s.dynamic_batching == "off" else 0,
            auto_wait=s.dynamic_batching == "auto",
        )
        label = f"{name}:{version}"
        probe_feed = warmup_inputs(spec, 1)

        def probe(runner: Runner) -> object:
            return runner.run(probe_feed)

        batcher = Batcher(
            name, runners, policy, observer=self.metrics.observer(name, version), name=label, probe=probe,
            on_unhealthy=lambda reason: self._report_unhealthy(name, version, batcher, reason),
            lends="await" if self.settings.ray else "call",  # a Ray Serve handle call is awaited, never blocks
        )  # fmt: skip
        try:
            if s.warmup:
                batcher.seed(warm_up(runners, spec))  # the warm times per size: inline runs and admission
        except Exception as exc:
            for r in runners:
                r.close()
            raise WarmupFailedError(name, version, first_line(exc)) from exc
        batcher.start()
        self._generation += 1
        return ServedVersion(
            model=name,
            version=version,
            spec=spec,
            batcher=batcher,
            variant=inst.variant,
            memory_bytes=version_bytes(self.repository, served, inst.reference_copies),
            generation=self._generation,
            fallback=inst.fallback,
            timeout_s=timeout_s,
            processing=processing,
            engine=inst.engine,
            reference_engine=inst.reference_engine,
        )

    # ---- a failing model: not ready, then reloaded ----------------------------------------------------------
    def _report_unhealthy(self, name: str, version: int, batcher: Batcher, reason: str) -> None:
        """From a worker thread: ``batcher`` gave up on its engine. The event loop takes it from here."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._mark_unhealthy, name, version, batcher, reason)

    def _mark_unhealthy(self, name: str, version: int, batcher: Batcher, reason: str) -> None:
        entry = self.entries.get(name)
        sv = entry.versions.get(version) if entry is not None else None
        if entry is None or sv is None or sv.batcher is not batcher or self.draining:
            return  # already replaced or unloaded
        log.error(
            "model %s version %s is failing (%s): not ready until it reloads; reloading now", name, version, reason,
            extra={"model": name},
        )  # fmt: skip
        self.metrics.unhealthy.labels(name).inc()
        entry.state = State.UNAVAILABLE
        entry.reason = f"failing ({reason}); reloading"
        self._update_gauges()
        task = asyncio.ensure_future(self._recover(name))
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    async def _recover(self, name: str) -> None:
        try:
            await self.load(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            entry = self.entries.get(name)
            if entry is not None:
                entry.reason = f"failing, and its reload failed: {self.repository.relative(str(exc))}"
            log.error("reloading failing model %s failed; load it again when fixed", name, exc_info=exc)
        else:
            log.info("failing model %s reloaded", name, extra={"model": name})

    def _retire(self, versions: list[ServedVersion]) -> None:
        for sv in versions:
            self.metrics.batchers.untrack(sv.model, sv.version, sv.batcher)  # its gauges go with it
            sv.batcher.close(drain=True, timeout=self.settings.drain_timeout_s)
            for hook in self.on_retire:
                hook(sv)
        if versions:
            del sv
            versions.clear()
            release_memory()

    def _update_gauges(self) -> None:
        ready = [e for e in self.entries.values() if e.state is State.READY]
        self.metrics.models_loaded.set(sum(len(e.versions) for e in ready))
        self.metrics.memory_bytes.set(sum(e.memory_bytes for e in ready))
