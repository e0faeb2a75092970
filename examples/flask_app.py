"""A Flask-SQLAlchemy app made resilient by its URL alone: no dbresilience code in it.

::

    export DATABASE_URL='postgresql+psycopg://app:pw@db/app?plugin=dbresilience'
    flask --app examples/flask_app run

``?plugin=dbresilience`` loads dbresilience's SQLAlchemy plugin into the engine
Flask-SQLAlchemy creates; policy fields go in the URL too
(``&dbresilience_command_timeout=20``) or in ``SQLALCHEMY_ENGINE_OPTIONS``
(``{"dbresilience_attempts": 5}``). A pooled connection killed between requests is replaced
(or the request's first statement re-run on a new one) instead of failing the request. For a
unit of work that must survive any fault exactly once, ``dbresilience.run_transaction(
db.session(), fn)`` retries it (``fn`` must not commit).
"""

from __future__ import annotations

import os

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Note(db.Model):  # type: ignore[name-defined,misc]  # db.Model is dynamic
    __tablename__ = "flask_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


def create_app(url: str | None = None) -> Flask:
    """The app on ``url`` (default: ``DATABASE_URL``)."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = url or os.environ.get(
        "DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres?plugin=dbresilience"
    )
    db.init_app(app)
    with app.app_context():
        db.create_all()

    @app.post("/notes")
    def add_note() -> dict[str, int]:
        note = Note(text=request.get_json()["text"])
        db.session.add(note)
        db.session.commit()
        return {"id": note.id}

    @app.get("/notes")
    def list_notes() -> dict[str, list[str]]:
        return {"notes": list(db.session.scalars(select(Note.text).order_by(Note.id)))}

    return app
