"""pytest plugin for ``compare_sqlalchemy_suite.py``, loaded into SQLAlchemy's own test run.

With ``DBRESILIENCE_SA_SUITE_MODE=plugin`` (the suite's ``--dburi`` then ends in
``?plugin=dbresilience``):

* checks that the suite's main engine (``sqlalchemy.testing.config.db``) is resilient, and
  fails the whole run at once if it is not;
* makes every other PostgreSQL engine the suite builds with ``testing_engine()`` resilient
  too: they are made from ``config.db.url``, which SQLAlchemy stripped of ``plugin=``, so the
  plugin is added to the suite's shared engine options (``config.db_opts``) under a name
  registered here, ``dbresilience_suite``: dbresilience's plugin, except that it leaves the
  non-PostgreSQL engines (a few tests make SQLite ones) alone.

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


class SuitePlugin(ResiliencePlugin):
    """dbresilience's plugin for PostgreSQL URLs; nothing for the others."""

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        self.active = url.get_backend_name() == "postgresql"
        if self.active:
            super().__init__(url, kwargs)
        else:
            self.url = url

    def update_url(self, url: URL) -> URL:
        return super().update_url(url) if self.active else url

    def engine_created(self, engine: Engine) -> None:
        if self.active:
            super().engine_created(engine)
            _installed[0] += 1


class CountingPlugin(ResiliencePlugin):
    """dbresilience's plugin, counted (the ``?plugin=dbresilience`` of the main engine)."""

    def engine_created(self, engine: Engine) -> None:
        super().engine_created(engine)
        _installed[0] += 1


plugins.register("dbresilience_suite", __name__, "SuitePlugin")
if MODE == "plugin":
    # Shadows the installed entry point for this run only, to count the main engine too.
    plugins.register("dbresilience", __name__, "CountingPlugin")


def _main_engine_resilient() -> bool:
    from sqlalchemy.testing import config

    from dbresilience._engine_hooks import resilience_of

    try:
        resilience_of(config.db)  # type: ignore[arg-type]  # untyped: None until configured
    except ValueError:
        return False
    return True


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    if MODE != "plugin":
        return
    if not _main_engine_resilient():
        pytest.exit("the suite's main engine is not resilient: is ?plugin=dbresilience in --dburi?")
    from sqlalchemy.testing import config

    for cfg in config.Config.all_configs():  # type: ignore[no-untyped-call]
        cfg.db_opts["plugins"] = ["dbresilience_suite"]


def pytest_sessionfinish(session: pytest.Session) -> None:
    if REPORT:
        report = {
            "mode": MODE,
            "main_engine_resilient": _main_engine_resilient(),
            "engines_installed": _installed[0],
        }
        with open(REPORT, "w") as f:
            json.dump(report, f)
