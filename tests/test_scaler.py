"""The autoscaling policy (``buildsvc.scaler``) on tables of cases: pure, no processes."""

from __future__ import annotations

import pytest

import buildsvc.scaler
from buildsvc.scaler import AppLoad, RunnerLoad, ScaleSettings, decide, desired_count

NOW = 1000.0


def _busy(rid: str, in_flight: int) -> RunnerLoad:
    return RunnerLoad(rid, in_flight, last_used=NOW, starting=False)


def _idle(rid: str, since: float) -> RunnerLoad:
    return RunnerLoad(rid, 0, last_used=NOW - since, starting=False)


def _starting(rid: str) -> RunnerLoad:
    return RunnerLoad(rid, 0, last_used=NOW, starting=True)


def test_public_surface() -> None:
    assert sorted(buildsvc.scaler.__all__) == [
        "AppLoad", "RunnerLoad", "ScaleDecision", "ScaleSettings", "decide", "desired_count",
    ]  # fmt: skip


# (settings, demand, desired)
DESIRED = [
    (ScaleSettings(), 0, 0),
    (ScaleSettings(), 3, 3),
    (ScaleSettings(max_multiplexing=2), 3, 2),
    (ScaleSettings(max_multiplexing=2), 4, 2),
    (ScaleSettings(max_concurrency=4, max_multiplexing=2), 100, 4),
    (ScaleSettings(min_concurrency=2), 0, 2),
    (ScaleSettings(min_concurrency=2), 5, 5),
    (ScaleSettings(concurrency_buffer=2), 0, 2),  # warm ahead of demand, even at zero load
    (ScaleSettings(concurrency_buffer=2), 3, 5),
    (ScaleSettings(concurrency_buffer_perc=50), 3, 5),  # 3 + ceil(1.5)
    (ScaleSettings(concurrency_buffer=1, concurrency_buffer_perc=50), 4, 6),  # larger: 2
    (ScaleSettings(concurrency_buffer=3, concurrency_buffer_perc=50), 4, 7),  # larger: 3
    (ScaleSettings(concurrency_buffer=5, max_concurrency=3), 1, 3),  # the cap wins
    (ScaleSettings(min_concurrency=1, concurrency_buffer_perc=10), 1, 2),  # ceil(0.1) = 1
]


@pytest.mark.parametrize(("settings", "demand", "want"), DESIRED)
def test_desired_count(settings: ScaleSettings, demand: int, want: int) -> None:
    assert desired_count(settings, demand) == want


# (settings, load, start, stop)
DECISIONS = [
    # a cold app with waiting requests starts what they need at once, up to the cap
    (ScaleSettings(max_concurrency=4, max_multiplexing=2), AppLoad([], waiting=100), 4, ()),
    (ScaleSettings(max_multiplexing=2), AppLoad([], waiting=3), 2, ()),
    # runners already starting count: no double start
    (ScaleSettings(), AppLoad([_starting("a"), _starting("b")], waiting=2), 0, ()),
    (ScaleSettings(), AppLoad([_busy("a", 1)], waiting=2), 2, ()),
    # scaling_delay: waiting requests count only after the delay (when a runner exists)
    (ScaleSettings(scaling_delay=5), AppLoad([_busy("a", 1)], 3, waiting_since=NOW - 1), 0, ()),
    (ScaleSettings(scaling_delay=5), AppLoad([_busy("a", 1)], 3, waiting_since=NOW - 6), 3, ()),
    (ScaleSettings(scaling_delay=5), AppLoad([], 1, waiting_since=NOW), 1, ()),  # none at all
    # keep_alive: expired idle runners go, the longest idle first, down to desired
    (ScaleSettings(keep_alive=10), AppLoad([_idle("a", 20), _idle("b", 30)]), 0, ("b", "a")),
    (ScaleSettings(keep_alive=10), AppLoad([_idle("a", 5)]), 0, ()),
    (ScaleSettings(keep_alive=10, min_concurrency=1),
     AppLoad([_idle("a", 20), _idle("b", 30)]), 0, ("b",)),
    (ScaleSettings(keep_alive=10, concurrency_buffer=1),
     AppLoad([_busy("x", 1), _idle("a", 20), _idle("b", 30)]), 0, ("b",)),
    # busy and starting runners are never stopped
    (ScaleSettings(keep_alive=0), AppLoad([_busy("a", 1), _starting("b")]), 0, ()),
    # a live scale-down: idle runners above max_concurrency go before keep_alive is up
    (ScaleSettings(max_concurrency=1, keep_alive=300),
     AppLoad([_idle("a", 1), _idle("b", 2), _idle("c", 3)]), 0, ("c", "b")),
    (ScaleSettings(max_concurrency=1, keep_alive=300),
     AppLoad([_busy("a", 1), _idle("b", 2)]), 0, ("b",)),
    # min_concurrency warms an app that has no traffic
    (ScaleSettings(min_concurrency=2), AppLoad([_idle("a", 100)]), 1, ()),
]  # fmt: skip


@pytest.mark.parametrize(("settings", "load", "start", "stop"), DECISIONS)
def test_decide(settings: ScaleSettings, load: AppLoad, start: int, stop: tuple[str, ...]) -> None:
    decision = decide(settings, load, NOW)
    assert (decision.start, decision.stop) == (start, stop)
    assert decision.desired <= settings.max_concurrency


def test_settings_from_options_fill_defaults_and_floor_bad_values() -> None:
    got = ScaleSettings.from_options({"max_concurrency": 0, "keep_alive": None,
                                      "scaling_delay": 3, "max_multiplexing": 4})  # fmt: skip
    assert got == ScaleSettings(max_concurrency=1, keep_alive=10, scaling_delay=3,
                                max_multiplexing=4)  # fmt: skip
