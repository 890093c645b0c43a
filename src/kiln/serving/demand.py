"""Usage history and demand forecasts: what the model manager prefetches and evicts by.

Per model, the requests seen are kept as fixed-size histograms, in the spirit of the hybrid-histogram
policy of Azure Functions (Shahrad et al., "Serverless in the Wild", ATC'20):

- inter-arrival times, in log-spaced bins from 10 ms to about ten days: given the time since the last
  request, the probability that the next one comes within the window (a timer every 20 minutes is not
  needed for the next 15 after it fired, and then is);
- counts per hour of the week (local time): the daily and weekly pattern (office hours, nightly jobs);
- an exponentially weighted recent rate: a burst keeps its model wanted.

Counts decay with a half-life of a week, so a pattern that changed takes over. The history is saved in
the repository, ``REPO/.kiln/usage.json`` (hidden: no model name may start with '.'), with a snapshot of
the models loaded, so a restart remembers both. A usage file that is garbage, hostile or stale is
ignored with a warning, never trusted: its names pass the model-name grammar and must be models of the
repository, its numbers are bounded.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.errors import InvalidNameError
from kiln.files import write_atomic
from kiln.repository import check_model_name

log = logging.getLogger("kiln.serving")

Eviction = Literal["lru", "predictive"]


class LoadOrigin(enum.StrEnum):
    """Why a model was loaded: what its first use (or its eviction unused) counts as."""

    REQUEST = "request"  # a request found it not loaded (lazy mode): a cold load on the request path
    PREFETCH = "prefetch"  # the forecast expects requests within the window
    RESTORE = "restore"  # it was loaded before the restart
    EXPLICIT = "explicit"  # preloaded at start, or POST …/load


HOUR, DAY, WEEK = 3600.0, 86400.0, 604800.0
GAP_MIN_S = 0.01  # the first inter-arrival bin holds every gap under GAP_MIN_S * GAP_GROWTH
GAP_GROWTH = 1.2  # each bin 20 % wider than the one before
GAP_BINS = 101  # 0.01 s ... 8.3e5 s (9.6 days), the last one open-ended
WEEK_SLOTS = 168  # hours of the week, Monday 00:00 first
HALF_LIFE_S = WEEK  # counts halve every week
RECENT_S = 900.0  # time constant of the recent rate
GAPS_TRUSTED = 2.0  # gaps longer than the time waited so far at which the histogram is half trusted
MAX_VERSIONS = 16  # versions counted per model
MAX_MODELS = 512  # models kept; the ones requested longest ago go first
FORMAT = 1
USAGE_DIR = ".kiln"  # hidden: the model-name grammar forbids a leading '.', so it is never a model
USAGE_FILE = "usage.json"
MAX_FILE_BYTES = 16 * 2**20
_MAX_COUNT = 1e12
_MAX_TIME = 1e11  # seconds since the epoch (year 5138): anything later is not a time
_LOG_GROWTH = math.log(GAP_GROWTH)
_THURSDAY_H = 72  # the epoch fell on a Thursday: hours to add so that slot 0 is a Monday


def usage_path(root: Path) -> Path:
    return root / USAGE_DIR / USAGE_FILE


def gap_bin(gap: float) -> int:
    if gap < GAP_MIN_S * GAP_GROWTH:
        return 0
    return min(GAP_BINS - 1, int(math.log(gap / GAP_MIN_S) / _LOG_GROWTH))


def _bin_bounds(i: int) -> tuple[float, float]:
    lo = 0.0 if i == 0 else GAP_MIN_S * GAP_GROWTH**i
    hi = math.inf if i == GAP_BINS - 1 else GAP_MIN_S * GAP_GROWTH ** (i + 1)
    return lo, hi


_BOUNDS = [_bin_bounds(i) for i in range(GAP_BINS)]


def _above(counts: Sequence[float], x: float) -> float:
    """The weight of gaps longer than ``x``: whole bins above it, and the part of its own bin above it
    (uniform within a bin: linear for the first, in log space for the others; the open-ended last bin
    counts whole, as what it holds cannot be told apart)."""
    i = gap_bin(x)
    lo, hi = _BOUNDS[i]
    total = math.fsum(counts[i + 1 :])
    c = counts[i]
    if c:
        if hi == math.inf:
            total += c
        elif i == 0:
            total += c * (hi - x) / hi
        else:
            total += c * math.log(hi / x) / math.log(hi / lo)
    return total


@dataclass
class Forecast:
    """The demand expected for one model over the next ``window_s``."""

    p: float  # probability of at least one request within the window
    window_s: float
    p_gaps: float = 0.0  # what the inter-arrival histogram says
    trust: float = 0.0  # how far it is trusted (0..1), by the gaps it holds past the wait and its resolution
    gaps: float = 0.0  # the (decayed) gaps longer than the time waited so far
    rate_pattern: float = 0.0  # requests/s expected from the hour-of-week (or hour-of-day) counts
    rate_recent: float = 0.0  # requests/s, the recent rate decayed to now

    @property
    def reason(self) -> str:
        if self.trust >= 0.5:
            why = f"inter-arrival histogram {self.p_gaps:.2f} ({self.gaps:.0f} gaps this long)"
        elif self.rate_pattern >= self.rate_recent and self.rate_pattern > 0:
            why = f"time-of-week pattern {self.rate_pattern * HOUR:.1f}/h"
        elif self.rate_recent > 0:
            why = f"recent rate {self.rate_recent * HOUR:.1f}/h"
        else:
            why = "no recent or regular use"
        return f"p={self.p:.2f} within {self.window_s:g} s: {why}"


NO_DEMAND = Forecast(0.0, 0.0)


@dataclass
class ModelUsage:
    """One model's requests as fixed-size, decaying histograms. Weights are kept relative to ``ref``:
    a request at ``t`` adds 2**((t - ref) / HALF_LIFE_S), and the arrays are rescaled to ``t`` now and
    then, so decay costs nothing per request."""

    first: float
    last: float | None = None
    ref: float = 0.0
    count: int = 0
    rate: float = 0.0  # recent rate at ``last`` (requests/s)
    gaps: list[float] = field(default_factory=lambda: [0.0] * GAP_BINS)
    week: list[float] = field(default_factory=lambda: [0.0] * WEEK_SLOTS)
    versions: dict[int, float] = field(default_factory=dict)
    load_s: float | None = None  # measured load (and warm-up) time, smoothed
    nbytes: int | None = None  # memory estimate when last loaded

    def __post_init__(self) -> None:
        if not self.ref:
            self.ref = self.first

    def record(self, t: float, version: int, offset_s: float) -> None:
        if t - self.ref > HALF_LIFE_S / 16:
            self._rescale(t)
        w = 2.0 ** ((t - self.ref) / HALF_LIFE_S)
        if self.last is not None:
            gap = max(0.0, t - self.last)
            self.gaps[gap_bin(gap)] += w
            self.rate = self.rate * math.exp(-gap / RECENT_S) + 1.0 / RECENT_S
        else:
            self.rate = 1.0 / RECENT_S
        self.last = max(t, self.last or t)
        self.week[int((t + offset_s) // HOUR + _THURSDAY_H) % WEEK_SLOTS] += w
        self.count += 1
        if version in self.versions or len(self.versions) < MAX_VERSIONS:
            self.versions[version] = self.versions.get(version, 0.0) + w
        else:  # a new version replaces the least requested one
            del self.versions[min(self.versions, key=self.versions.__getitem__)]
            self.versions[version] = w

    def _rescale(self, t: float) -> None:
        k = 2.0 ** (-(t - self.ref) / HALF_LIFE_S)
        self.gaps = [c * k for c in self.gaps]
        self.week = [c * k for c in self.week]
        self.versions = {v: c * k for v, c in self.versions.items()}
        self.ref = t

    def load_took(self, seconds: float, nbytes: int) -> None:
        self.load_s = seconds if self.load_s is None else 0.5 * (self.load_s + seconds)
        self.nbytes = nbytes

    def forecast(self, now: float, window_s: float, offset_s: float) -> Forecast:
        if self.last is None:
            return Forecast(0.0, window_s)
        scale = min(1.0, 2.0 ** (-(now - self.ref) / HALF_LIFE_S))
        waited = max(0.0, now - self.last)
        # 1) the inter-arrival histogram: P(gap <= waited + window | gap > waited)
        survivors = _above(self.gaps, waited)
        p_gaps, trust, gaps = 0.0, 0.0, survivors * scale
        if survivors > 0:
            p_gaps = max(0.0, min(1.0, (survivors - _above(self.gaps, waited + window_s)) / survivors))
            lo, hi = _BOUNDS[gap_bin(waited)]
            resolution = min(1.0, window_s / (hi - lo))  # a bin much wider than the window cannot time it
            trust = resolution * gaps / (gaps + GAPS_TRUSTED)
        # 2) the rates: the hour-of-week pattern over the window, and the recent rate
        pattern = self._pattern_rate(now, window_s, offset_s, scale)
        recent = self.rate * math.exp(-waited / RECENT_S)
        p_rate = 1.0 - math.exp(-max(pattern, recent) * window_s)
        p = trust * p_gaps + (1.0 - trust) * p_rate
        return Forecast(p, window_s, p_gaps, trust, gaps, pattern, recent)

    def _pattern_rate(self, now: float, window_s: float, offset_s: float, scale: float) -> float:
        """Requests/s expected over [now, now + window] from the counts per hour of the week (of the day
        while less than a week was seen; the mean rate while less than a day was)."""
        span = max(0.0, now - self.first)
        exposure = HALF_LIFE_S / math.log(2) * (1.0 - 2.0 ** (-span / HALF_LIFE_S))  # decayed seconds seen
        if span < DAY:
            return math.fsum(self.week) * scale / max(exposure, HOUR)
        if span >= WEEK:
            slots, per = self.week, WEEK_SLOTS
        else:
            slots, per = [math.fsum(self.week[h::24]) for h in range(24)], 24
        t, end, total = now, now + window_s, 0.0
        for _ in range(WEEK_SLOTS + 1):  # a window longer than a week: its first week stands for the rest
            if t >= end:
                break
            hour = (t + offset_s) // HOUR
            until = min(end, (hour + 1) * HOUR - offset_s)
            slot = int(hour + _THURSDAY_H) % WEEK_SLOTS % per
            total += slots[slot] * (until - t)
            t = until
        return total / max(t - now, 1e-9) * scale * per / exposure


def _local_offset() -> float:
    return float(time.localtime().tm_gmtoff)


class UsageHistory:
    """The usage of every model the server has seen: recorded on the request path (cheaply), read by
    the prefetcher and the eviction choice, saved to and restored from the repository."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        max_models: int = MAX_MODELS,
        utc_offset_s: float | None = None,
    ) -> None:
        self.clock = clock  # seconds since the epoch (the hour of the week is read from it)
        self.max_models = max_models
        self.offset_s = _local_offset() if utc_offset_s is None else utc_offset_s
        self.models: dict[str, ModelUsage] = {}
        self.dirty = False

    def now(self) -> float:
        return self.clock()

    def record(self, model: str, version: int) -> None:
        """One request (the hot path: a few float operations)."""
        t = self.clock()
        usage = self.models.get(model)
        if usage is None:
            usage = self._add(model, t)
        usage.record(t, version, self.offset_s)
        self.dirty = True

    def _add(self, model: str, t: float) -> ModelUsage:
        if len(self.models) >= self.max_models:
            stale = min(self.models, key=lambda m: self.models[m].last or self.models[m].first)
            del self.models[stale]
        usage = self.models[model] = ModelUsage(first=t)
        return usage

    def load_took(self, model: str, seconds: float, nbytes: int) -> None:
        usage = self.models.get(model) or self._add(model, self.clock())
        usage.load_took(seconds, nbytes)
        self.dirty = True

    def forecast(self, model: str, window_s: float, now: float | None = None) -> Forecast:
        usage = self.models.get(model)
        if usage is None:
            return Forecast(0.0, window_s)
        return usage.forecast(self.clock() if now is None else now, window_s, self.offset_s)

    def reload_cost(self, model: str, nbytes: int) -> float:
        """Seconds a load of ``model`` takes: measured, else estimated from its size (200 MiB/s + 50 ms)."""
        usage = self.models.get(model)
        if usage is not None and usage.load_s is not None:
            return usage.load_s
        return 0.05 + nbytes / (200 * 2**20)

    def known_bytes(self, model: str) -> int | None:
        usage = self.models.get(model)
        return None if usage is None else usage.nbytes

    def forget(self, models: Iterable[str]) -> None:
        for m in models:
            self.models.pop(m, None)

    # ---- persistence ---------------------------------------------------------------------------------------
    def document(self, loaded: Sequence[str]) -> dict[str, Any]:
        """What the usage file holds: copies, so that it can be encoded in another thread."""
        models = {name: _encode(u) for name, u in self.models.items()}
        return {"format": FORMAT, "saved_at": self.clock(), "loaded": list(loaded), "models": models}

    def dumps(self, loaded: Sequence[str]) -> str:
        return json.dumps(self.document(loaded))

    def save(self, path: Path, text: str) -> None:
        """Write ``text`` (from :meth:`dumps`) atomically; the directory must be the repository's own."""
        directory = path.parent
        if directory.is_symlink():
            raise OSError(f"{directory} is a symbolic link; the usage file is only written to a real directory")
        directory.mkdir(exist_ok=True)
        write_atomic(path, text)

    def read(self, path: Path, known: Callable[[str], bool]) -> list[str]:
        """Merge the history saved at ``path`` (models already seen here win) and return its snapshot of
        loaded models. Anything wrong with the file is logged as a warning and skipped."""
        raw = _read_bounded(path)
        if raw is None:
            return []
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # bad JSON, a 5000-digit number, nesting 10^5 deep
            log.warning("ignoring usage file %s: it is not JSON (%s)", path, str(exc)[:120])
            return []
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            log.warning("ignoring usage file %s: not a kiln usage file of format %d", path, FORMAT)
            return []
        problems: list[str] = []
        now = self.clock()
        models = doc.get("models")
        records: list[tuple[str, ModelUsage]] = []
        for name, value in models.items() if isinstance(models, dict) else ():
            why = _name_problem(name, known)
            if why is None:
                try:
                    usage = _decode(value, now)
                except (ValidationError, ValueError) as exc:
                    why = f"{short(name)}: {str(exc).splitlines()[0][:100]}"
                else:
                    records.append((name, usage))
            if why is not None:
                problems.append(why)
        records.sort(key=lambda r: r[1].last or r[1].first, reverse=True)
        for name, usage in records[: max(0, self.max_models - len(self.models))]:
            self.models.setdefault(name, usage)
        loaded = doc.get("loaded")
        snapshot: list[str] = []
        for name in loaded if isinstance(loaded, list) else ():
            why = _name_problem(name, known)
            if why is None and name not in snapshot:
                snapshot.append(name)
            elif why is not None:
                problems.append(why)
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            log.warning("usage file %s: ignored %d entries: %s", path, len(problems), shown)
        return snapshot


