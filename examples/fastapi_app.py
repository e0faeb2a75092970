"""A FastAPI app on a resilient async engine: async sessions, exactly-once writes, probes.

Run against any server (asyncpg or psycopg async)::

    DATABASE_URL=postgresql+asyncpg://app:pw@db/app uvicorn fastapi_app:app --app-dir examples

* ``POST /orders`` writes through :func:`dbresilience.run_async_transaction`: retried on a
  lost connection, a restart or a serialization failure, and a COMMIT whose reply was lost is
  verified, never run twice.
* ``GET /orders/{id}`` reads through a plain request-scoped session
  (``Depends(SessionLocal.dependency)``): a dead pooled connection is replaced at checkout,
  or its first statement re-run on a new connection.
* ``/healthz`` (liveness) never touches the database; ``/readyz`` (readiness) answers 503
  while the database is unreachable or the circuit breaker is open, within 2 s.

``tests/test_framework_examples.py`` runs it under uvicorn and restarts the server in the
middle of a burst of concurrent requests: none fails.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import String
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import dbresilience


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "fastapi_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(100))


class OrderIn(BaseModel):
    item: str


def create_app(url: str) -> FastAPI:
    """The app on ``url`` (``postgresql+asyncpg://`` or ``postgresql+psycopg://``)."""
    engine = dbresilience.create_async_resilient_engine(url, pool_size=10, max_overflow=10)
    SessionLocal = dbresilience.async_session_factory(engine)
    # A request-scoped session (no `from __future__ import annotations` here: FastAPI reads
    # this local alias when the route is declared).
    SessionDep = Annotated[AsyncSession, Depends(SessionLocal.dependency)]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/orders")
    async def place_order(order: OrderIn) -> dict[str, int]:
        async def place(session: AsyncSession) -> int:  # may run more than once; never commits
            row = Order(item=order.item)
            session.add(row)
            await session.flush()
            return row.id

        return {"id": await dbresilience.run_async_transaction(SessionLocal, place)}

    @app.get("/orders/{order_id}")
    async def get_order(order_id: int, session: SessionDep) -> dict[str, object]:
        row = await session.get(Order, order_id)
        if row is None:
            raise HTTPException(status_code=404, detail="no such order")
        return {"id": row.id, "item": row.item}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}  # liveness: the process answers; the database is not asked

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        report = await dbresilience.check_health_async(engine, timeout=2.0)
        return JSONResponse(report.to_dict(), status_code=200 if report.ready else 503)

    return app


app = create_app(
    os.environ.get("DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
)
