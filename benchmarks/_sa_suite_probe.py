"""pytest plugin for ``compare_sqlalchemy_suite.py``, loaded into SQLAlchemy's own test run.

With ``DBRESILIENCE_SA_SUITE_MODE=plugin`` (the suite's ``--dburi`` then ends in
``?plugin=dbresilience``):

* checks that the suite's main engine (``sqlalchemy.testing.config.db``) is resilient, and
  stops the run at once if it is not;
* gives the plugin to every other engine the suite's ``testing_engine()`` builds *on the same
  database* (same driver, host, port and database as the main engine): they are made from
  ``config.db.url``, which SQLAlchemy stripped of ``plugin=``. Engines on other URLs (SQLite,
  ``postgresql+psycopg2://`` over a mock DBAPI, a ``Mock`` posing as a URL) are left alone:
  they never reach the server, and the plugin refuses a psycopg2 URL by design. Engines on
  the suite's URL with a wrapped DBAPI (``module=``: ``reconnecting_engine()``) do get it.

At the end it writes ``{"mode", "main_engine_resilient", "engines_installed"}`` as JSON to
``DBRESILIENCE_SA_SUITE_REPORT``. With ``DBRESILIENCE_SA_SUITE_MODE=plain`` it only reports.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from sqlalchemy.dialects import plugins
from sqlalchemy.engine import URL, Engine

from dbresilience._plugin import ResiliencePlugin

MODE = os.environ.get("DBRESILIENCE_SA_SUITE_MODE", "plain")
REPORT = os.environ.get("DBRESILIENCE_SA_SUITE_REPORT")
_installed: list[int] = [0]


class CountingPlugin(ResiliencePlugin):
    """dbresilience's plugin, counted (the ``?plugin=dbresilience`` of the main engine)."""

    def engine_created(self, engine: Engine) -> None:
        super().engine_created(engine)
        _installed[0] += 1


if MODE == "plugin":
    # Shadows the installed entry point for this run only, to count the main engine too.
    plugins.register("dbresilience", __name__, "CountingPlugin")


def _main_engine_resilient() -> bool:
    from sqlalchemy.testing import config

    from dbresilience._engine_hooks import resilience_of

    db: Any = config.db  # typed as None until the suite configures it
    try:
        resilience_of(db)
    except ValueError:
        return False
    return True


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    if MODE != "plugin":
        return
    if not _main_engine_resilient():
        pytest.exit("the suite's main engine is not resilient: is ?plugin=dbresilience in --dburi?")
    _give_testing_engines_the_plugin()


def _give_testing_engines_the_plugin() -> None:
    import sys

    from sqlalchemy.engine import make_url
    from sqlalchemy.testing import config, engines

    original = engines.testing_engine
    db: Any = config.db  # typed as None until the suite configures it
    main: URL = db.url
    key = (main.drivername, main.host, main.port, main.database)

    def testing_engine(url: Any = None, options: Any = None, **kw: Any) -> Any:
        target = main if url is None else url
        if isinstance(target, (str, URL)):
            target = make_url(target)
            if (target.drivername, target.host, target.port, target.database) == key:
                options = {**(options or {}), "plugins": ["dbresilience"]}
        return original(url, options, **kw)

    # Test modules are imported later (collection) and get it from sqlalchemy.testing.engines;
    # the suite's own modules imported it already.
    for module in list(sys.modules.values()):
        if getattr(module, "testing_engine", None) is original:
            module.__dict__["testing_engine"] = testing_engine


def pytest_sessionfinish(session: pytest.Session) -> None:
    if REPORT:
        report = {
            "mode": MODE,
            "main_engine_resilient": _main_engine_resilient(),
            "engines_installed": _installed[0],
        }
        with open(REPORT, "w") as f:
            json.dump(report, f)
