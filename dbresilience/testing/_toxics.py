"""Toxics for :class:`~dbresilience.testing.ChaosProxy`, modelled on Toxiproxy's.

A toxic is a frozen description of a fault; :meth:`ChaosProxy.add_toxic` applies it to the
traffic going one way (``stream``: ``"upstream"`` = client to server, ``"downstream"`` = server
to client, the default as in Toxiproxy) of a share of the connections (``toxicity``: the
probability, drawn once per connection, that the toxic applies to it; 1.0 by default).

Units: every time is in **seconds** (Toxiproxy uses milliseconds), every size in **bytes**,
the bandwidth in **bytes per second**. Several toxics on one stream apply in the order they
were added; bytes are never reordered.

=================  ==========================================================================
toxic              effect on each affected connection, in its stream
=================  ==========================================================================
:class:`Latency`   every chunk delayed ``latency`` ± ``jitter`` (uniform)
:class:`Bandwidth` at most ``rate`` bytes per second
:class:`Slicer`    chunks cut into ``average_size`` ± ``size_variation`` byte slices sent
                   ``delay`` apart
:class:`LimitData` the first ``nbytes`` bytes go through, then the connection is closed
:class:`ResetPeer` a TCP RST to both sides ``timeout`` after the toxic met the connection
:class:`Timeout`   data dropped; the connection closed after ``timeout`` (0: never)
:class:`SlowClose` the FIN (end of stream) forwarded ``delay`` late
=================  ==========================================================================

"Down" (Toxiproxy's disabled proxy) is not a toxic: :meth:`ChaosProxy.down` / ``up``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = [
    "Bandwidth",
    "Latency",
    "LimitData",
    "ResetPeer",
    "Slicer",
    "SlowClose",
    "Stream",
    "Timeout",
    "Toxic",
]

Stream = Literal["upstream", "downstream"]


def _seconds(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")


def _count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class _Toxic:
    """Fields every toxic has.

    :param stream: ``"downstream"`` (server to client, default) or ``"upstream"``.
    :param toxicity: probability (0.0 to 1.0, default 1.0) that the toxic applies to a given
        connection; drawn once per connection, when the toxic is added or the connection made.
    """

    stream: Stream = "downstream"
    toxicity: float = 1.0

    def __post_init__(self) -> None:
        if self.stream not in ("upstream", "downstream"):
            raise ValueError(f"stream must be 'upstream' or 'downstream', got {self.stream!r}")
        if not (isinstance(self.toxicity, (int, float)) and 0.0 <= self.toxicity <= 1.0):
            raise ValueError(f"toxicity must be between 0.0 and 1.0, got {self.toxicity!r}")

    @property
    def kind(self) -> str:
        """Toxiproxy's name for this toxic (``latency``, ``limit_data``...)."""
        return _KINDS[type(self).__name__]


@dataclass(frozen=True, kw_only=True, slots=True)
class Latency(_Toxic):
    """Delay every chunk by ``latency`` ± ``jitter`` seconds (uniform; never below 0).

    :param latency: added delay in seconds (default 0).
    :param jitter: spread in seconds around ``latency`` (default 0).
    """

    latency: float = 0.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        _Toxic.__post_init__(self)
        _seconds("latency", self.latency)
        _seconds("jitter", self.jitter)


@dataclass(frozen=True, kw_only=True, slots=True)
class Bandwidth(_Toxic):
    """Forward at most ``rate`` bytes per second (in 50 ms quanta).

    :param rate: bytes per second (required, >= 1).
    """

    rate: int

    def __post_init__(self) -> None:
        _Toxic.__post_init__(self)
        _count("rate", self.rate, 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class Slicer(_Toxic):
    """Cut every chunk into slices of ``average_size`` ± ``size_variation`` bytes, sent
    ``delay`` seconds apart (small TCP segments, as from a slow or fragmenting network).

    :param average_size: mean slice size in bytes (default 64, >= 1).
    :param size_variation: spread in bytes, below ``average_size`` (default 0).
    :param delay: seconds between two slices (default 0).
    """

    average_size: int = 64
    size_variation: int = 0
    delay: float = 0.0

    def __post_init__(self) -> None:
        _Toxic.__post_init__(self)
        _count("average_size", self.average_size, 1)
        _count("size_variation", self.size_variation, 0)
        if self.size_variation >= self.average_size:
            raise ValueError("size_variation must be smaller than average_size")
        _seconds("delay", self.delay)


@dataclass(frozen=True, kw_only=True, slots=True)
class LimitData(_Toxic):
    """Let the first ``nbytes`` bytes of a connection through (counted in this stream from the
    moment the toxic met it), then close both sides (FIN) once they are delivered.

    :param nbytes: bytes let through (required, >= 0).
    """

    nbytes: int

    def __post_init__(self) -> None:
        _Toxic.__post_init__(self)
        _count("nbytes", self.nbytes, 0)


@dataclass(frozen=True, kw_only=True, slots=True)
class ResetPeer(_Toxic):
    """Reset the connection (a real TCP RST to both sides: ``ECONNRESET``) ``timeout`` seconds
    after the toxic met it; the stream does not change the effect.

    :param timeout: seconds before the RST (default 0: at once).
    """

    timeout: float = 0.0

    def __post_init__(self) -> None:
        _Toxic.__post_init__(self)
        _seconds("timeout", self.timeout)


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeout(_Toxic):
    """Drop every byte of the stream (nothing is buffered: it is lost), and close the
    connection (FIN, both sides) ``timeout`` seconds after the toxic met it.

    :param timeout: seconds before the close (default 0: never; data is dropped until the
        toxic is removed).
    """

    timeout: float = 0.0

    def __post_init__(self) -> None:
        _Toxic.__post_init__(self)
        _seconds("timeout", self.timeout)


@dataclass(frozen=True, kw_only=True, slots=True)
class SlowClose(_Toxic):
    """Forward the end of the stream (FIN) ``delay`` seconds after it arrived.

    :param delay: seconds (default 0).
    """

    delay: float = 0.0

    def __post_init__(self) -> None:
        _Toxic.__post_init__(self)
        _seconds("delay", self.delay)


Toxic: TypeAlias = Latency | Bandwidth | Slicer | LimitData | ResetPeer | Timeout | SlowClose
"""Any toxic."""

_KINDS = {
    "Latency": "latency",
    "Bandwidth": "bandwidth",
    "Slicer": "slicer",
    "LimitData": "limit_data",
    "ResetPeer": "reset_peer",
    "Timeout": "timeout",
    "SlowClose": "slow_close",
}
