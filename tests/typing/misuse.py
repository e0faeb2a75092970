"""Mistakes mypy must catch (test_typing.py expects exactly these errors)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from dbresilience import create_resilient_engine, run_transaction, transactional

engine = create_resilient_engine("postgresql+psycopg://app@db/app")


def names(session: Session) -> list[str]:
    return []


run_transaction(engine, names)  # an Engine gives fn a Connection, not a Session


@transactional(engine)
def bump(conn: object, by: int) -> None: ...


bump("one")  # the decorated function keeps its signature
