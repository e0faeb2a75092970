"""The engine hooks, one concern per module; :mod:`dbresilience._engine_hooks` installs them.

- :mod:`._state` - :class:`EngineResilience`: one engine's policy, driver, stats, circuit
  breaker, and the watchdog-bounded calls every hook uses;
- :mod:`.connect` - new connections: network defaults (``do_connect``), retries and the
  breaker (the pool's creator, wrapped);
- :mod:`.liveness` - vetting the connections the pool hands out (its ``_do_get``, wrapped);
- :mod:`.statements` - the statement guard: the watchdog bound and first-statement replay
  (the dialect's ``do_execute*``, wrapped);
- :mod:`.commit` - COMMIT (verification) and ROLLBACK (moot on a dead connection);
- :mod:`.errors` - the ``handle_error`` listener: classification into our exceptions.

Written once for sync and async engines: with an AsyncEngine the hooks run inside
SQLAlchemy's greenlet, where driver calls block only the current task; the only waits of our
own (:meth:`EngineResilience.sleep`) go through the event loop there.
"""
