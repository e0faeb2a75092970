"""The breaker's state machine with a fake clock (pure logic; the real-server test is elsewhere)."""

from __future__ import annotations

from dbresilience._circuit_breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_short_burst_of_failures_does_not_open() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=3, min_duration=2.0, cooldown=5.0, clock=clock)
    for _ in range(10):  # many failures, but within one second (a restart)
        assert not b.record_failure()
        clock.now += 0.1
    assert b.state == "closed"
    b.record_success()
    clock.now += 5
    assert not b.record_failure()
    assert b.state == "closed"


def test_sustained_failures_open_then_one_probe_then_close() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=3, min_duration=2.0, cooldown=5.0, clock=clock)
    opened = []
    for _ in range(4):
        opened.append(b.record_failure())
        clock.now += 1.0
    assert opened == [False, False, True, False]
    assert b.state == "open" and b.times_opened == 1
    assert not b.allow()
    assert 0 < b.retry_after() <= 5.0
    clock.now += 5.0
    assert b.state == "half-open"
    assert b.allow()  # the probe
    assert not b.allow()  # everyone else still fails fast
    b.record_success()
    assert b.state == "closed" and b.allow()


def test_failed_probe_reopens_for_another_cooldown() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=1, min_duration=0.0, cooldown=5.0, clock=clock)
    assert b.record_failure()
    clock.now += 5.0
    assert b.allow()
    assert b.record_failure()
    assert b.state == "open" and b.times_opened == 2
    assert b.retry_after() == 5.0
