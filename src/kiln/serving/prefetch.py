"""The model manager's background work under ``eviction: predictive``.

At start it reads the usage history saved in the repository and restores the snapshot of models that
were loaded, in order of predicted demand (the first ones before the server reports ready, the rest
after). Then, every ``prefetch_interval_s``, it loads the model the forecast expects to be requested
within ``prefetch_window_s`` if that is worth what it would displace (see
:func:`kiln.serving.demand.plan_prefetch`), one load at a time and only while no other load runs, so
prefetching never queues ahead of a request's load for long. It saves the history (and the snapshot)
every minute and at shutdown. The manager keeps owning loads and unloads; this only asks for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING

from kiln.errors import KilnError
from kiln.execution.errors import ShuttingDownError
from kiln.serving.demand import Candidate, LoadOrigin, UsageHistory, plan_prefetch, usage_path

if TYPE_CHECKING:
    from kiln.serving.manager import ModelManager

log = logging.getLogger("kiln.serving")

READY_AFTER = 2  # snapshot models restored before start-up completes (the server is ready after them)
MIN_P = 0.3  # a model is prefetched only if a request within the window is at least this likely
SAVE_EVERY_S = 60.0


class Prefetcher:
    def __init__(self, manager: ModelManager, usage: UsageHistory) -> None:
        self.manager = manager
        self.usage = usage
        self.path = usage_path(manager.repository.root)
        self.restored = asyncio.Event()  # set once the whole snapshot was restored (or skipped)
        self.skip: set[str] = set()  # prefetches that failed: not tried again until requested or loaded
        self._started = False
        self._opened = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._saved: list[str] = []  # the snapshot last saved (or read)
        self._saved_at = time.monotonic()
        self._save_warned = False
        self._sizes: dict[str, int] = {}

    # ---- start and stop ------------------------------------------------------------------------------------
    def open(self) -> list[str]:
        """Read the saved history, once; returns its snapshot of loaded models (kept in the repository)."""
        if self._opened:
            return []
        self._opened = True
        try:
            self._saved = self.usage.read(self.path, self.manager.repository.has_model)
        except Exception:  # read() warns of what it expects; this is what it did not
            log.exception("ignoring usage file %s: reading it failed", self.path)
        return list(self._saved)

    def restore_order(self, names: list[str]) -> list[str]:
        window = self.manager.settings.prefetch_window_s
        now = self.usage.now()
        return sorted(names, key=lambda n: self.usage.forecast(n, window, now).p, reverse=True)

    async def start(self, wait_for: int = READY_AFTER) -> None:
        """Read the history, restore the snapshot's first ``wait_for`` models (lazy mode), then run."""
        if self._started:
            return
        self._started = True
        snapshot = self.open()
        order = self.restore_order(snapshot) if self.manager.settings.load_mode == "lazy" else []
        for name in order[:wait_for]:
            await self._restore(name)
        self._spawn(order[wait_for:])

    def begin(self) -> None:
        """Start without waiting (from a first load when :meth:`start` was never called)."""
        if self._started:
            return
        self._started = True
        snapshot = self.open()
        self._spawn(self.restore_order(snapshot) if self.manager.settings.load_mode == "lazy" else [])

    def _spawn(self, restore: list[str]) -> None:
        if not restore:
            self.restored.set()
        self._task = asyncio.ensure_future(self._run(restore))

    async def stop(self) -> None:
        """Finish the load under way (a load is never cancelled halfway: its engines would leak), stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self, restore: list[str]) -> None:
        try:
            for name in restore:
                if self._stopping:
                    break
                await self._restore(name)
        finally:
            self.restored.set()
        interval = self.manager.settings.prefetch_interval_s
        while not self._stopping:
            try:
                while not self._stopping and await self.tick():
                    pass
                if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
                    await self.save()
            except Exception:
                log.exception("the prefetcher failed; it carries on at its next round")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    # ---- one round -----------------------------------------------------------------------------------------
    async def tick(self) -> bool:
        """Load the model most worth prefetching now, if one is; True when one was loaded."""
        m = self.manager
        if m.draining or m.lock.locked() or m.settings.load_mode != "lazy":
            return False
        window = m.settings.prefetch_window_s
        now = self.usage.now()
        wanted: list[Candidate] = []
        for name in list(self.usage.models):
            if not m.may_prefetch(name) or name in self.skip:
                continue
            f = self.usage.forecast(name, window, now)
            if f.p < MIN_P:
                continue
            nbytes = await self._bytes(name)
            if nbytes is not None:
                wanted.append(Candidate(name, nbytes, f.p, self.usage.reload_cost(name, nbytes), reason=f.reason))
        if not wanted or m.draining or m.lock.locked():
            return False
        plan = plan_prefetch(m.candidates(now), wanted, m.settings.max_memory, MIN_P)
        if plan is None:
            return False
        room = f"; making room: {', '.join(v.name for v in plan.evict)}" if plan.evict else ""
        log.info("prefetching model %s (%s)%s", plan.model.name, plan.model.reason, room,
                 extra={"model": plan.model.name})  # fmt: skip
        return await self._load(plan.model.name, LoadOrigin.PREFETCH)

    async def _restore(self, name: str) -> None:
        m = self.manager
        if m.draining or not m.may_prefetch(name):
            return
        nbytes = await self._bytes(name)
        if nbytes is None:
            return
        budget = m.settings.max_memory
        if budget is not None and m.loaded_bytes() + nbytes > budget:
            log.info("not restoring model %s: it does not fit beside the ones restored before it", name,
                     extra={"model": name})  # fmt: skip
            return
        f = self.usage.forecast(name, m.settings.prefetch_window_s)
        log.info("restoring model %s, loaded before the restart (%s)", name, f.reason, extra={"model": name})
        await self._load(name, LoadOrigin.RESTORE)

    async def _load(self, name: str, origin: LoadOrigin) -> bool:
        try:
            await self.manager.load(name, if_needed=True, origin=origin)
        except ShuttingDownError:
            return False
        except Exception as exc:  # the manager logged an unexpected one with its traceback
            self.skip.add(name)
            reason = self.manager.repository.relative(str(exc)) if isinstance(exc, KilnError) else type(exc).__name__
            log.warning("%s of model %s failed, not tried again until requested: %s", origin, name, reason,
                        extra={"model": name})  # fmt: skip
            return False
        return True

    async def _bytes(self, name: str) -> int | None:
        nbytes = self._sizes.get(name) or self.usage.known_bytes(name)
        if nbytes is None:
            try:
                nbytes = await asyncio.to_thread(self.manager.need_bytes, name)
            except Exception as exc:
                self.skip.add(name)
                log.warning("model %s is not prefetched: %s", name, self.manager.repository.relative(str(exc)))
                return None
        self._sizes[name] = nbytes
        return nbytes

    # ---- the history on disk -------------------------------------------------------------------------------
    async def save(self, loaded: list[str] | None = None) -> None:
        """Save the history and the snapshot of loaded models, when either changed."""
        self.open()  # never overwrite a history that was not read
        names = self.manager.loaded_names() if loaded is None else loaded
        self._saved_at = time.monotonic()
        if not self.usage.dirty and names == self._saved:
            return
        doc = self.usage.document(names)
        self.usage.dirty = False
        try:
            await asyncio.to_thread(lambda: self.usage.save(self.path, json.dumps(doc)))
        except OSError as exc:
            self.usage.dirty = True
            if not self._save_warned:
                self._save_warned = True
                log.warning("cannot save the usage history to %s (%s): a restart will not remember it",
                            self.path, exc.strerror or exc)  # fmt: skip
            return
        self._saved = list(names)
