"""The example app's endpoints survive database faults (dbresilience's pytest plugin).

Run: ``cd examples/chaos_tests && pytest``. ``dbr_faults`` acts on a real PostgreSQL server
and on the chaos proxy that ``dbr_chaos_url`` goes through.
"""

from __future__ import annotations

import time

from conftest import Client

from dbresilience.testing import FaultController, Latency


def test_order_endpoint_survives_a_database_restart(
    client: Client, dbr_faults: FaultController
) -> None:
    assert client.request("POST", "/orders", {"item": "before"})[0] == 201
    dbr_faults.restart(down_for=1.0)  # every pooled connection is now dead
    assert client.request("POST", "/orders", {"item": "after"})[0] == 201
    assert client.request("GET", "/orders") == (200, {"count": 2})


def test_order_endpoint_survives_a_restart_while_it_is_called(
    client: Client, dbr_faults: FaultController
) -> None:
    dbr_faults.background(dbr_faults.restart, down_for=1.0)
    statuses = [client.request("POST", "/orders", {"item": i})[0] for i in range(30)]
    dbr_faults.join()
    assert statuses == [201] * 30
    assert client.request("GET", "/orders") == (200, {"count": 30})


def test_endpoints_survive_killed_backends(client: Client, dbr_faults: FaultController) -> None:
    assert client.request("POST", "/orders", {"item": "a"})[0] == 201
    assert dbr_faults.kill_backends() >= 1
    assert client.request("GET", "/orders") == (200, {"count": 1})  # plain SQLAlchemy code
    assert dbr_faults.kill_backends() >= 1
    assert client.request("POST", "/orders", {"item": "b"})[0] == 201


def test_endpoints_survive_connection_resets(client: Client, dbr_faults: FaultController) -> None:
    for i in range(5):
        assert client.request("POST", "/orders", {"item": i})[0] == 201
        dbr_faults.reset_all()  # a TCP RST on every connection (a load balancer, a NAT...)
    assert client.request("GET", "/orders") == (200, {"count": 5})


def test_order_endpoint_under_latency(client: Client, dbr_faults: FaultController) -> None:
    name = dbr_faults.add_toxic(Latency(latency=0.05, jitter=0.01))  # server -> app
    start = time.monotonic()
    assert client.request("POST", "/orders", {"item": "slow"})[0] == 201
    took = time.monotonic() - start
    dbr_faults.remove_toxic(name)
    assert 0.1 <= took < 2.0  # a few round trips at 40-60 ms each, and no error


def test_readiness_follows_the_database(client: Client, dbr_faults: FaultController) -> None:
    assert client.request("GET", "/readyz") == (200, {"ready": True})
    dbr_faults.down()  # connections refused
    assert client.request("GET", "/readyz") == (503, {"ready": False})
    dbr_faults.heal()
    assert client.request("GET", "/readyz") == (200, {"ready": True})
