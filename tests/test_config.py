"""Bad input gets a clear error naming the problem; the public API is pinned."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import create_engine, exc

import dbresilience
from dbresilience import ConfigurationError, Policy, create_resilient_engine


def test_exported_names_are_pinned() -> None:
    assert dbresilience.__all__ == sorted(dbresilience.__all__, key=lambda n: (n.upper() != n, n))
    assert set(dbresilience.__all__) == {
        "IDEMPOTENT_OPTION",
        "CircuitOpen",
        "Classification",
        "CommitOutcomeUnknown",
        "ConfigurationError",
        "DatabaseUnavailable",
        "DisconnectError",
        "ErrorKind",
        "HealthReport",
        "PermanentError",
        "Policy",
        "PoolCounts",
        "ResilienceError",
        "ResourceExhausted",
        "RetryDetails",
        "RetryHook",
        "StatementTimeout",
        "BreakerTransition",
        "CommitCounts",
        "CommitResolved",
        "ConnectFailure",
        "Disconnect",
        "EngineStats",
        "Event",
        "EventHook",
        "HangAbort",
        "Invalidation",
        "PoolStats",
        "Replay",
        "RetryCounts",
        "StatementTimedOut",
        "add_event_hook",
        "remove_event_hook",
        "instrument_opentelemetry",
        "register_prometheus",
        "Stats",
        "TransactionConflict",
        "add_hook",
        "check_health",
        "check_health_async",
        "async_session_factory",
        "classify",
        "create_async_resilient_engine",
        "create_resilient_engine",
        "get_stats",
        "install",
        "remove_hook",
        "run_async_transaction",
        "run_transaction",
        "set_testing",
        "transactional",
    }
    for name in dbresilience.__all__:
        assert hasattr(dbresilience, name), name


def test_malformed_url_is_a_clear_error_without_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        create_resilient_engine("postgresql+psycopg://app:hunter2@db:notaport/x")
    message = str(info.value)
    assert "malformed database URL" in message
    assert "hunter2" not in message
    # Existing except clauses keep working: it is both a ValueError and an ArgumentError.
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, exc.ArgumentError)


def test_garbage_url() -> None:
    with pytest.raises(ConfigurationError, match="malformed database URL"):
        create_resilient_engine("definitely not a url")


def test_non_postgres_url_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="PostgreSQL only, not 'sqlite'"):
        create_resilient_engine("sqlite://")


@pytest.mark.parametrize("driver", ["psycopg2", "pg8000", "asyncpg"])
def test_unsupported_driver_is_named_before_importing_it(driver: str) -> None:
    with pytest.raises(ConfigurationError, match=f"unsupported PostgreSQL driver '{driver}'"):
        create_resilient_engine(f"postgresql+{driver}://u:pw@h/db")


def test_install_names_an_unsupported_driver() -> None:
    from dbresilience._drivers import driver_for

    with pytest.raises(ConfigurationError, match="unsupported PostgreSQL driver 'pg8000'"):
        driver_for("pg8000")


def test_async_driver_in_sync_factory_is_refused() -> None:
    pytest.importorskip("asyncpg")
    with pytest.raises(ConfigurationError, match="use create_async_resilient_engine"):
        create_resilient_engine("postgresql+asyncpg://u@h/db")


def test_install_twice_is_refused() -> None:
    engine = create_engine("postgresql+psycopg://u@h/db")
    dbresilience.install(engine)
    with pytest.raises(ConfigurationError, match="already installed"):
        dbresilience.install(engine)


def test_install_rejects_a_non_policy() -> None:
    engine = create_engine("postgresql+psycopg://u@h/db")
    with pytest.raises(ConfigurationError, match=r"policy must be a dbresilience\.Policy"):
        dbresilience.install(engine, policy={"attempts": 3})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("connect_timeout", 1, "connect_timeout must be >= 2 seconds"),
        ("connect_deadline", -1.0, "connect_deadline must be >= 0 seconds"),
        ("liveness_window", math.inf, "liveness_window must be finite"),
        ("attempts", 0, "attempts must be an integer >= 1"),
        ("attempts", 2.5, "attempts must be an integer >= 1"),
        ("keepalives_count", True, "keepalives_count must be a number"),
        ("wait_initial", "0.1", "wait_initial must be a number"),
        ("replay_first_statement", 1, "replay_first_statement must be a bool"),
        ("deadline", 0, "deadline must be > 0 seconds"),
    ],
)
def test_bad_policy_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=rf"Policy\.{message}"):
        Policy(**{field: value})  # type: ignore[arg-type]


def test_policy_cross_field_checks() -> None:
    with pytest.raises(ValueError, match="wait_max must be >= wait_initial"):
        Policy(wait_initial=2.0, wait_max=1.0)
    with pytest.raises(ValueError, match="connect_wait_max must be >= connect_wait_initial"):
        Policy(connect_wait_initial=1.0, connect_wait_max=0.5)


def test_policy_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        Policy(5.0)  # type: ignore[misc]
    policy = Policy()
    with pytest.raises(AttributeError):
        policy.attempts = 3  # type: ignore[misc]


def test_set_testing_is_a_context_manager() -> None:
    from dbresilience._retrying import is_testing

    assert not is_testing()
    with dbresilience.set_testing(True):
        assert is_testing()
    assert not is_testing()
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        dbresilience.set_testing(True, attempts=0)


def test_sync_api_imports_without_greenlet_or_asyncpg() -> None:
    """`pip install dbresilience[psycopg]` / `[demo]` brings no greenlet: importing must work."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('greenlet', 'asyncpg'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dbresilience, dbresilience.cli, dbresilience.testing\n"
        "assert callable(dbresilience.create_resilient_engine)\n"
        "try:\n"
        "    dbresilience.run_async_transaction\n"
        "except ImportError:\n"
        "    print('async needs greenlet')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "async needs greenlet" in out.stdout