def short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _name_problem(name: object, known: Callable[[str], bool]) -> str | None:
    try:
        if not isinstance(name, str):
            raise InvalidNameError("model name", short(name), "is not a string")
        check_model_name(name)
    except InvalidNameError:
        return f"{short(name)} is not a model name"
    try:
        present = known(name)
    except Exception:  # an unreadable model directory: not one to trust
        present = False
    return None if present else f"{short(name)} is not in the repository"


def _read_bounded(path: Path) -> bytes | None:
    """The file's bytes, or None when it is absent, not a plain file, a link, or too large (warned)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):  # no history yet (or no repository: the server says so)
        return None
    except OSError as exc:
        log.warning("ignoring usage file %s: cannot open it (%s)", path, exc.strerror or exc)
        return None
    try:
        import stat

        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.warning("ignoring usage file %s: not a regular file", path)
            return None
        if st.st_size > MAX_FILE_BYTES:
            log.warning("ignoring usage file %s: %d bytes, more than %d", path, st.st_size, MAX_FILE_BYTES)
            return None
        if path.parent.is_symlink():
            log.warning("ignoring usage file %s: its directory is a symbolic link", path)
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES]
    except OSError as exc:
        log.warning("ignoring usage file %s: cannot read it (%s)", path, exc.strerror or exc)
        return None
    finally:
        os.close(fd)


# ---- the file's records: bounded numbers, fixed lengths ----------------------------------------------------
_Count = Annotated[float, Field(ge=0, le=_MAX_COUNT, allow_inf_nan=False)]
_Time = Annotated[float, Field(ge=0, le=_MAX_TIME, allow_inf_nan=False)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    first: _Time
    last: _Time | None = None
    ref: _Time
    count: Annotated[int, Field(ge=0, le=int(_MAX_COUNT))] = 0
    rate: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] = 0.0
    gaps: list[_Count] = Field(default_factory=list, max_length=GAP_BINS)
    week: list[_Count] = Field(default_factory=list, max_length=WEEK_SLOTS)
    versions: dict[Annotated[str, Field(pattern=r"^[0-9]{1,18}$")], _Count] = Field(
        default_factory=dict, max_length=MAX_VERSIONS
    )
    load_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] | None = None
    bytes: Annotated[int, Field(ge=0, le=2**50)] | None = None


def _trim(values: list[float]) -> list[float]:
    out = [round(v, 4) for v in values]
    while out and out[-1] == 0:
        out.pop()
    return out


def _encode(u: ModelUsage) -> dict[str, Any]:
    return {
        "first": u.first, "last": u.last, "ref": u.ref, "count": u.count, "rate": u.rate,
        "gaps": _trim(u.gaps), "week": _trim(u.week), "versions": {str(v): round(c, 4) for v, c in u.versions.items()},
        "load_s": u.load_s, "bytes": u.nbytes,
    }  # fmt: skip


def _decode(value: object, now: float) -> ModelUsage:
    r = _Record.model_validate(value)
    latest = max(r.first, r.ref, r.last or 0.0)
    if latest > now + DAY:
        raise ValueError(f"times up to {latest:.0f}, later than now ({now:.0f})")
    if r.last is not None and r.last < r.first:
        raise ValueError("its last request precedes its first")
    return ModelUsage(
        first=r.first, last=r.last, ref=r.ref, count=r.count, rate=r.rate,
        gaps=r.gaps + [0.0] * (GAP_BINS - len(r.gaps)), week=r.week + [0.0] * (WEEK_SLOTS - len(r.week)),
        versions={int(v): c for v, c in r.versions.items()}, load_s=r.load_s, nbytes=r.bytes,
    )  # fmt: skip


# ---- choices: which models to evict, which to prefetch ----------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A model as the eviction and prefetch choices see it."""

    name: str
    nbytes: int
    p: float  # probability of a request within the window
    cost_s: float  # what a load costs (measured load time)
    last_used: float = 0.0
    reason: str = ""

    @property
    def value(self) -> float:
        """The cold-load seconds that keeping it loaded is expected to save within the window."""
        return self.p * self.cost_s

    @property
    def density(self) -> float:
        return self.value / max(self.nbytes, 1)


