"""The ``dbresilience`` SQLAlchemy URL plugin: resilience without touching the engine line.

Registered under the ``sqlalchemy.plugins`` entry point as ``dbresilience``, so any of these
gives an engine identical to :func:`create_resilient_engine` /
:func:`create_async_resilient_engine`::

    create_engine("postgresql+psycopg://app:pw@db/app?plugin=dbresilience")
    create_engine("postgresql+psycopg://app:pw@db/app", plugins=["dbresilience"])
    create_async_engine("postgresql+asyncpg://app:pw@db/app?plugin=dbresilience")

:class:`~dbresilience.Policy` fields come from the URL query as ``dbresilience_<field>=value``
(``?plugin=dbresilience&dbresilience_command_timeout=10&dbresilience_verify_commits=false``;
removed before the driver sees the URL) and from ``create_engine`` keyword arguments
``dbresilience_<field>=value`` or ``dbresilience_policy=Policy(...)`` (a base the other two
override). A field given both in the URL and as a keyword argument, an unknown field or a
value that does not parse raises :class:`~dbresilience.ConfigurationError` naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy.engine import URL, CreateEnginePlugin, Engine

from dbresilience import _sqla
from dbresilience._engine import ASYNC_DRIVERS, SYNC_DRIVERS, check_url
from dbresilience._engine_hooks import IDEMPOTENT_OPTION, install
from dbresilience._errors import ConfigurationError
from dbresilience._policy import Policy

__all__ = ["PREFIX", "ResiliencePlugin", "parse_policy_value"]

PREFIX = "dbresilience_"
_POLICY_KWARG = PREFIX + "policy"
_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Policy)}
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


_TYPES: dict[str, type] = {"bool": bool, "int": int, "float": float}


def _field_type(name: str) -> type:
    annotation = _FIELDS[name].type  # "float": _policy uses `from __future__ import annotations`
    return _TYPES[annotation if isinstance(annotation, str) else annotation.__name__]


def parse_policy_value(name: str, value: object, *, source: str) -> object:
    """``value`` for :class:`Policy` field ``name``: strings are parsed to the field's type
    (float, int, or bool: true/false, 1/0, yes/no, on/off); other values pass unchanged and
    :class:`Policy` validates them. Unknown fields and unparsable strings raise
    :class:`ConfigurationError` naming ``source`` (where it came from) and the value."""
    if name not in _FIELDS:
        hint = ""
        if PREFIX + name == IDEMPOTENT_OPTION:
            hint = f" ({IDEMPOTENT_OPTION} is an execution option, not a policy field)"
        raise ConfigurationError(
            f"unknown dbresilience policy field {name!r} in {source}{hint}; known fields: "
            + ", ".join(_FIELDS)
        )
    if not isinstance(value, str):
        return value
    kind = _field_type(name)
    text = value.strip()
    try:
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number of seconds"}[kind]
        raise ConfigurationError(
            f"bad value {value!r} for dbresilience policy field {name!r} in {source}: "
            f"expected {expected}"
        ) from None


class ResiliencePlugin(CreateEnginePlugin):
    """Installs dbresilience on the engine ``create_engine`` / ``create_async_engine`` builds.

    The URL and the driver are checked when the plugin is constructed (before any driver is
    imported: ``postgresql://`` is refused on SQLAlchemy 2.0, where it means psycopg2), the
    policy is built and validated then too; :meth:`engine_created` installs the
    listeners on the sync Engine (an AsyncEngine's ``sync_engine``).
    """

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        self.is_async = _sqla.plugin_is_async(kwargs)
        driver = url.get_driver_name() if "+" in url.drivername else None
        if driver in ASYNC_DRIVERS and driver not in SYNC_DRIVERS:
            # create_engine() with an asyncio driver: a sync Engine that SQLAlchemy drives from
            # greenlets (its own test suite does), hooked like an AsyncEngine's sync_engine.
            # Used outside a greenlet it fails as it would without the plugin (MissingGreenlet).
            self.is_async = True
        check_url(url, is_async=self.is_async)
        if "+" not in url.drivername:  # the default driver: psycopg2 on SQLAlchemy 2.0
            default = _sqla.dialect_class(url, is_async=self.is_async).driver
            check_url(url.set(drivername=f"postgresql+{default}"), is_async=self.is_async)
        self.policy = self._policy(url, kwargs)

    @staticmethod
    def _policy(url: URL, kwargs: dict[str, Any]) -> Policy:
        base = kwargs.pop(_POLICY_KWARG, None)
        if base is not None and not isinstance(base, Policy):
            raise ConfigurationError(
                f"{_POLICY_KWARG} must be a dbresilience.Policy, got {type(base).__name__}"
            )
        changes: dict[str, Any] = {}
        for key, raw in url.query.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX) :]
            if not isinstance(raw, str):  # ?x=1&x=2 gives a tuple
                raise ConfigurationError(f"URL query parameter {key!r} given more than once")
            changes[name] = parse_policy_value(name, raw, source=f"URL query parameter {key!r}")
        for key in [k for k in kwargs if k.startswith(PREFIX)]:
            name = key[len(PREFIX) :]
            raw = kwargs.pop(key)
            if name in changes:
                raise ConfigurationError(
                    f"dbresilience policy field {name!r} given both in the URL query and as "
                    f"create_engine argument {key!r}: keep one"
                )
            changes[name] = parse_policy_value(name, raw, source=f"create_engine argument {key!r}")
        try:
            return dataclasses.replace(base or Policy(), **changes)
        except ValueError as exc:  # Policy's own validation names the field and the value
            raise ConfigurationError(f"bad dbresilience policy: {exc}") from None

    def update_url(self, url: URL) -> URL:
        """``url`` without the ``dbresilience_*`` query parameters."""
        return url.difference_update_query([k for k in url.query if k.startswith(PREFIX)])

    def engine_created(self, engine: Engine) -> None:
        """Install dbresilience on ``engine`` (for ``create_async_engine``: the sync one)."""
        install(engine, self.policy)
