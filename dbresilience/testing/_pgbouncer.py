"""A real PgBouncer in front of a :class:`PostgresCluster`, for tests and demos.

Runs the system's ``pgbouncer`` binary (Debian package ``pgbouncer``) on ``127.0.0.1`` on a
free port, with trust authentication, forwarding every database to one server. PgBouncer
refuses to run as root, so as root it runs as the same unprivileged user as the cluster.
:meth:`PgBouncer.restart` (the pooler itself going away) and :meth:`PgBouncer.admin` (its
console: ``RECONNECT``, ``KILL``, ``PAUSE``...) are the faults it adds.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

from dbresilience.testing._cluster import (
    _SYSTEM_USER,
    PostgresCluster,
    _ensure_system_user,
    free_port,
)

__all__ = ["PgBouncer", "find_pgbouncer"]

PoolMode = Literal["session", "transaction", "statement"]


def find_pgbouncer() -> Path | None:
    """The ``pgbouncer`` binary on ``PATH`` (or Debian's ``/usr/sbin``), or ``None``."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    return Path(found) if found else None


class PgBouncer:
    """One real PgBouncer process forwarding to ``cluster``.

    :param cluster: the server behind it (started or not: PgBouncer connects lazily).
    :param pool_mode: PgBouncer's ``pool_mode``; default ``transaction``, the usual one.
    :param settings: extra ``[pgbouncer]`` settings (e.g. ``{"query_wait_timeout": "5"}``).
    """

    def __init__(
        self,
        cluster: PostgresCluster,
        *,
        pool_mode: PoolMode = "transaction",
        settings: dict[str, str] | None = None,
    ) -> None:
        binary = find_pgbouncer()
        if binary is None:
            raise RuntimeError(
                "no pgbouncer binary: install Debian's package (apt-get install pgbouncer)"
            )
        self.binary = binary
        self.cluster = cluster
        self.host = "127.0.0.1"
        self.port = free_port()
        self._tmp = Path(tempfile.mkdtemp(prefix="dbresilience-pgbouncer-"))
        self.logfile = self._tmp / "pgbouncer.log"
        self._ini = self._tmp / "pgbouncer.ini"
        self._proc: subprocess.Popen[bytes] | None = None
        self._user = _ensure_system_user(_SYSTEM_USER) if os.geteuid() == 0 else None
        (self._tmp / "userlist.txt").write_text('"postgres" ""\n')
        conf = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self._tmp / "userlist.txt"),
            "admin_users": "postgres",
            "pool_mode": pool_mode,
            "max_client_conn": "500",
            "default_pool_size": "20",
            "server_login_retry": "1",
            "logfile": str(self.logfile),
            "ignore_startup_parameters": "extra_float_digits,options",
            **(settings or {}),
        }
        lines = [
            "[databases]",
            f"* = host={cluster.host} port={cluster.port}",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in conf.items()),
        ]
        self._ini.write_text("\n".join(lines) + "\n")
        if self._user is not None:
            for path in (self._tmp, *self._tmp.iterdir()):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def start(self) -> None:
        """Start PgBouncer and wait until it accepts TCP connections (bound: 10 s)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        kwargs: dict[str, object] = {}
        if self._user is not None:
            kwargs["user"] = self._user.pw_uid
            kwargs["group"] = self._user.pw_gid
        self._proc = subprocess.Popen(
            [str(self.binary), str(self._ini)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=str(self._tmp),
            **kwargs,  # type: ignore[call-overload]
        )
        deadline = time.monotonic() + 10
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start:\n{self._log_tail()}")
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    log = self._log_tail()
                    raise RuntimeError(f"pgbouncer did not listen in 10 s:\n{log}") from exc
                time.sleep(0.02)  # polling a port that is about to open

    def stop(self) -> None:
        """Stop PgBouncer at once (SIGINT: its clients' connections are closed)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(2)  # SIGINT: immediate shutdown
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self, *, down_for: float = 0.0) -> None:
        """Stop, stay down for ``down_for`` seconds, start again."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def admin(self, command: str) -> list[tuple[object, ...]]:
        """Run ``command`` on PgBouncer's admin console (``SHOW POOLS``, ``KILL db``...)."""
        import psycopg

        with psycopg.connect(
            host=self.host,
            port=self.port,
            user="postgres",
            dbname="pgbouncer",
            autocommit=True,
            connect_timeout=10,
        ) as conn:
            cur = conn.execute(command.encode(), prepare=False)  # trusted test text
            return cur.fetchall() if cur.description is not None else []

    def url(self, driver: str = "psycopg", *, database: str = "postgres") -> str:
        """SQLAlchemy URL that goes through this PgBouncer."""
        return self.cluster.url(driver, database=database, port=self.port, host=self.host)

    def _log_tail(self) -> str:
        return self.logfile.read_text()[-2000:] if self.logfile.exists() else "(no log)"

    def destroy(self) -> None:
        """Stop PgBouncer and delete its directory."""
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