def victims(loaded: Sequence[Candidate], need: int, free: int, policy: Eviction) -> list[Candidate] | None:
    """Which of ``loaded`` to unload so that ``need`` bytes fit beside ``free``; None if even all do not.

    ``lru``: the least recently used first. ``predictive``: the lowest expected value per byte freed first
    (predicted demand × reload cost / size; ties: least recently used), then any victim the others made
    unnecessary is spared (highest value first).
    """
    if free >= need:
        return []
    if policy == "lru":
        order = sorted(loaded, key=lambda c: c.last_used)
    else:
        order = sorted(loaded, key=lambda c: (c.density, c.last_used))
    chosen: list[Candidate] = []
    for c in order:
        if free >= need:
            break
        chosen.append(c)
        free += c.nbytes
    if free < need:
        return None
    if policy == "predictive":
        for c in sorted(chosen, key=lambda c: c.value, reverse=True):
            if free - c.nbytes >= need:
                chosen.remove(c)
                free -= c.nbytes
    return chosen


@dataclass(frozen=True)
class Prefetch:
    model: Candidate
    evict: list[Candidate]


def plan_prefetch(
    loaded: Sequence[Candidate],
    wanted: Sequence[Candidate],
    budget: int | None,
    min_p: float,
    margin: float = 2.0,
) -> Prefetch | None:
    """The next model worth loading ahead of demand, and what it would displace; None if none is.

    Candidates go in order of the cold-load time they are expected to save. One is worth it when its
    forecast reaches ``min_p``, it fits the budget, and what it displaces is expected to save less than
    ``1 / margin`` of what it does (so that two models do not take turns evicting each other).
    """
    free = math.inf if budget is None else budget - sum(c.nbytes for c in loaded)
    for cand in sorted(wanted, key=lambda c: (c.value, c.p), reverse=True):
        if cand.p < min_p or (budget is not None and cand.nbytes > budget):
            continue
        if free >= cand.nbytes:
            return Prefetch(cand, [])
        chosen = victims(loaded, cand.nbytes, int(free), "predictive")
        if chosen is None:
            continue
        if all(v.p < cand.p for v in chosen) and sum(v.value for v in chosen) * margin <= cand.value:
            return Prefetch(cand, chosen)
    return None
