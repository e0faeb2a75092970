"""An example web app (stdlib WSGI, no framework) whose database code uses dbresilience.

Endpoints: ``POST /orders`` (JSON ``{"item": ...}``: 201 with the order id), ``GET /orders``
(count), ``GET /readyz`` (200 when the database answers within 1 s, else 503). The chaos tests
next to it check that each endpoint survives database faults.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection, Engine, text

from dbresilience import check_health, create_resilient_engine, run_transaction

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
Wsgi = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

SCHEMA = "create table if not exists orders (id serial primary key, item text not null)"


def make_engine(url: str) -> Engine:
    """The app's only dbresilience-specific line: the engine factory."""
    return create_resilient_engine(url, pool_size=4, max_overflow=0)


def make_app(engine: Engine) -> Wsgi:
    """The WSGI application over ``engine``."""
    with engine.begin() as conn:
        conn.execute(text(SCHEMA))

    def place_order(conn: Connection, item: str) -> int:
        row = conn.execute(text("insert into orders (item) values (:i) returning id"), {"i": item})
        return int(row.scalar_one())

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        status, body = "404 Not Found", {"error": "not found"}
        if (method, path) == ("POST", "/orders"):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            item = json.loads(environ["wsgi.input"].read(length))["item"]
            order_id = run_transaction(engine, lambda conn: place_order(conn, item))
            status, body = "201 Created", {"id": order_id}
        elif (method, path) == ("GET", "/orders"):
            with engine.connect() as conn:  # plain SQLAlchemy code, unchanged
                count = conn.execute(text("select count(*) from orders")).scalar_one()
            status, body = "200 OK", {"count": count}
        elif (method, path) == ("GET", "/readyz"):
            ready = check_health(engine, timeout=1.0).ready
            status = "200 OK" if ready else "503 Service Unavailable"
            body = {"ready": ready}
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]

    return app
