"""TCP chaos proxy for fault-injection tests of database clients.

:class:`ChaosProxy` sits between a client and a server (e.g. PostgreSQL) and
forwards bytes in both directions, while letting a test inject faults: Toxiproxy-like
toxics per direction and per share of connections (:mod:`latency, bandwidth, slicer,
limit_data, reset_peer, timeout, slow_close <dbresilience.testing._toxics>`), a proxy that
is down (connections refused), a black-holed network, refused connections, real TCP resets,
and one-shot cuts right after a given message (e.g. ``COMMIT``) was forwarded.

Example::

    with ChaosProxy("127.0.0.1", 5432) as proxy:
        dsn = f"postgresql://app@{proxy.host}:{proxy.port}/app"
        ...
        proxy.close_after(0, match=b"COMMIT")  # server gets COMMIT, client never sees reply
        ...
        proxy.reset_all()                        # RST every live connection, both sides
        with proxy.toxic(Latency(latency=0.1, jitter=0.02)):  # 80-120 ms per server reply
            ...

Design: a single daemon thread runs a :mod:`selectors` loop that owns every
socket; control methods are executed by that thread and return once applied
(bounded wait of 5 s), so e.g. :meth:`ChaosProxy.reset_all` has sent its
resets when it returns. Resets are real TCP RSTs (``SO_LINGER`` on, timeout 0,
then ``close()`` from the thread that owns the socket), so peers observe
``ECONNRESET`` rather than a clean EOF.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import logging
import math
import random
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

from dbresilience.testing._toxics import (
    Bandwidth,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    SlowClose,
    Timeout,
    Toxic,
)

__all__ = ["ChaosMode", "ChaosProxy", "ChaosStats"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

_UPSTREAM = "upstream"
_DOWNSTREAM = "downstream"
_RECV_SIZE = 65536
_MAX_QUEUED = 1 << 20  # bytes buffered per direction before the proxy stops reading (backpressure)
_CONNECT_TIMEOUT = 5.0  # seconds allowed for each upstream connect attempt
_CONTROL_TIMEOUT = 5.0  # seconds a control call waits for the I/O thread
_DRAIN_TIMEOUT = 1.0  # max seconds to wait for the peer to ACK a cut chunk before the RST
_DRAIN_GRACE = 0.05  # seconds to wait instead where unacked bytes cannot be queried
_DRAIN_POLL = 0.001  # poll interval (seconds) while waiting for that ACK
_RST_LINGER = struct.pack("ii", 1, 0)
_CONNECT_PENDING = {0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, 10035}  # 10035: Win

if sys.platform == "linux":
    import fcntl
    import termios

    def _unacked_bytes(sock: socket.socket) -> int | None:
        """Bytes written to ``sock`` that the peer has not acknowledged yet (SIOCOUTQ)."""
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0])

else:

    def _unacked_bytes(sock: socket.socket) -> int | None:
        """Not available on this platform: callers fall back to a short grace period."""
        return None


class ChaosMode(enum.Enum):
    """Fault mode of a :class:`ChaosProxy`; modes are mutually exclusive."""

    PASS = "pass"
    """Forward bytes unchanged."""
    LATENCY = "latency"
    """Delay every forwarded chunk, both directions (see :meth:`ChaosProxy.set_latency`)."""
    BLACKHOLE = "blackhole"
    """Accept connections but forward nothing (see :meth:`ChaosProxy.blackhole`)."""
    REFUSE = "refuse"
    """Reset new connections immediately (see :meth:`ChaosProxy.refuse`)."""


@dataclass(frozen=True)
class ChaosStats:
    """Snapshot of a :class:`ChaosProxy`'s counters since it was created."""

    connections_accepted: int = 0
    """Client connections accepted at TCP level (including refused ones)."""
    connections_refused: int = 0
    """Client connections reset right after accept because the proxy was in REFUSE mode."""
    upstream_failures: int = 0
    """Client connections reset because the upstream could not be reached."""
    resets_sent: int = 0
    """Sockets closed with a TCP RST; a reset pair counts once per side."""
    bytes_upstream: int = 0
    """Bytes forwarded client -> server."""
    bytes_downstream: int = 0
    """Bytes forwarded server -> client."""
    bytes_dropped: int = 0
    """Bytes read and thrown away by a :class:`~dbresilience.testing.Timeout` toxic."""


