"""How an application types against dbresilience: checked by mypy --strict (test_typing.py)."""

from __future__ import annotations

from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from typing_extensions import assert_type

from dbresilience import (
    create_async_resilient_engine,
    create_resilient_engine,
    run_async_transaction,
    run_transaction,
    transactional,
)

engine = create_resilient_engine("postgresql+psycopg://app@db/app")
SessionLocal = sessionmaker(bind=engine)


def count(conn: Connection) -> int:
    return int(conn.execute(text("select count(*) from t")).scalar_one())


def names(session: Session) -> list[str]:
    return [str(n) for n in session.execute(text("select name from t")).scalars()]


assert_type(run_transaction(engine, count), int)
assert_type(run_transaction(SessionLocal, names), list[str])


@transactional(SessionLocal)
def transfer(session: Session, src: int, dst: int, amount: int) -> bool:
    return src != dst and amount > 0


assert_type(transfer(1, 2, amount=100), bool)

aengine = create_async_resilient_engine("postgresql+asyncpg://app@db/app")
AsyncSessionLocal = async_sessionmaker(aengine)


async def acount(conn: AsyncConnection) -> int:
    return int((await conn.execute(text("select 1"))).scalar_one())


async def anames(session: AsyncSession) -> list[str]:
    return []


async def main() -> None:
    assert_type(await run_async_transaction(aengine, acount), int)
    assert_type(await run_async_transaction(AsyncSessionLocal, anames), list[str])
