"""Alembic migrations through a resilient engine.

``DATABASE_URL=postgresql+psycopg://app:pw@db/app alembic -c examples/alembic_migrations/alembic.ini
upgrade head`` (or ``sqlalchemy.url`` in alembic.ini).

What the resilient engine changes for a migration:

* Connecting rides out a restarting or briefly unreachable server (``connect_deadline``,
  10 s) instead of failing the deploy at once; auth errors and a missing database still fail
  at once.
* On PostgreSQL, Alembic runs ``upgrade`` in **one transaction** (transactional DDL: every
  pending migration and the ``alembic_version`` update, then one COMMIT).
* A migration statement is never replayed. dbresilience only ever re-runs a transaction's
  *first* statement, when it failed because the connection was dead: the transaction it
  started cannot have committed anything, so only the re-run can take effect. Here that
  statement is Alembic's own look-up of ``alembic_version``, never a migration's.
* When the connection dies in the middle of the migration, ``alembic upgrade`` fails with
  ``dbresilience.DisconnectError`` (an ``OperationalError``); the server rolls the whole
  transaction back: no table half-altered, ``alembic_version`` unchanged. Run
  ``alembic upgrade head`` again (``tests/test_framework_examples.py`` does exactly that).
* When it dies during the final COMMIT, the engine asks the server whether that transaction
  committed (``pg_xact_status``): committed -> success; rolled back -> ``DisconnectError``,
  run it again; unknowable (e.g. the server stayed down for ``commit_check_timeout``) ->
  ``CommitOutcomeUnknown``: look at ``alembic current`` before running it again.
* With ``transaction_per_migration=True`` each migration commits on its own: a failure
  leaves the ones before it applied (``alembic upgrade head`` again resumes after them), and
  a migration's first statement may be re-run as above (nothing of its transaction ran).
  Statements in ``op.get_context().autocommit_block()`` (``CREATE INDEX CONCURRENTLY``) are
  never re-run; a failed concurrent build leaves an INVALID index to drop before rerunning.
* ``command_timeout`` is off here (``0``): a migration statement may run longer than its
  default 300 s cap (an index build, a backfill). Hangs are still caught: the hang monitor
  leaves a statement the server is running or a lock wait alone, and aborts a dead link or a
  hung server's calls within seconds.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.pool import NullPool

import dbresilience

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)

target_metadata = None  # your models' MetaData, for autogenerate

URL = os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url")


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: emit the SQL script, no database connection."""
    context.configure(url=URL, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on one connection of a resilient engine, in one transaction."""
    if not URL:
        raise SystemExit("set DATABASE_URL or sqlalchemy.url in alembic.ini")
    engine = dbresilience.create_resilient_engine(
        URL, poolclass=NullPool, policy=dbresilience.Policy(command_timeout=0)
    )
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