@dataclass
class _Counters:
    connections_accepted: int = 0
    connections_refused: int = 0
    upstream_failures: int = 0
    resets_sent: int = 0
    bytes_upstream: int = 0
    bytes_downstream: int = 0
    bytes_dropped: int = 0

    def snapshot(self) -> ChaosStats:
        return ChaosStats(
            connections_accepted=self.connections_accepted,
            connections_refused=self.connections_refused,
            upstream_failures=self.upstream_failures,
            resets_sent=self.resets_sent,
            bytes_upstream=self.bytes_upstream,
            bytes_downstream=self.bytes_downstream,
            bytes_dropped=self.bytes_dropped,
        )


class _Flow:
    """One direction of a connection pair: chunks read from the source, awaiting delivery."""

    __slots__ = (
        "close_when_drained",
        "direction",
        "eof",
        "eof_at",
        "free_at",
        "passed",
        "queue",
        "queued",
        "shut",
    )

    def __init__(self, direction: str) -> None:
        self.direction = direction
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()  # (due, data)
        self.queued = 0  # bytes in ``queue``
        self.eof = False  # the source sent FIN
        self.eof_at = 0.0  # when it did
        self.shut = False  # that FIN was forwarded (shutdown(SHUT_WR) on the destination)
        self.free_at: dict[str, float] = {}  # Bandwidth toxic -> when its link is free again
        self.passed: dict[str, int] = {}  # LimitData toxic -> bytes let through
        self.close_when_drained = False  # a LimitData toxic was reached

    def clear(self) -> None:
        self.queue.clear()
        self.queued = 0


class _Pair:
    """A proxied connection: client socket, upstream socket and both flows."""

    __slots__ = (
        "addrs",
        "client",
        "client_handler",
        "closed",
        "connect_deadline",
        "connecting",
        "cut_at",
        "cutting",
        "down",
        "peer",
        "server",
        "server_handler",
        "toxics",
        "up",
    )

    def __init__(
        self,
        client: socket.socket,
        peer: str,
        client_handler: Callable[[_Pair, int], None],
        server_handler: Callable[[_Pair, int], None],
    ) -> None:
        self.client = client
        self.peer = peer
        self.server: socket.socket | None = None  # None: upstream connect not started yet
        self.connecting = False
        self.connect_deadline = 0.0
        self.addrs: list[tuple[Any, ...]] = []  # remaining getaddrinfo() results to try
        self.up = _Flow(_UPSTREAM)
        self.down = _Flow(_DOWNSTREAM)
        self.cutting: _Flow | None = None  # flow carrying the chunk that fired close_after()
        self.cut_at: float | None = None  # when that chunk was fully written
        self.closed = False
        self.toxics: dict[str, float] = {}  # name -> since when it applies to this pair
        self.client_handler: Callable[[int], None] = lambda mask: client_handler(self, mask)
        self.server_handler: Callable[[int], None] = lambda mask: server_handler(self, mask)

    def dst(self, flow: _Flow) -> socket.socket | None:
        return self.server if flow is self.up else self.client


@dataclass
class _Trigger:
    direction: str
    remaining: int
    match: bytes | None
    tails: dict[_Pair, bytes] = field(default_factory=dict)  # last bytes seen, per pair


