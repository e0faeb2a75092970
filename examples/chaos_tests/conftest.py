"""Fixtures of the example suite; the database ones (dbr_*) come from dbresilience's plugin."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from app import Wsgi, make_app, make_engine


class Client:
    """Calls the WSGI app in-process, like a framework's test client."""

    def __init__(self, app: Wsgi) -> None:
        self.app = app

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "CONTENT_LENGTH": str(len(data)),
            "wsgi.input": io.BytesIO(data),
        }
        status: list[str] = []
        chunks = self.app(environ, lambda s, headers: status.append(s))
        return int(status[0].split()[0]), json.loads(b"".join(chunks))


@pytest.fixture
def client(dbr_chaos_url: str) -> Iterator[Client]:
    """The app on the test's database, through the chaos proxy."""
    engine = make_engine(dbr_chaos_url)
    yield Client(make_app(engine))
    engine.dispose()
