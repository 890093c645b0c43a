"""The usage history, its forecasts and the eviction and prefetch choices, on a fake clock; the usage
file's round trip, and hostile usage files ignored with a warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kiln.serving import demand
from kiln.serving.demand import (
    DAY,
    HOUR,
    WEEK,
    Candidate,
    UsageHistory,
    plan_prefetch,
    usage_path,
    victims,
)

MONDAY = 4 * DAY + 2800 * WEEK  # a Monday, 00:00 UTC (the epoch fell on a Thursday)


class Clock:
    def __init__(self, t: float = MONDAY) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _history(clock: Clock, **kwargs: object) -> UsageHistory:
    return UsageHistory(clock, utc_offset_s=0, **kwargs)  # type: ignore[arg-type]


def _record(h: UsageHistory, clock: Clock, model: str, times: list[float]) -> None:
    for t in times:
        clock.t = t
        h.record(model, 1)


def _office_hours(weeks: int, every_s: float = 120.0) -> list[float]:
    """Monday to Friday, 09:00 to 17:00, one request every ``every_s``."""
    times = []
    for w in range(weeks):
        for d in range(5):
            start = MONDAY + w * WEEK + d * DAY + 9 * HOUR
            times += [start + i * every_s for i in range(int(8 * HOUR / every_s))]
    return times


def test_a_timer_is_forecast_when_it_is_due_and_not_between() -> None:
    clock = Clock()
    h = _history(clock)
    _record(h, clock, "timer", [MONDAY + i * 1200.0 for i in range(144)])  # every 20 minutes for two days
    last = clock.t
    just_fired = h.forecast("timer", 300, now=last + 60)
    due = h.forecast("timer", 300, now=last + 1150)
    assert just_fired.p < 0.05 and just_fired.trust > 0.9, just_fired
    assert due.p > 0.9, due
    assert "inter-arrival histogram" in due.reason


def test_office_hours_are_forecast_from_the_time_of_week() -> None:
    clock = Clock()
    h = _history(clock)
    _record(h, clock, "office", _office_hours(weeks=2))
    week3 = MONDAY + 2 * WEEK
    before_nine = h.forecast("office", 1800, now=week3 + 8 * HOUR + 50 * 60)
    night = h.forecast("office", 1800, now=week3 + 3 * HOUR)
    tuesday_night = h.forecast("office", 1800, now=week3 + DAY + 3 * HOUR)
    saturday = h.forecast("office", 1800, now=week3 - 2 * DAY + 10 * HOUR)
    assert before_nine.p > 0.9 and "time-of-week" in before_nine.reason, before_nine
    assert night.p < 0.05 and tuesday_night.p < 0.05 and saturday.p < 0.05, (night, tuesday_night, saturday)


def test_with_less_than_a_week_seen_the_hour_of_day_stands_for_it() -> None:
    clock = Clock()
    h = _history(clock)
    nightly = [MONDAY + d * DAY + 2 * HOUR + i * 30.0 for d in range(3) for i in range(60)]  # 02:00-02:30
    _record(h, clock, "nightly", nightly)
    thursday = MONDAY + 3 * DAY
    assert h.forecast("nightly", 1200, now=thursday + 1 * HOUR + 50 * 60).p > 0.9
    assert h.forecast("nightly", 1200, now=thursday + 14 * HOUR).p < 0.05


def test_a_burst_keeps_its_model_wanted_then_fades() -> None:
    clock = Clock()
    h = _history(clock)
    _record(h, clock, "bursty", [MONDAY + i for i in range(50)])
    assert h.forecast("bursty", 60, now=clock.t + 10).p > 0.9
    later = h.forecast("bursty", 60, now=clock.t + 6 * HOUR)
    assert later.p < 0.3 and later.rate_recent < 1e-6, later
    assert h.forecast("never-seen", 60).p == 0.0


def test_counts_decay_so_that_a_changed_pattern_takes_over() -> None:
    clock = Clock()
    h = _history(clock)
    nights = [MONDAY + d * DAY + 3 * HOUR + i * 120.0 for d in range(14) for i in range(30)]  # 03:00-04:00
    days = [MONDAY + d * DAY + 15 * HOUR + i * 120.0 for d in range(14, 42) for i in range(30)]  # then 15:00-16:00
    _record(h, clock, "m", nights + days)
    now = MONDAY + 42 * DAY
    at_night = h.forecast("m", 600, now=now + 3 * HOUR).p
    in_the_afternoon = h.forecast("m", 600, now=now + 15 * HOUR).p
    assert in_the_afternoon > 0.9 and at_night < in_the_afternoon / 3, (at_night, in_the_afternoon)


def test_the_history_keeps_a_bounded_number_of_models_the_most_recent() -> None:
    clock = Clock()
    h = _history(clock, max_models=3)
    for i in range(5):
        _record(h, clock, f"m{i}", [MONDAY + i * 10.0])
    assert sorted(h.models) == ["m2", "m3", "m4"]
    usage = h.models["m4"]
    assert len(usage.gaps) == demand.GAP_BINS and len(usage.week) == demand.WEEK_SLOTS
    for v in range(100):
        h.record("m4", v + 1)
    assert len(usage.versions) == demand.MAX_VERSIONS


# ---- the choices -------------------------------------------------------------------------------------------
def _c(name: str, nbytes: int, p: float, cost: float, last_used: float = 0.0) -> Candidate:
    return Candidate(name, nbytes, p, cost, last_used)


def test_eviction_weighs_predicted_demand_by_reload_cost_not_recency_alone() -> None:
    due = _c("due", 10, 0.9, 1.0, last_used=1)  # used longest ago, but due again soon
    idle = _c("idle", 10, 0.0, 1.0, last_used=5)
    cheap = _c("cheap", 10, 0.5, 0.01, last_used=9)  # wanted, but reloads in 10 ms
    loaded = [due, idle, cheap]
    assert victims(loaded, 10, 0, "lru") == [due]
    assert victims(loaded, 10, 0, "predictive") == [idle]
    assert victims(loaded, 20, 0, "predictive") == [idle, cheap]
    assert victims(loaded, 20, 20, "predictive") == []
    assert victims(loaded, 50, 0, "predictive") is None  # even all of them do not make room


def test_eviction_spares_a_victim_that_the_others_made_unnecessary() -> None:
    small = _c("small", 10, 0.0, 0.1)  # the first choice per byte, but too small alone
    big = _c("big", 30, 0.05, 3.0)
    assert victims([small, big], 30, 0, "predictive") == [big]


def test_prefetch_takes_free_room_and_displaces_only_what_is_worth_far_less() -> None:
    wanted = _c("x", 10, 0.8, 1.0)
    assert plan_prefetch([], [wanted], budget=10, min_p=0.3) == demand.Prefetch(wanted, [])
    assert plan_prefetch([], [wanted], budget=None, min_p=0.3) == demand.Prefetch(wanted, [])
    assert plan_prefetch([], [_c("unlikely", 10, 0.2, 1.0)], budget=10, min_p=0.3) is None
    assert plan_prefetch([], [_c("huge", 11, 0.9, 1.0)], budget=10, min_p=0.3) is None
    hot = _c("hot", 10, 0.9, 1.0)
    assert plan_prefetch([hot], [wanted], budget=10, min_p=0.3) is None  # no ping-pong with a busier model
    cold = _c("cold", 10, 0.1, 1.0)
    assert plan_prefetch([cold], [wanted], budget=10, min_p=0.3) == demand.Prefetch(wanted, [cold])
    slow = _c("slow", 10, 0.4, 10.0)  # less likely than x, but ten times as slow to load
    assert plan_prefetch([], [wanted, slow], budget=10, min_p=0.3) == demand.Prefetch(slow, [])


# ---- the usage file ----------------------------------------------------------------------------------------
def test_the_history_and_snapshot_survive_a_round_trip(tmp_path: Path) -> None:
    clock = Clock()
    h = _history(clock)
    _record(h, clock, "timer", [MONDAY + i * 1200.0 for i in range(100)])
    _record(h, clock, "office", _office_hours(weeks=1))
    h.load_took("timer", 0.25, 1234)
    path = usage_path(tmp_path)
    assert path == tmp_path / ".kiln" / "usage.json"
    h.save(path, h.dumps(loaded=["timer", "office"]))
    clock.t += 600
    again = _history(clock)
    assert again.read(path, known=lambda m: True) == ["timer", "office"]
    for model in ("timer", "office"):
        for ahead in (60.0, 1100.0, DAY / 2):
            now = clock.t + ahead
            before, after = h.forecast(model, 300, now=now), again.forecast(model, 300, now=now)
            assert after.p == pytest.approx(before.p, abs=1e-3), (model, ahead)
    assert again.reload_cost("timer", 1234) == 0.25 and again.known_bytes("timer") == 1234
    assert not list(path.parent.glob(".usage.json.*"))  # the temporary file was renamed into place


GOOD = {"first": MONDAY, "last": MONDAY + 10, "ref": MONDAY, "count": 2, "rate": 0.001, "gaps": [0, 1], "week": [2]}


def _doc(models: dict[str, object], loaded: object = ()) -> bytes:
    return json.dumps({"format": 1, "saved_at": MONDAY, "loaded": list(loaded), "models": models}).encode()  # type: ignore[call-overload]


HOSTILE = {
    "garbage": b"{ not json",
    "empty": b"",
    "a list": b"[1, 2, 3]",
    "another format": json.dumps({"format": 99, "models": {"m": GOOD}}).encode(),
    "a 5000-digit number": b'{"format": 1, "models": {"m": {"first": ' + b"9" * 5000 + b"}}}",
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "binary": bytes(range(256)),
}


@pytest.mark.parametrize("content", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_usage_file_that_is_not_one_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = usage_path(tmp_path)
    path.parent.mkdir()
    path.write_bytes(content)
    h = _history(Clock(MONDAY + DAY))
    with caplog.at_level(logging.WARNING, "kiln.serving"):
        assert h.read(path, known=lambda m: True) == []
    assert h.models == {}
    assert any("ignoring usage file" in r.getMessage() for r in caplog.records), caplog.text


def test_hostile_entries_are_skipped_with_a_warning_and_the_good_ones_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad_models: dict[str, object] = {
        "../outside": GOOD,
        ".kiln": GOOD,
        "a/b": GOOD,
        "": GOOD,
        "ghost": GOOD,  # not in the repository
        "inf": {**GOOD, "rate": 1e999},
        "huge": {**GOOD, "count": 10**30},
        "negative": {**GOOD, "gaps": [-1]},
        "long": {**GOOD, "week": [1] * 1000},
        "future": {**GOOD, "last": MONDAY + 400 * DAY},
        "backwards": {**GOOD, "first": MONDAY + 100},
        "text": {**GOOD, "gaps": "many"},
        "null": None,
        "versions": {**GOOD, "versions": {"../1": 3}},
    }
    known = {"m", *bad_models} - {"ghost"}
    path = usage_path(tmp_path)
    path.parent.mkdir()
    content = _doc({"m": GOOD, **bad_models}, loaded=["m", "../x", 7, None, "ghost", "m"])
    path.write_bytes(content.replace(b"Infinity", b"1e999"))
    h = _history(Clock(MONDAY + DAY))
    with caplog.at_level(logging.WARNING, "kiln.serving"):
        assert h.read(path, known=known.__contains__) == ["m"]
    assert list(h.models) == ["m"]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "ignored 18 entries" in warning and "'../outside' is not a model name" in warning, warning
    assert h.forecast("m", 60).p >= 0.0  # what was kept forecasts


def test_a_usage_file_behind_a_link_or_too_large_is_not_read_and_not_written_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "usage.json").write_bytes(_doc({"m": GOOD}))
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".kiln").symlink_to(elsewhere, target_is_directory=True)
    h = _history(Clock(MONDAY + DAY))
    with caplog.at_level(logging.WARNING, "kiln.serving"):
        assert h.read(usage_path(repo), known=lambda m: True) == []
    assert h.models == {} and "symbolic link" in caplog.text
    with pytest.raises(OSError, match="symbolic link"):
        h.save(usage_path(repo), h.dumps([]))
    plain = tmp_path / "plain"
    usage_path(plain).parent.mkdir(parents=True)
    usage_path(plain).write_bytes(_doc({"m": GOOD}))
    monkeypatch.setattr(demand, "MAX_FILE_BYTES", 100)
    with caplog.at_level(logging.WARNING, "kiln.serving"):
        assert h.read(usage_path(plain), known=lambda m: True) == []
    assert "more than 100" in caplog.text
