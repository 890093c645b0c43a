"""Triton's system shared memory extension: named regions of POSIX shared memory segments that a client
registers, and that infer requests read inputs from and write outputs to instead of the message body.

The client owns every segment: the server opens it (never creates, resizes or unlinks it), maps only the
pages of the registered region, and unmaps them once the region is unregistered and the last request
that uses it has finished. What keeps every access inside what the client registered:

- a key names one file directly under ``/dev/shm`` (``/?[A-Za-z0-9_.-]{1,255}``, never '.' or '..'),
  opened with ``O_NOFOLLOW``; it must be a regular file, and ``offset + byte_size`` must lie within it;
- a tensor's ``shared_memory_offset + shared_memory_byte_size`` must lie within its region; an input's
  bytes must be exactly ``shared_memory_byte_size``, an output's at most that;
- before each use the segment's size is checked again: a client that shrank its segment would otherwise
  make the server's next access to the lost pages fault (a shrink in the microseconds between the check
  and the access still can: the segment is the client's, as it is with Triton);
- a mapping is never unmapped under a live view: ``mmap.close`` refuses while views are exported, and
  the mapping then goes with the last view (counted against the cap until it does).

Requests reach regions through a :class:`ShmSession`, which the front end releases once the response
is encoded; the registry's own state is guarded by a lock, though every caller today is the event loop.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import (
    InvalidNameError,
    ProtocolError,
    SharedMemoryError,
    SharedMemoryLimitError,
    UnknownSharedMemoryRegionError,
)
from kiln.repository import check_model_name

SHM_DIR = Path("/dev/shm")  # where Linux's shm_open keeps its segments
MAX_REGIONS = 256
KEY_RULE = (
    "is not a POSIX shared memory key: use an optional leading '/' and 1-255 letters, digits, '_', '.' or '-' "
    "(no other '/', and not '.' or '..')"
)
_KEY = re.compile(r"/?([A-Za-z0-9_.-]{1,255})")
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO there cannot hang us


def check_region_name(name: object, field: str = "region name") -> str:
    return check_model_name(name, field, kind="region name")


def check_key(key: object) -> str:
    """The segment's file name under ``/dev/shm`` for a key: one path component, never '.' or '..'."""
    m = _KEY.fullmatch(key) if isinstance(key, str) else None
    if m is None or m.group(1) in (".", ".."):
        raise InvalidNameError("key", str(key), KEY_RULE)
    return m.group(1)


@dataclass(frozen=True, slots=True)
class ShmRef:
    """Where a tensor lies: ``byte_size`` bytes at ``offset`` within region ``region``."""

    region: str
    offset: int
    byte_size: int


def shm_ref(params: Mapping[str, Any], what: str) -> ShmRef:
    """The ``shared_memory_*`` parameters of a tensor (``what``: "input 'x'"), type-checked."""
    region = params.get("shared_memory_region")
    if not isinstance(region, str):
        raise ProtocolError(f"{what}: shared_memory_region", f"must be a region name (a string), got {_shown(region)}")
    if "shared_memory_byte_size" not in params:
        raise SharedMemoryError(region, f"{what}: shared_memory_byte_size must be given with shared_memory_region")
    values = []
    for key, default in (("shared_memory_offset", 0), ("shared_memory_byte_size", None)):
        v = params.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SharedMemoryError(region, f"{what}: {key} must be a non-negative integer, got {_shown(v)}")
        values.append(v)
    return ShmRef(region, values[0], values[1])


