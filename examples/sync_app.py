"""A plain SQLAlchemy ORM app; the only dbresilience line is the engine factory.

Run against any server: ``DATABASE_URL=postgresql+psycopg://... python examples/sync_app.py``.
"""

from __future__ import annotations

import os

from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import dbresilience


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "example_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(100))


def main() -> None:
    url = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    engine = dbresilience.create_resilient_engine(url, pool_size=5)  # was: create_engine(url)
    Base.metadata.create_all(engine)
    SessionLocal = sessionmaker(bind=engine)

    # Existing code keeps working unchanged (disconnects are absorbed where safe) ...
    with SessionLocal.begin() as session:
        session.add(Order(item="unchanged app code"))

    # ... and units of work that must survive any fault exactly once use run_transaction.
    def place_order(session: Session) -> int:
        order = Order(item="exactly once")
        session.add(order)
        session.flush()
        return order.id

    order_id = dbresilience.run_transaction(SessionLocal, place_order)
    with SessionLocal() as session:
        count = len(session.scalars(select(Order)).all())
    print(f"order {order_id} placed; {count} orders; stats: {dbresilience.get_stats(engine)}")


if __name__ == "__main__":
    main()
