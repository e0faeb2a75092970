"""A SQLModel app: the one dbresilience line is ``plugins=["dbresilience"]`` on its engine.

Run against any server: ``DATABASE_URL=postgresql+psycopg://... python examples/sqlmodel_app.py``.

``sqlmodel.create_engine`` is SQLAlchemy's, so the URL plugin works as is: in the URL
(``?plugin=dbresilience``) or as ``plugins=[...]`` with policy fields as keyword arguments.
Sessions are SQLModel's own; :func:`dbresilience.run_transaction` takes one (with no
transaction open) for writes that must happen exactly once.
"""

from __future__ import annotations

import os

from sqlalchemy import Engine
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

import dbresilience


class Hero(SQLModel, table=True):
    __tablename__ = "sqlmodel_heroes"
    id: int | None = Field(default=None, primary_key=True)
    name: str
    power: int


def make_engine(url: str) -> Engine:
    """A resilient engine on ``url`` (``postgresql+psycopg://``); creates the tables."""
    engine = create_engine(url, plugins=["dbresilience"], dbresilience_attempts=5)
    SQLModel.metadata.create_all(engine)
    return engine


def add_hero(engine: Engine, name: str, power: int) -> int:
    """Insert a hero exactly once, whatever the faults; return its id."""

    def insert(session: Session) -> int:  # may run more than once; never commits
        hero = Hero(name=name, power=power)
        session.add(hero)
        session.flush()
        assert hero.id is not None
        return hero.id

    with Session(engine) as session:
        return dbresilience.run_transaction(session, insert)


def strongest(engine: Engine, limit: int = 3) -> list[str]:
    """Names of the ``limit`` strongest heroes (plain SQLModel code)."""
    with Session(engine) as session:
        heroes = session.exec(select(Hero).order_by(col(Hero.power).desc()).limit(limit))
        return [hero.name for hero in heroes]


def main() -> None:
    url = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    engine = make_engine(url)
    for name, power in [("Deadpond", 3), ("Spider-Boy", 7), ("Rusty-Man", 9)]:
        add_hero(engine, name, power)
    print(f"strongest: {strongest(engine)}; stats: {dbresilience.get_stats(engine)}")
    engine.dispose()


if __name__ == "__main__":
    main()