def _count(region: str, field: str, value: object, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise SharedMemoryError(region, f"{field} must be an integer of at least {least}, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Region:
    """One registered region: the mapping of its pages, its segment's descriptor, how many uses are open."""

    __slots__ = ("_fd", "_mm", "_start", "_view", "byte_size", "key", "mapped", "name", "offset", "retired", "users")

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int, mm: mmap.mmap, start: int) -> None:
        self.name = name
        self.key = key
        self.offset = offset  # within the segment
        self.byte_size = byte_size
        self.mapped = len(mm)
        self.users = 0
        self.retired = False  # unregistered: closed once ``users`` falls to 0
        self._fd = fd
        self._mm: mmap.mmap | None = mm
        self._view = memoryview(mm)
        self._start = start  # the region's first byte within the mapping (which starts on a page)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def part(self, ref: ShmRef, what: str) -> memoryview:
        """The region's bytes ``[ref.offset, ref.offset + ref.byte_size)``, once they are known to lie in it."""
        end = ref.offset + ref.byte_size
        if end > self.byte_size:
            raise SharedMemoryError(
                self.name,
                f"{what}: shared_memory_offset {ref.offset} + shared_memory_byte_size {ref.byte_size} = {end} "
                f"passes the region's {self.byte_size} bytes; keep the tensor within the region",
            )
        self.check_segment()
        begin = self._start + ref.offset
        return self._view[begin : begin + ref.byte_size]

    def check_segment(self) -> None:
        """Refuse to touch a segment that its owner shrank below the region (its lost pages would fault)."""
        size = os.fstat(self._fd).st_size
        if size < self.offset + self.byte_size:
            raise SharedMemoryError(
                self.name,
                f"its segment {self.key!r} now holds {size} bytes, fewer than the registered offset {self.offset} "
                f"+ byte_size {self.byte_size}; unregister the region and register it again",
            )

    def close(self) -> weakref.ref[mmap.mmap] | None:
        """Unmap now; while views of it are still alive, a weak reference to the mapping, which goes with them."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        mm, self._mm = self._mm, None
        if mm is None:
            return None
        try:
            self._view.release()
            mm.close()
        except BufferError:  # a request's tensor still views it: unmapped when the last view is dropped
            return weakref.ref(mm)
        return None


@dataclass(frozen=True, slots=True)
class ShmTarget:
    """Where an output goes: the part of a region that a request named, checked when it was decoded."""

    ref: ShmRef
    region: Region
    view: memoryview

    def write(self, raw: bytes | memoryview, what: str) -> dict[str, Any]:
        """Copy an output's bytes in; the parameters that tell the client where they are."""
        n = len(raw) if isinstance(raw, bytes) else raw.nbytes
        if n > self.ref.byte_size:
            raise SharedMemoryError(
                self.ref.region,
                f"{what} holds {n} bytes, more than its shared_memory_byte_size {self.ref.byte_size}; "
                f"give it at least {n} bytes",
            )
        self.region.check_segment()
        self.view[:n] = raw
        params: dict[str, Any] = {"shared_memory_region": self.ref.region, "shared_memory_byte_size": n}
        if self.ref.offset:
            params["shared_memory_offset"] = self.ref.offset
        return params


class ShmSession:
    """The regions one request uses: each use is counted when the request names it, and all are released
    together once its response is encoded (or it failed), so that an unregister never unmaps under it."""

    __slots__ = ("held", "registry")

    def __init__(self, registry: SharedMemoryRegistry) -> None:
        self.registry = registry
        self.held: list[Region] = []

    def part(self, ref: ShmRef, what: str) -> memoryview:
        region = self.registry.acquire(ref.region)
        self.held.append(region)
        return region.part(ref, what)

    def target(self, ref: ShmRef, what: str) -> ShmTarget:
        view = self.part(ref, what)
        return ShmTarget(ref, self.held[-1], view)

    def release(self) -> None:
        held, self.held = self.held, []
        for region in held:
            self.registry.release(region)


class SharedMemoryRegistry:
    """The registered regions, by name, within a cap on their number and on the bytes mapped."""

    def __init__(self, max_regions: int = MAX_REGIONS, max_bytes: int = 2**32, directory: Path = SHM_DIR) -> None:
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.directory = directory
        self._regions: dict[str, Region] = {}
        self._open: set[Region] = set()  # registered, or unregistered while requests still use them
        self._lingering: list[tuple[weakref.ref[mmap.mmap], int]] = []  # closed, but views still hold the pages
        self._lock = threading.Lock()

    def session(self) -> ShmSession | None:
        """What one request reaches regions through; None while none is registered (nothing to allocate)."""
        return ShmSession(self) if self._regions else None

    def mapped_bytes(self) -> int:
        with self._lock:
            return self._mapped()

    def _mapped(self) -> int:
        self._lingering = [(ref, n) for ref, n in self._lingering if ref() is not None]
        return sum(r.mapped for r in self._open) + sum(n for _, n in self._lingering)

    # ---- management ---------------------------------------------------------------------------------------
    def register(self, name: str, key: object, offset: object, byte_size: object) -> None:
        check_region_name(name)
        file_name = check_key(key)
        key_text = str(key)
        at = _count(name, "offset", offset, 0)
        size = _count(name, "byte_size", byte_size, 1)
        with self._lock:
            if name in self._regions:
                held = self._regions[name]
                raise SharedMemoryError(
                    name, f"is already registered (key {held.key!r}, {held.byte_size} bytes); unregister it first "
                    "or register under another name",
                )  # fmt: skip
            if len(self._regions) >= self.max_regions:
                raise SharedMemoryLimitError(
                    name, "the number of regions", len(self._regions) + 1, self.max_regions,
                    "unregister the regions you no longer use",
                )  # fmt: skip
            start = at % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page: from the region's first one
            length = start + size
            total = self._mapped() + length
            if total > self.max_bytes:
                raise SharedMemoryLimitError(
                    name, "the bytes mapped", total, self.max_bytes,
                    "unregister regions you no longer use, or raise KILN_SERVE_SHM_MAX_BYTES",
                )  # fmt: skip
            fd, mm = self._map(name, key_text, file_name, at - start, length, at, size)
            region = Region(name, key_text, at, size, fd, mm, start)
            self._regions[name] = region
            self._open.add(region)

    def _map(
        self, name: str, key: str, file_name: str, map_at: int, length: int, offset: int, byte_size: int
    ) -> tuple[int, mmap.mmap]:
        try:
            fd = os.open(self.directory / file_name, _OPEN_FLAGS)
        except FileNotFoundError:
            raise SharedMemoryError(name, f"no shared memory segment has key {key!r}; create it first") from None
        except PermissionError:
            raise SharedMemoryError(name, f"the server may not open segment {key!r} to read and write it") from None
        except OSError as exc:
            why = "it is a symbolic link" if exc.errno == errno.ELOOP else os.strerror(exc.errno or 0)
            raise SharedMemoryError(name, f"cannot open segment {key!r}: {why}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SharedMemoryError(name, f"key {key!r} is not a shared memory segment (not a regular file)")
            if offset + byte_size > st.st_size:
                raise SharedMemoryError(
                    name,
                    f"offset {offset} + byte_size {byte_size} = {offset + byte_size} passes the end of segment "
                    f"{key!r} ({st.st_size} bytes); register a region within the segment",
                )
            try:
                mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=map_at)
            except (OSError, ValueError, OverflowError) as exc:
                raise SharedMemoryError(name, f"cannot map segment {key!r}: {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd, mm

    def unregister(self, name: str | None = None) -> None:
        """Unregister ``name`` (every region when None); as Triton, a name not registered is no error. A region
        still in use by requests is unmapped when the last one finishes; its name is free at once."""
        if name is not None:
            check_region_name(name)
        with self._lock:
            names = list(self._regions) if name is None else [name] if name in self._regions else []
            for n in names:
                region = self._regions.pop(n)
                region.retired = True
                if region.users == 0:
                    self._close(region)

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        if name is not None:
            check_region_name(name)
        with self._lock:
            if name is None:
                return [r.status() for r in self._regions.values()]
            region = self._regions.get(name)
            if region is None:
                raise UnknownSharedMemoryRegionError(name, list(self._regions))
            return [region.status()]

    def close(self) -> None:
        """At shutdown: unregister every region (those still in use close with their last request)."""
        self.unregister(None)

    # ---- use by requests ----------------------------------------------------------------------------------
    def acquire(self, name: str) -> Region:
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise UnknownSharedMemoryRegionError(name, list(self._regions))
            region.users += 1
            return region

    def release(self, region: Region) -> None:
        with self._lock:
            region.users -= 1
            if region.users == 0 and region.retired:
                self._close(region)

    def _close(self, region: Region) -> None:
        self._open.discard(region)
        lingering = region.close()
        if lingering is not None:
            self._lingering.append((lingering, region.mapped))


__all__ = [
    "MAX_REGIONS",
    "Region",
    "SharedMemoryRegistry",
    "ShmRef",
    "ShmSession",
    "ShmTarget",
    "check_key",
    "check_region_name",
    "shm_ref",
]
