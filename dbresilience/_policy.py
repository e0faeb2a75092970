"""The policy: every tunable of dbresilience, validated, in one frozen object.

All durations are in **seconds** (floats). Waits between attempts use exponential backoff with
full jitter: attempt *n* sleeps ``uniform(0, min(wait_max, wait_initial * 2**n))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["Policy"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Policy:
    """How a resilient engine connects, detects dead connections and retries.

    Connecting (new connections, for every checkout that needs one):

    :param connect_timeout: libpq ``connect_timeout`` per host and attempt (libpq's minimum is
        2 s). Default 5 s: a reachable server answers in milliseconds; 5 s rides out a SYN lost
        once, without letting a blackholed host eat the whole connect deadline.
    :param connect_deadline: total time spent retrying a refused / starting-up connect before
        the error reaches the caller. Default 10 s: longer than a typical restart (1-3 s) or
        automated failover of a small cluster, short enough for an HTTP request budget.
    :param connect_wait_initial: first backoff step between connect attempts. Default 0.02 s.
    :param connect_wait_max: cap of the connect backoff. Default 0.25 s, so a server that comes
        back is noticed within about a quarter of a second.

    Dead-connection detection:

    :param liveness_window: a pooled connection checked out less than this long ago is handed
        out again after only asking its driver whether it knows the connection closed (HikariCP
        skips checks for 0.5 s, Rails 2 s). Older ones also get a zero-round-trip socket check
        (a socket with unread bytes while idle means the server hung up; only then is a real
        ping sent). Default 0.5 s.
    :param replay_first_statement: when the first statement of a transaction fails because the
        connection was already dead, reconnect and run that statement once more. Never done in
        autocommit mode unless the execution is marked ``dbresilience_idempotent=True``.
        Default True.

    Network defaults applied to psycopg connections unless the URL / ``connect_args`` set them:

    :param keepalives_idle: idle time before the first TCP keepalive probe. Default 10 s.
    :param keepalives_interval: time between unanswered probes. Default 5 s.
    :param keepalives_count: unanswered probes before the kernel drops the connection.
        Default 3: a silently dead idle peer is noticed after about 10 + 3 * 5 = 25 s.
    :param tcp_user_timeout: how long sent data may stay unacknowledged before the kernel drops
        the connection (libpq ``tcp_user_timeout``). Default 30 s.

    asyncpg has none of these connect options: its connect timeout is ``connect_timeout``, and
    the four settings above are applied to the socket (``SO_KEEPALIVE``, ``TCP_KEEPIDLE``,
    ``TCP_KEEPINTVL``, ``TCP_KEEPCNT``, ``TCP_USER_TIMEOUT``) right after it connects.

    Hang detection (the hang monitor, one per engine and server address):

    :param hang_threshold: a call waiting for the server longer than this is looked into,
        through a separate monitoring connection (never from the app's pool): if the server
        says that connection's backend is still running the statement or waiting on a lock, it
        is a slow query and is left alone; if the backend is idle, gone or stuck sending to
        the client, the link is dead and that connection is aborted at once; if the server
        does not answer ``hang_probes`` probes of ``hang_probe_timeout`` each, the host is hung:
        every call in flight to it is aborted and the pool's connections are replaced.
        Behind a pooler (backend pids are the pooler's) only the host-level probe is made.
        Default 1 s, so a frozen server or a blackholed link costs seconds, not minutes;
        0 turns the monitor off.
    :param hang_probe_timeout: bound of one probe (connect included). Default 0.5 s.
    :param hang_probes: failed probes in a row before the host is declared hung. Default 2.
    :param command_timeout: optional hard cap on each statement, COMMIT and ROLLBACK waiting
        for the server, whatever the hang monitor says: past it a watchdog shuts the socket
        down and sends a cancel request; the call fails with :class:`StatementTimeout` (never
        replayed, not retried; during COMMIT the outcome is verified). Default 300 s: hangs are
        the monitor's job, in seconds; this only bounds what the monitor cannot judge (a single
        dead link behind a pooler) without cutting legitimate reports and migrations that run
        for minutes. 0 turns it off. asyncpg's own ``command_timeout`` (``connect_args``) is
        not set by default: it costs a timer per message; when the application sets it,
        expiry sends a cancel request and the caller gets :class:`StatementTimeout` (not
        retried), the connection discarded.

    Retrying whole transactions (``run_transaction``):

    :param attempts: total attempts including the first. Default 10. Failures of kind
        ``unavailable`` (the server or PgBouncer says it cannot serve; nothing ran) do not end
        the loop by count, only by ``deadline``, as connect retries.
    :param deadline: overall budget for all attempts and waits. Default 30 s.
    :param wait_initial: first backoff step. Default 0.05 s.
    :param wait_max: backoff cap. Default 1 s.
    :param verify_commits: record the transaction id before COMMIT and, if the connection dies
        during COMMIT, ask the server whether it committed instead of guessing. Default True.
    :param circuit_breaker: fail fast with ``CircuitOpen`` while the server is down. While
        open, the breaker lets one probe connect through at a time, at the connect backoff's
        pace (full jitter, ``connect_wait_initial`` doubling up to ``connect_wait_max``), so
        the server sees a few attempts per second whatever the number of callers, and a
        server that comes back is noticed within about ``connect_wait_max``. Default True.
    :param breaker_failures: consecutive failed connect attempts before the breaker opens.
        Default 5.
    :param breaker_min_duration: ...and the failures must have lasted this long, so a quick
        restart (1-3 s) never opens it. Default 3 s.
    :param commit_check_timeout: bound for resolving one ambiguous commit (reconnect and ask,
        waiting while the transaction is still "in progress"). Default 10 s.
    """

    connect_timeout: float = 5.0
    connect_deadline: float = 10.0
    connect_wait_initial: float = 0.02
    connect_wait_max: float = 0.25
    liveness_window: float = 0.5
    replay_first_statement: bool = True
    keepalives_idle: float = 10.0
    keepalives_interval: float = 5.0
    keepalives_count: int = 3
    tcp_user_timeout: float = 30.0
    command_timeout: float = 300.0
    hang_threshold: float = 1.0
    hang_probe_timeout: float = 0.5
    hang_probes: int = 2
    attempts: int = 10
    deadline: float = 30.0
    wait_initial: float = 0.05
    wait_max: float = 1.0
    verify_commits: bool = True
    commit_check_timeout: float = 10.0
    circuit_breaker: bool = True
    breaker_failures: int = 5
    breaker_min_duration: float = 3.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ValueError(f"Policy.{f.name} must be a bool, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Policy.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"Policy.{f.name} must be finite, got {value!r}")
            if f.type in ("int", int):
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"Policy.{f.name} must be an integer >= 1, got {value!r}")
            elif value < 0:
                raise ValueError(f"Policy.{f.name} must be >= 0 seconds, got {value!r}")
        if self.connect_timeout < 2:
            raise ValueError(
                f"Policy.connect_timeout must be >= 2 seconds (libpq's minimum), "
                f"got {self.connect_timeout!r}"
            )
        if self.connect_wait_max < self.connect_wait_initial:
            raise ValueError("Policy.connect_wait_max must be >= connect_wait_initial")
        if self.wait_max < self.wait_initial:
            raise ValueError("Policy.wait_max must be >= wait_initial")
        if self.hang_threshold and self.hang_probe_timeout <= 0:
            raise ValueError("Policy.hang_probe_timeout must be > 0 seconds when hang_threshold is")
        if self.deadline <= 0:
            raise ValueError(f"Policy.deadline must be > 0 seconds, got {self.deadline!r}")
