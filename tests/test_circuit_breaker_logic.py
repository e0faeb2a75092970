"""The breaker's state machine with a fake clock (pure logic; the real-server tests are in
test_outage_recovery.py and test_bounded_waits.py)."""

from __future__ import annotations

import threading

import pytest
from _support import join_all

from dbresilience._circuit_breaker import CircuitBreaker

INITIAL = 0.02
MAXIMUM = 0.25


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def opened(clock: Clock) -> CircuitBreaker:
    """A breaker that opened on its first failure, at ``clock.now``."""
    b = CircuitBreaker(
        failures=1,
        min_duration=0.0,
        probe_wait_initial=INITIAL,
        probe_wait_max=MAXIMUM,
        clock=clock,
    )
    assert b.record_failure()
    return b


def take_slot(b: CircuitBreaker, clock: Clock) -> float:
    """Advance the clock to the next probe slot, take it; return how long that was."""
    waited = b.retry_after()
    clock.now += waited
    assert b.allow()
    return waited


def test_short_burst_of_failures_does_not_open() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=3, min_duration=2.0, clock=clock)
    for _ in range(10):  # many failures, but within one second (a restart)
        assert not b.record_failure()
        clock.now += 0.1
    assert b.state == "closed"
    b.record_success()
    clock.now += 5
    assert not b.record_failure()
    assert b.state == "closed"
    assert b.allow() and not b.rejecting() and b.retry_after() == 0.0


def test_sustained_failures_open_and_reject_until_the_first_slot() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=3, min_duration=2.0, clock=clock)
    results = []
    for _ in range(4):
        results.append(b.record_failure())
        clock.now += 1.0
    # Opened on the third failure (3 failures spanning 2 s); the fourth, a straggler, keeps it
    # open without opening it again.
    assert results == [False, False, True, False]
    assert b.times_opened == 1
    clock.now -= 1.0  # back to the fourth failure's time
    wait = b.retry_after()
    assert 0.0 <= wait <= INITIAL * 2  # after one failure while open: the second backoff step
    if wait > 0:
        assert b.state == "open" and b.rejecting() and not b.allow()
    clock.now += wait
    assert b.state == "half-open" and not b.rejecting()


def test_first_slot_comes_within_probe_wait_initial_of_opening() -> None:
    for _ in range(200):
        clock = Clock()
        b = opened(clock)
        assert 0.0 <= b.retry_after() <= INITIAL
        assert b.probes == 0


def test_one_probe_at_a_time_and_its_success_closes() -> None:
    clock = Clock()
    b = opened(clock)
    take_slot(b, clock)
    assert b.probes == 1
    assert b.state == "half-open"
    assert b.rejecting()  # everyone else fails fast...
    assert not b.allow()  # ...and cannot take a second slot
    clock.now += 10.0  # however long the probe takes
    assert not b.allow() and b.rejecting()
    assert b.retry_after() == INITIAL  # waiters poll, to see the probe's success soon
    b.record_success()
    assert b.state == "closed" and b.allow() and not b.rejecting()
    assert b.retry_after() == 0.0
    assert b.times_opened == 1


def test_failed_probe_schedules_the_next_slot_after_a_wait_from_its_end() -> None:
    clock = Clock()
    b = opened(clock)
    take_slot(b, clock)
    clock.now += 0.5  # the probe takes half a second to fail
    assert not b.record_failure()  # does not open again: it stays open
    assert b.times_opened == 1
    wait = b.retry_after()
    assert 0.0 <= wait <= 2 * INITIAL
    if wait > 0:
        assert b.rejecting() and not b.allow() and b.state == "open"
    clock.now += wait
    assert not b.rejecting() and b.allow()
    assert b.probes == 2


def test_probe_waits_follow_full_jitter_exponential_backoff() -> None:
    # Bounds: after the n-th failed probe the wait is uniform(0, min(max, initial * 2**n)).
    highs = [min(MAXIMUM, INITIAL * 2**n) for n in range(12)]
    samples: list[list[float]] = [[] for _ in highs]
    for _ in range(300):
        clock = Clock()
        b = opened(clock)
        for n, _high in enumerate(highs):
            samples[n].append(take_slot(b, clock))
            assert not b.record_failure()
    for n, (high, waits) in enumerate(zip(highs, samples, strict=True)):
        assert all(0.0 <= w <= high for w in waits), n
        # Full jitter: spread over the whole range, not bunched at either end.
        assert min(waits) < 0.1 * high and max(waits) > 0.9 * high, n
        assert 0.4 * high < sum(waits) / len(waits) < 0.6 * high, n
    assert highs[-1] == MAXIMUM  # capped


def test_probe_rate_does_not_depend_on_the_number_of_callers() -> None:
    # 20 callers try every 5 ms (fake) for 30 s; probes fail at once. At the cap, probes come
    # about every probe_wait_max / 2 on average: ~8 per second, with 1 caller or 1000.
    clock = Clock()
    b = opened(clock)
    start = clock.now
    while clock.now - start < 30.0:
        for _ in range(20):
            if not b.rejecting() and b.allow():
                assert not b.record_failure()
        clock.now += 0.005
    rate = b.probes / 30.0
    assert 6.0 < rate < 10.5, rate
    assert b.times_opened == 1


def test_abandoned_probe_frees_the_slot_at_once() -> None:
    clock = Clock()
    b = opened(clock)
    take_slot(b, clock)
    assert not b.allow()
    b.abandon()  # the probe was cancelled: no verdict on the server
    assert not b.rejecting() and b.allow()  # another caller probes right away
    assert b.probes == 2
    b.record_success()
    assert b.state == "closed"
    b.abandon()  # harmless when closed
    assert b.state == "closed"


def test_success_resets_the_backoff_and_reopening_counts() -> None:
    clock = Clock()
    b = opened(clock)
    for _ in range(10):  # the backoff grows to its cap
        take_slot(b, clock)
        b.record_failure()
    take_slot(b, clock)
    b.record_success()
    assert b.state == "closed"
    assert b.record_failure()  # failures=1, min_duration=0: opens again
    assert b.times_opened == 2
    assert 0.0 <= b.retry_after() <= INITIAL  # the backoff starts over


def test_a_straggler_success_closes_it() -> None:
    # An attempt that began before the breaker opened reaches the server: it is up.
    clock = Clock()
    b = opened(clock)
    b.record_success()
    assert b.state == "closed" and not b.rejecting()


def test_zero_initial_wait_still_polls() -> None:
    clock = Clock()
    b = CircuitBreaker(
        failures=1, min_duration=0.0, probe_wait_initial=0.0, probe_wait_max=0.0, clock=clock
    )
    assert b.record_failure()
    assert b.retry_after() == 0.0 and b.allow()
    assert b.retry_after() > 0.0  # a probe in flight: never a busy loop for the waiters


def test_bad_waits_are_refused() -> None:
    with pytest.raises(ValueError, match="probe_wait"):
        CircuitBreaker(probe_wait_initial=0.5, probe_wait_max=0.25)
    with pytest.raises(ValueError, match="probe_wait"):
        CircuitBreaker(probe_wait_initial=-1.0)


def test_concurrent_callers_get_one_probe_per_slot() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now += MAXIMUM  # the first slot has come
    winners: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def caller() -> None:
        barrier.wait()
        got = b.allow()
        with lock:
            winners.append(got)

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    join_all(threads, timeout=10)
    assert len(winners) == 16
    assert winners.count(True) == 1
    assert b.probes == 1