class _Command(Generic[_T]):
    """A control call executed on the I/O thread."""

    def __init__(self, fn: Callable[[], _T]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: _T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()


class ChaosProxy:
    """TCP proxy that forwards to an upstream server and injects faults on demand.

    A proxy is started once (:meth:`start` or ``with``) and stopped once (:meth:`stop`).
    Control methods may be called from any thread, before or while running; while running
    they return once the I/O thread has applied them (waiting at most 5 s).
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int | None = None,
    ) -> None:
        """Configure a proxy to ``upstream_host:upstream_port``; nothing is bound until start.

        ``listen_port=0`` picks a free port; read it from :attr:`port` after :meth:`start`.
        ``seed`` seeds the random draws of toxics (toxicity, jitter, slice sizes).
        """
        self._upstream = (upstream_host, upstream_port)
        self._listen = (listen_host, listen_port)
        self._address: tuple[str, int] | None = None
        self._mode = ChaosMode.PASS
        self._latency = 0.0
        self._trigger: _Trigger | None = None
        self._toxics: dict[str, Toxic] = {}
        self._random = random.Random(seed)
        self._down = False
        self._counters = _Counters()
        self._pairs: dict[_Pair, None] = {}  # insertion-ordered set
        self._masks: dict[socket.socket, int] = {}  # registered selector interest per socket
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the fields below and the wake-up sockets
        self._commands: collections.deque[_Command[Any]] = collections.deque()
        self._started = False
        self._running = False  # the I/O thread accepts commands
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ChaosProxy:
        """Bind the listening socket and start the I/O thread; returns ``self``.

        Raises RuntimeError if already started (a proxy cannot be restarted) and OSError
        if the listen address cannot be bound.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("ChaosProxy can only be started once")
            self._started = True
        try:
            listener = self._bind()
        except BaseException:
            with self._lock:
                self._started = False
            raise
        sel = selectors.DefaultSelector()
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        sel.register(wake_r, selectors.EVENT_READ, self._on_wake)
        addr = listener.getsockname()
        self._address = (str(addr[0]), int(addr[1]))
        if self._down:  # down() before start(): the port is reserved, then refused
            listener.close()
        else:
            sel.register(listener, selectors.EVENT_READ, self._on_accept)
        self._sel, self._wake_r, self._wake_w = sel, wake_r, wake_w
        self._listener = None if self._down else listener
        self._running = True
        self._thread = threading.Thread(
            target=self._run, name=f"ChaosProxy-{self._address[1]}", daemon=True
        )
        self._thread.start()
        _log.debug("chaos proxy %s:%d -> %s:%d started", *self._address, *self._upstream)
        return self

    def stop(self) -> None:
        """Reset (RST) all connections, close the listening socket and join the I/O thread.

        Idempotent; waits at most 5 s for the thread.
        """
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping = True
            self._wake_locked()
        if thread is not threading.current_thread():
            thread.join(_CONTROL_TIMEOUT)
            if thread.is_alive():
                _log.warning("chaos proxy thread %s did not stop within 5 s", thread.name)
                return
        self._thread = None

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{self._address[0]}:{self._address[1]}" if self._address else "unbound"
        host, port = self._upstream
        return f"<ChaosProxy {where} -> {host}:{port} mode={self._mode.value}>"

    # ------------------------------------------------------------------ properties

    @property
    def host(self) -> str:
        """Address the proxy listens on (the bound address once started)."""
        return self._address[0] if self._address else self._listen[0]

    @property
    def port(self) -> int:
        """Port the proxy actually listens on; RuntimeError before :meth:`start`."""
        if self._address is None:
            raise RuntimeError("ChaosProxy is not started; the port is bound by start()")
        return self._address[1]

    @property
    def upstream(self) -> tuple[str, int]:
        """``(host, port)`` that new connections are forwarded to."""
        return self._upstream

    @property
    def mode(self) -> ChaosMode:
        """Current fault mode."""
        return self._mode

    @property
    def latency(self) -> float:
        """Delay (seconds) added to each forwarded chunk; 0.0 unless in LATENCY mode."""
        return self._latency

    @property
    def is_down(self) -> bool:
        """True between :meth:`down` and :meth:`up`."""
        return self._down

    @property
    def toxics(self) -> dict[str, Toxic]:
        """The toxics in force, by name, in the order they apply."""
        return self._call(lambda: dict(self._toxics))

    @property
    def active_connections(self) -> int:
        """Number of live client connections (including held or still connecting ones)."""
        return self._call(lambda: len(self._pairs))

    @property
    def stats(self) -> ChaosStats:
        """Consistent snapshot of the counters."""
        return self._call(self._counters.snapshot)

    # ------------------------------------------------------------------ control

    def set_upstream(self, host: str, port: int) -> None:
        """Forward new connections to ``host:port`` (e.g. after a failover).

        Established connections keep their server; connections held by :meth:`blackhole`
        that were never connected go to the new upstream when released.
        """

        def apply() -> None:
            self._upstream = (host, port)

        self._call(apply)

    def passthrough(self) -> None:
        """Forward normally: clears latency, blackhole, refuse, any armed close_after(), every
        toxic, and brings a proxy that is :meth:`down` up again.

        Chunks already delayed by latency are delivered on their original schedule;
        connections held by :meth:`blackhole` resume with their buffered data.
        """

        def apply() -> None:
            self._set_mode(ChaosMode.PASS)
            self._trigger = None
            self._clear_toxics()
            self._set_up()

        self._call(apply)

    def set_latency(self, seconds: float) -> None:
        """Delay every forwarded chunk by ``seconds``, in both directions (order preserved).

        A round trip therefore takes at least ``2 * seconds`` longer. ``0`` means PASS
        mode. Chunks already queued keep their schedule.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"latency must be a finite number of seconds >= 0, got {seconds!r}")

        def apply() -> None:
            self._set_mode(ChaosMode.LATENCY if seconds > 0 else ChaosMode.PASS, float(seconds))

        self._call(apply)

    def blackhole(self) -> None:
        """Simulate a dead network: keep every socket open but forward nothing.

        The proxy stops reading from both sides of existing connections, so kernel buffers
        fill up as on a real dead link and peers see no data, EOF or reset (only their own
        timeouts). New connections still complete the TCP handshake but are held without
        connecting upstream. :meth:`passthrough` (or another mode) releases everything:
        held connections connect upstream and buffered data is delivered.
        """
        self._call(lambda: self._set_mode(ChaosMode.BLACKHOLE))

    def refuse(self) -> None:
        """Reset (RST) each new client connection right after accepting it.

        The TCP handshake is completed by the kernel, so ``connect()`` usually succeeds
        and the client's first recv/send fails with ConnectionResetError. Existing
        connections keep forwarding normally.
        """
        self._call(lambda: self._set_mode(ChaosMode.REFUSE))

    def reset_all(self) -> int:
        """Send a TCP RST on every live connection, to both client and upstream sides.

        Returns the number of client connections reset. Synchronous: the resets have
        been sent when this returns.
        """

        def apply() -> int:
            pairs = list(self._pairs)
            for pair in pairs:
                self._abort(pair, "reset_all()")
            return len(pairs)

        return self._call(apply)

    def close_after(
        self, nbytes: int = 0, *, direction: str = "upstream", match: bytes | None = None
    ) -> None:
        """Arm a one-shot cut of the next connection that sends matching traffic.

        ``direction`` is ``"upstream"`` (client -> server) or ``"downstream"``
        (server -> client). With ``match``, the first chunk going that way that contains
        ``match`` (also across chunk boundaries) is forwarded whole, then that connection is
        reset on both sides and nothing else is forwarded either way; ``nbytes`` is ignored.
        Without ``match``, the connection that carries the next ``nbytes`` bytes going that
        way (counted over all connections from now) gets exactly those forwarded, then is
        reset likewise. Before the RST the proxy waits (at most 1 s) until the receiver has
        acknowledged the forwarded bytes, so e.g. with ``match=b"COMMIT"`` the server does
        receive the COMMIT while the client never sees the reply. Replaces any armed cut;
        :meth:`passthrough` disarms it.
        """
        if direction not in (_UPSTREAM, _DOWNSTREAM):
            raise ValueError(f"direction must be 'upstream' or 'downstream', got {direction!r}")
        if match is None and nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if match is not None and not match:
            raise ValueError("match must be a non-empty bytes string")
        trigger = _Trigger(direction, nbytes, bytes(match) if match is not None else None)

        def apply() -> None:
            self._trigger = trigger

        self._call(apply)

    def add_toxic(self, toxic: Toxic, *, name: str | None = None) -> str:
        """Apply ``toxic`` to existing and new connections; returns its name.

        The default name is Toxiproxy's: ``<kind>_<stream>`` (``latency_downstream``).
        Each connection draws once whether the toxic applies to it (``toxic.toxicity``).
        Raises :class:`ValueError` when a toxic of that name is already in force.
        """
        key = name if name is not None else f"{toxic.kind}_{toxic.stream}"

        def apply() -> str:
            if key in self._toxics:
                raise ValueError(f"a toxic named {key!r} is already in force")
            self._toxics[key] = toxic
            now = time.monotonic()
            for pair in self._pairs:
                self._roll(pair, key, toxic, now)
            _log.debug("chaos proxy toxic %s added: %r", key, toxic)
            return key

        return self._call(apply)

    def remove_toxic(self, name: str) -> None:
        """Stop applying the toxic ``name``; :class:`KeyError` if there is none.

        Data a toxic has already scheduled (delayed, sliced) keeps its schedule.
        """

        def apply() -> None:
            if name not in self._toxics:
                raise KeyError(name)
            self._forget_toxic(name)

        self._call(apply)

    def remove_all_toxics(self) -> None:
        """Remove every toxic (other faults, e.g. :meth:`blackhole`, stay)."""
        self._call(self._clear_toxics)

    @contextlib.contextmanager
    def toxic(self, toxic: Toxic, *, name: str | None = None) -> Iterator[str]:
        """``with proxy.toxic(Latency(latency=0.1)) as name:`` applies it for the block."""
        key = self.add_toxic(toxic, name=name)
        try:
            yield key
        finally:
            with contextlib.suppress(KeyError):
                self.remove_toxic(key)

    def down(self) -> None:
        """Take the proxy down, as Toxiproxy's disabled proxy: reset (RST) every connection and
        stop listening, so new connections are refused (``ECONNREFUSED``). :meth:`up` or
        :meth:`passthrough` listen again on the same port."""

        def apply() -> None:
            for pair in list(self._pairs):
                self._abort(pair, "down()")
            if self._listener is not None and self._sel is not None:
                self._sel.unregister(self._listener)
                self._listener.close()
                self._listener = None
            self._down = True

        self._call(apply)

    def up(self) -> None:
        """Listen again after :meth:`down` (same address and port); no-op when up."""
        self._call(self._set_up)

    # ------------------------------------------------------------------ control plumbing

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the I/O thread (or inline when it is not running) and return its result."""
        cmd = _Command(fn)
        with self._lock:
            queued = self._running and threading.current_thread() is not self._thread
            if queued:
                self._commands.append(cmd)
                self._wake_locked()
        if not queued:
            return fn()
        if not cmd.done.wait(_CONTROL_TIMEOUT):
            raise TimeoutError("chaos proxy I/O thread did not respond within 5 s")
        if cmd.error is not None:
            raise cmd.error
        return cast(_T, cmd.result)

    def _wake_locked(self) -> None:
        if self._wake_w is None:
            return
        with contextlib.suppress(OSError):  # buffer full: the loop is already due to wake up
            self._wake_w.send(b"\0")

    def _set_up(self) -> None:
        if not self._down:
            return
        if self._sel is not None and self._address is not None:  # started: listen again
            listener = self._bind(self._address)
            self._sel.register(listener, selectors.EVENT_READ, self._on_accept)
            self._listener = listener
        self._down = False

    def _roll(self, pair: _Pair, name: str, toxic: Toxic, now: float) -> None:
        """Draw once whether ``toxic`` applies to ``pair``."""
        if toxic.toxicity >= 1.0 or self._random.random() < toxic.toxicity:
            pair.toxics[name] = now

    def _forget_toxic(self, name: str) -> None:
        del self._toxics[name]
        for pair in self._pairs:
            pair.toxics.pop(name, None)
            for flow in (pair.up, pair.down):
                flow.free_at.pop(name, None)
                flow.passed.pop(name, None)
        _log.debug("chaos proxy toxic %s removed", name)

    def _clear_toxics(self) -> None:
        for name in list(self._toxics):
            self._forget_toxic(name)

    def _set_mode(self, mode: ChaosMode, latency: float = 0.0) -> None:
        if mode is not self._mode or latency != self._latency:
            _log.debug("chaos proxy mode -> %s (latency %.3f s)", mode.value, latency)
        self._mode = mode
        self._latency = latency

    def _bind(self, address: tuple[str, int] | None = None) -> socket.socket:
        host, port = address or self._listen
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    # ------------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._stopping:
                for key, mask in sel.select(self._next_timeout()):
                    handler: Callable[[int], None] = key.data
                    handler(mask)
                self._run_commands()
                self._service()
        except Exception:
            _log.exception("chaos proxy I/O loop crashed; closing all connections")
        finally:
            self._teardown()

    def _run_commands(self) -> None:
        with self._lock:
            commands = list(self._commands)
            self._commands.clear()
        for cmd in commands:
            cmd.run()

    def _teardown(self) -> None:
        for pair in list(self._pairs):
            self._abort(pair, "proxy stopped")
        if self._listener is not None:
            self._listener.close()
        if self._sel is not None:
            self._sel.close()
        self._masks.clear()
        with self._lock:
            self._running = False
            commands = list(self._commands)
            self._commands.clear()
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            self._wake_r = self._wake_w = None
        for cmd in commands:  # run against the torn-down state so no caller waits in vain
            cmd.run()
        _log.debug("chaos proxy %s stopped", self._address)

    def _next_timeout(self) -> float | None:
        """Seconds until the loop must wake up for a timer, or None to wait for I/O only."""
        if self._stopping:
            return 0.0
        now = time.monotonic()
        deadline = math.inf
        held = self._mode is ChaosMode.BLACKHOLE
        for pair in self._pairs:
            if pair.connecting:
                deadline = min(deadline, pair.connect_deadline)
            if pair.cut_at is not None:
                deadline = min(deadline, now + _DRAIN_POLL)
            if pair.toxics:
                ends = self._toxic_deadline(pair)
                if ends is not None:
                    deadline = min(deadline, ends[0])
                for flow in (pair.up, pair.down):
                    if flow.eof and not flow.shut and not flow.queue:
                        deadline = min(deadline, flow.eof_at + self._slow_close(pair, flow))
            if held:
                continue
            for flow in (pair.up, pair.down):
                if flow.queue and pair.cutting in (None, flow):
                    due = flow.queue[0][0]
                    dst = pair.dst(flow)
                    if due > now:
                        deadline = min(deadline, due)
                    elif dst is not None and not self._masks.get(dst, 0) & selectors.EVENT_WRITE:
                        # Became due after the last _update(): no write interest yet, so
                        # service it now rather than wait for I/O that may never come.
                        deadline = now
        return None if deadline == math.inf else max(0.0, deadline - now)

    def _on_wake(self, mask: int) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(OSError):  # BlockingIOError once drained
            while self._wake_r.recv(4096):
                pass

    def _on_accept(self, mask: int) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # e.g. EMFILE; retried on the next loop iteration
                _log.warning("chaos proxy accept() failed: %s", exc)
                return
            sock.setblocking(False)
            self._counters.connections_accepted += 1
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            if self._mode is ChaosMode.REFUSE:
                self._counters.connections_refused += 1
                if self._rst(sock):
                    self._counters.resets_sent += 1
                _log.debug("chaos proxy refused %s", peer)
                continue
            _set_nodelay(sock)
            pair = _Pair(sock, peer, self._on_client_event, self._on_server_event)
            self._pairs[pair] = None
            now = time.monotonic()
            for name, toxic in self._toxics.items():
                self._roll(pair, name, toxic, now)
            _log.debug("chaos proxy accepted %s", peer)

    def _on_client_event(self, pair: _Pair, mask: int) -> None:
        if pair.closed:
            return
        try:
            if mask & self._masks.get(pair.client, 0) & selectors.EVENT_READ:
                self._read(pair, pair.client, pair.up)
        except OSError as exc:
            self._abort(pair, f"client error: {exc}")

    def _on_server_event(self, pair: _Pair, mask: int) -> None:
        if pair.closed or pair.server is None:
            return
        try:
            mask &= self._masks.get(pair.server, 0)
            if pair.connecting:
                if mask:
                    self._finish_connect(pair, pair.server)
            elif mask & selectors.EVENT_READ:
                self._read(pair, pair.server, pair.down)
        except OSError as exc:
            self._abort(pair, f"upstream error: {exc}")

    def _service(self) -> None:
        """Connect, write due chunks, run timers and refresh selector interest for all pairs."""
        now = time.monotonic()
        for pair in list(self._pairs):
            try:
                self._service_pair(pair, now)
            except OSError as exc:
                self._abort(pair, f"I/O error: {exc}")

    def _service_pair(self, pair: _Pair, now: float) -> None:
        held = self._mode is ChaosMode.BLACKHOLE
        if pair.server is None and not held:
            self._connect(pair, now)
        if pair.closed:
            return
        if pair.connecting and now >= pair.connect_deadline:
            self._connect_failed(pair, now, "connect timed out")
            if pair.closed:
                return
        if pair.cut_at is not None:
            self._finish_cut(pair, now)
            return
        if pair.toxics:
            ends = self._toxic_deadline(pair)
            if ends is not None and now >= ends[0]:
                if ends[1] == "reset":
                    self._abort(pair, "reset_peer toxic")
                else:
                    self._close_pair(pair)
                    _log.debug("chaos proxy timeout toxic closed %s", pair.peer)
                return
        if not held:
            self._pump(pair, now)
            if pair.closed:
                return
        self._update(pair, now)

    def _connect(self, pair: _Pair, now: float) -> None:
        host, port = self._upstream
        try:
            pair.addrs = list(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            self._counters.upstream_failures += 1
            self._abort(pair, f"cannot resolve upstream {host}:{port}: {exc}")
            return
        self._try_next_address(pair, now)

    def _try_next_address(self, pair: _Pair, now: float) -> None:
        while pair.addrs:
            family, kind, proto, _, addr = pair.addrs.pop(0)
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            err = sock.connect_ex(addr)
            if err in _CONNECT_PENDING:
                pair.server = sock
                pair.connecting = True
                pair.connect_deadline = now + _CONNECT_TIMEOUT
                return
            sock.close()
        host, port = self._upstream
        self._counters.upstream_failures += 1
        self._abort(pair, f"upstream {host}:{port} unreachable")

    def _finish_connect(self, pair: _Pair, server: socket.socket) -> None:
        err = server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(pair, time.monotonic(), errno.errorcode.get(err, str(err)))
            return
        pair.connecting = False
        _set_nodelay(server)
        _log.debug("chaos proxy connected %s upstream", pair.peer)

    def _connect_failed(self, pair: _Pair, now: float, reason: str) -> None:
        _log.debug("chaos proxy upstream connect for %s failed: %s", pair.peer, reason)
        if pair.server is not None:
            self._forget(pair.server)
            pair.server.close()
            pair.server = None
        pair.connecting = False
        self._try_next_address(pair, now)

    def _read(self, pair: _Pair, src: socket.socket, flow: _Flow) -> None:
        try:
            data = src.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            flow.eof = True
            flow.eof_at = time.monotonic()
            return
        trigger = self._trigger
        if trigger is not None and trigger.direction == flow.direction:
            data = self._check_trigger(trigger, pair, flow, data)
        if data:
            self._enqueue(pair, flow, data)

    def _enqueue(self, pair: _Pair, flow: _Flow, data: bytes) -> None:
        """Queue ``data`` for delivery, through the toxics of this pair and direction."""
        now = time.monotonic()
        pieces = [(now + self._latency, data)]
        if pair.toxics and not flow.close_when_drained:
            for name, toxic in self._toxics.items():
                if name in pair.toxics and toxic.stream == flow.direction:
                    pieces = self._apply_toxic(name, toxic, flow, pieces)
        elif flow.close_when_drained:
            pieces = []
        for due, chunk in pieces:
            flow.queue.append((due, chunk))
            flow.queued += len(chunk)

    def _apply_toxic(
        self, name: str, toxic: Toxic, flow: _Flow, pieces: list[tuple[float, bytes]]
    ) -> list[tuple[float, bytes]]:
        """What ``toxic`` makes of the scheduled ``pieces`` ``(due, data)`` of one read."""
        rng = self._random
        out: list[tuple[float, bytes]] = []
        if isinstance(toxic, Latency):
            for due, chunk in pieces:
                delay = toxic.latency + rng.uniform(-toxic.jitter, toxic.jitter)
                out.append((due + max(0.0, delay), chunk))
        elif isinstance(toxic, Slicer):
            for due, chunk in pieces:
                at, start = due, 0
                while start < len(chunk):
                    size = toxic.average_size + rng.randint(
                        -toxic.size_variation, toxic.size_variation
                    )
                    out.append((at, chunk[start : start + size]))
                    start += size
                    at += toxic.delay
        elif isinstance(toxic, Bandwidth):
            quantum = max(1, toxic.rate // 20)  # 50 ms worth of bytes
            free = flow.free_at.get(name, 0.0)
            for due, chunk in pieces:
                for start in range(0, len(chunk), quantum):
                    part = chunk[start : start + quantum]
                    free = max(free, due) + len(part) / toxic.rate
                    out.append((free, part))
            flow.free_at[name] = free
        elif isinstance(toxic, LimitData):
            left = toxic.nbytes - flow.passed.get(name, 0)
            for due, chunk in pieces:
                part = chunk[: max(0, left)]
                left -= len(part)
                if part:
                    out.append((due, part))
            flow.passed[name] = toxic.nbytes - left
            if left <= 0:
                flow.close_when_drained = True
        elif isinstance(toxic, Timeout):
            self._counters.bytes_dropped += sum(len(chunk) for _, chunk in pieces)
        else:  # ResetPeer, SlowClose: timers, the data is untouched
            out = pieces
        return out

    def _check_trigger(self, trigger: _Trigger, pair: _Pair, flow: _Flow, data: bytes) -> bytes:
        """Apply an armed close_after() to a chunk just read; returns the part to forward."""
        if trigger.match is not None:
            window = trigger.tails.pop(pair, b"") + data
            if trigger.match not in window:
                keep = len(trigger.match) - 1
                trigger.tails[pair] = window[-keep:] if keep else b""
                return data
        elif len(data) < trigger.remaining:
            trigger.remaining -= len(data)
            return data
        else:
            data = data[: trigger.remaining]
        self._trigger = None
        pair.cutting = flow
        (pair.down if flow is pair.up else pair.up).clear()
        _log.debug("chaos proxy close_after fired on %s (%s)", pair.peer, flow.direction)
        return data

    def _pump(self, pair: _Pair, now: float) -> None:
        """Write due chunks, forward EOFs, and detect completed pairs and cuts."""
        for flow in (pair.up, pair.down):
            if pair.cutting not in (None, flow):
                continue
            dst = pair.dst(flow)
            if dst is None or pair.connecting:
                continue
            while flow.queue and flow.queue[0][0] <= now:
                due, chunk = flow.queue[0]
                try:
                    sent = dst.send(chunk)
                except (BlockingIOError, InterruptedError):
                    break
                flow.queued -= sent
                if flow is pair.up:
                    self._counters.bytes_upstream += sent
                else:
                    self._counters.bytes_downstream += sent
                if sent < len(chunk):
                    flow.queue[0] = (due, chunk[sent:])
                    break
                flow.queue.popleft()
            if flow.close_when_drained and not flow.queue:
                self._close_pair(pair)  # a LimitData toxic was reached
                return
            if flow.eof and not flow.queue and not flow.shut and pair.cutting is None:
                if now < flow.eof_at + self._slow_close(pair, flow):
                    continue
                dst.shutdown(socket.SHUT_WR)
                flow.shut = True
        if pair.cutting is not None:
            if not pair.cutting.queue and not (pair.connecting or pair.server is None):
                pair.cut_at = now
                self._update(pair, now)  # stop all selector interest while draining
        elif pair.up.shut and pair.down.shut:
            self._close_pair(pair)

    def _slow_close(self, pair: _Pair, flow: _Flow) -> float:
        """Seconds a SlowClose toxic holds this flow's FIN back (0 without one)."""
        delay = 0.0
        for name in pair.toxics:
            toxic = self._toxics[name]
            if isinstance(toxic, SlowClose) and toxic.stream == flow.direction:
                delay = max(delay, toxic.delay)
        return delay

    def _toxic_deadline(self, pair: _Pair) -> tuple[float, str] | None:
        """When a ResetPeer / Timeout toxic ends ``pair``, and how (``reset`` or ``close``)."""
        first: tuple[float, str] | None = None
        for name, since in pair.toxics.items():
            toxic = self._toxics[name]
            if isinstance(toxic, ResetPeer):
                at = (since + toxic.timeout, "reset")
            elif isinstance(toxic, Timeout) and toxic.timeout > 0:
                at = (since + toxic.timeout, "close")
            else:
                continue
            if first is None or at[0] < first[0]:
                first = at
        return first

    def _finish_cut(self, pair: _Pair, now: float) -> None:
        """RST a cut pair once the last forwarded chunk was acknowledged (bounded wait)."""
        assert pair.cut_at is not None and pair.cutting is not None
        dst = pair.dst(pair.cutting)
        waited = now - pair.cut_at
        unacked = _unacked_bytes(dst) if dst is not None else 0
        if unacked == 0 or (unacked is None and waited >= _DRAIN_GRACE) or waited >= _DRAIN_TIMEOUT:
            self._abort(pair, f"close_after() on {pair.cutting.direction} traffic")

    def _update(self, pair: _Pair, now: float) -> None:
        """Set selector interest of both sockets from the pair's state and the mode."""
        active = self._mode is not ChaosMode.BLACKHOLE and pair.cut_at is None

        def reads(flow: _Flow) -> int:
            ok = active and pair.cutting is None and not flow.eof and flow.queued < _MAX_QUEUED
            return selectors.EVENT_READ if ok else 0

        def writes(flow: _Flow) -> int:
            ok = active and pair.cutting in (None, flow) and bool(flow.queue)
            return selectors.EVENT_WRITE if ok and flow.queue[0][0] <= now else 0

        self._set_mask(pair.client, reads(pair.up) | writes(pair.down), pair.client_handler)
        if pair.server is not None:
            connecting = selectors.EVENT_WRITE
            mask = connecting if pair.connecting else reads(pair.down) | writes(pair.up)
            self._set_mask(pair.server, mask, pair.server_handler)

    def _set_mask(self, sock: socket.socket, mask: int, handler: Callable[[int], None]) -> None:
        current = self._masks.get(sock, 0)
        if mask == current:
            return
        assert self._sel is not None
        if current == 0:
            self._sel.register(sock, mask, handler)
        elif mask == 0:
            self._sel.unregister(sock)
        else:
            self._sel.modify(sock, mask, handler)
        if mask:
            self._masks[sock] = mask
        else:
            del self._masks[sock]

    def _forget(self, sock: socket.socket) -> None:
        if self._masks.pop(sock, 0) and self._sel is not None:
            self._sel.unregister(sock)

    def _close_pair(self, pair: _Pair) -> None:
        """Close a pair whose both directions reached EOF (graceful, no RST)."""
        self._discard(pair)
        for sock in (pair.client, pair.server):
            if sock is not None:
                self._forget(sock)
                sock.close()
        _log.debug("chaos proxy closed %s", pair.peer)

    def _abort(self, pair: _Pair, reason: str) -> None:
        """Close both sides of a pair with a TCP RST."""
        if pair.closed:
            return
        self._discard(pair)
        self._forget(pair.client)
        if self._rst(pair.client):
            self._counters.resets_sent += 1
        if pair.server is not None:
            self._forget(pair.server)
            if self._rst(pair.server) and not pair.connecting:
                self._counters.resets_sent += 1
        _log.debug("chaos proxy reset %s: %s", pair.peer, reason)

    def _discard(self, pair: _Pair) -> None:
        pair.closed = True
        self._pairs.pop(pair, None)
        if self._trigger is not None:
            self._trigger.tails.pop(pair, None)

    @staticmethod
    def _rst(sock: socket.socket) -> bool:
        """Close ``sock`` so that the kernel sends RST; returns False if that was impossible."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
            ok = True
        except OSError:
            ok = False
        sock.close()
        return ok


def _set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle so small messages (and cut points) leave immediately."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
