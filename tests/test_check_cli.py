"""``dbresilience check URL`` against real servers: live, bad password, stopped, wrong port,
black-holed, multi-host, malformed URLs; the password never appears in any output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
from _support import SCRAM_ROLE, SCRAM_SECRET

from dbresilience._engine import parse_url
from dbresilience.cli import _check, _check_advice, main
from dbresilience.testing import ChaosProxy, PgBouncer, PostgresCluster, find_pgbouncer, free_port

pytestmark = pytest.mark.timeout(60)

SECRET = SCRAM_SECRET
ROLE = SCRAM_ROLE


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """No wrapping in rich's tables, so that substrings are found whole."""
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.delenv("DATABASE_URL", raising=False)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, err = _run(capsys, "--json", *argv)
    assert SECRET not in out + err
    data: dict[str, Any] = json.loads(out)
    return code, data


def _no_secret(*texts: str, secret: str = SECRET) -> None:
    for shown in texts:
        assert secret not in shown


def test_live_server(scram_pg: PostgresCluster, capsys: pytest.CaptureFixture[str]) -> None:
    url = scram_pg.url(user=ROLE, password=SECRET)
    code, out, err = _run(capsys, url)
    assert code == 0, out + err
    _no_secret(out, err)
    assert f"postgresql+psycopg://{ROLE}:***@127.0.0.1:{scram_pg.port}/postgres" in out
    ((version,),) = scram_pg.execute("show server_version")
    assert f"PostgreSQL {version}, primary" in out
    assert "OK: every host reachable and authenticated" in out
    assert "connect_timeout is not set in the URL" in out  # the only warning for this URL
    assert "a resilient engine on this URL: get_stats()" in out

    code, data = _run_json(capsys, url)
    assert code == 0
    assert data["ok"] is True
    assert data["url"] == f"postgresql+psycopg://{ROLE}:***@127.0.0.1:{scram_pg.port}/postgres"
    (host,) = data["hosts"]
    assert host["ok"] is True
    assert host["addresses"] == ["127.0.0.1"]
    assert host["tcp_address"] == "127.0.0.1"
    assert host["tcp_latency"] > 0
    assert host["tls"] is False  # the test server has no certificate
    assert host["auth"] == "ok"
    assert host["server_version"] == version
    assert host["role"] == "primary"
    assert 0 < host["latency"] < 1.0
    assert host["error"] is None
    # What a resilient engine saw over the check's statements (get_stats()).
    engine = data["engine"]
    assert engine["pool"]["idle"] == 1 and engine["pool"]["checked_out"] == 0
    assert engine["retries"] == {"connect": 0, "statement": 0, "transaction": 0, "commit_check": 0}
    assert engine["connect_failures"] == 0 and engine["breaker"] == "closed"
    assert engine["engine"] == data["url"]
    settings = {s["name"]: (s["value"], s["source"]) for s in data["settings"]}
    assert settings["connect_timeout"] == ("5", "policy")
    assert settings["keepalives"] == ("1", "policy")
    assert settings["tcp_user_timeout"] == ("30000", "policy")
    (warning,) = data["warnings"]  # the only one, as in the human output
    assert "connect_timeout is not set in the URL" in warning


def test_bad_password(scram_pg: PostgresCluster, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = "not-" + SECRET
    url = scram_pg.url(user=ROLE, password=wrong)
    code, out, err = _run(capsys, url)
    assert code == 1
    _no_secret(out, err, secret=wrong)
    assert "password authentication failed" in out
    assert "FAILED" in out

    code, data = _run_json(capsys, url)
    assert code == 1
    assert wrong not in json.dumps(data)
    (host,) = data["hosts"]
    assert host["auth"] == "failed"
    assert host["tcp_address"] == "127.0.0.1"  # reachable: only the login failed
    assert host["error"].startswith("permanent:")
    assert host["server_version"] is None


def test_stopped_server(pg: PostgresCluster, capsys: pytest.CaptureFixture[str]) -> None:
    pg.stop()
    started = time.monotonic()
    code, data = _run_json(capsys, "--timeout", "2", pg.url(password=SECRET))
    assert time.monotonic() - started < 3.0
    assert code == 1
    (host,) = data["hosts"]
    assert host["ok"] is False
    assert host["tcp_address"] is None
    assert host["auth"] is None
    assert host["error"] == "unavailable: [Errno 111] Connection refused"


def test_wrong_port_human_output(
    scram_pg: PostgresCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, scram_pg.url(user=ROLE, password=SECRET, port=free_port()))
    assert code == 1
    _no_secret(out, err)
    assert "Connection refused" in out
    assert "FAILED" in out


def test_blackholed_server_is_bounded_by_timeout(
    scram_pg: PostgresCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    with ChaosProxy(scram_pg.host, scram_pg.port) as proxy:
        proxy.blackhole()  # TCP connects; the server never answers
        url = f"postgresql://{ROLE}:{SECRET}@{proxy.host}:{proxy.port}/postgres"
        started = time.monotonic()
        code, data = _run_json(capsys, "--timeout", "1", url)
        elapsed = time.monotonic() - started
    assert code == 1
    assert elapsed < 2.0  # DNS and TCP are instant here; the login waits 1 s
    (host,) = data["hosts"]
    assert host["tcp_address"] == "127.0.0.1"
    assert host["error"] == "timeout: no answer within 1 s"


def test_multi_host(scram_pg: PostgresCluster, capsys: pytest.CaptureFixture[str]) -> None:
    dead = free_port()
    url = (
        f"postgresql+psycopg://{ROLE}:{SECRET}@/postgres"
        f"?host=127.0.0.1:{scram_pg.port}&host=localhost:{dead}&connect_timeout=5"
    )
    code, data = _run_json(capsys, url)
    assert code == 1  # every host must be reachable
    first, second = data["hosts"]
    assert (first["host"], first["port"], first["ok"]) == ("127.0.0.1", scram_pg.port, True)
    assert (second["host"], second["port"], second["ok"]) == ("localhost", dead, False)
    assert "refused" in second["error"]
    settings = {s["name"]: (s["value"], s["source"]) for s in data["settings"]}
    assert settings["connect_timeout"] == ("5", "url")
    assert data["warnings"] == []

    # The comma form, both hosts up: exit 0.
    url = (
        f"postgresql://{ROLE}:{SECRET}@/postgres?host=127.0.0.1,localhost"
        f"&port={scram_pg.port},{scram_pg.port}"
    )
    code, data = _run_json(capsys, url)
    assert code == 0, data
    assert [h["host"] for h in data["hosts"]] == ["127.0.0.1", "localhost"]


def test_risky_settings_are_warned_about(
    scram_pg: PostgresCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    url = scram_pg.url(user=ROLE, password=SECRET) + "?keepalives=0&connect_timeout=120"
    code, data = _run_json(capsys, url)
    assert code == 0
    warnings = "\n".join(data["warnings"])
    assert "keepalives=0 in the URL" in warnings
    assert "connect_timeout=120 in the URL" in warnings
    settings = {s["name"]: (s["value"], s["source"]) for s in data["settings"]}
    assert settings["keepalives"] == ("0", "url")
    assert settings["connect_timeout"] == ("120", "url")


def test_url_from_environment(
    scram_pg: PostgresCluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", scram_pg.url(user=ROLE, password=SECRET))
    code, data = _run_json(capsys)
    assert code == 0
    assert data["hosts"][0]["auth"] == "ok"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"postgresql://app:{SECRET}@db:notaport/app", "malformed database URL"),
        (f"postgresql://app:{SECRET}@/app?host=a,b&port=1,2,3", "2 hosts but 3 ports"),
        (f"postgresql://app:{SECRET}@/app?host=db:99999", "invalid port 99999"),
        (f"mysql://app:{SECRET}@db/app", "PostgreSQL only"),
        ("not a url at all", "malformed database URL"),
    ],
)
def test_malformed_url_exits_two_without_the_password(
    url: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in ([url], ["--json", url]):
        code, out, err = _run(capsys, *argv)
        assert code == 2
        assert out == ""
        assert message in err
        _no_secret(out, err)


def test_no_url_exits_two(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys)
    assert code == 2
    assert "DATABASE_URL" in err


def test_password_in_the_query_is_used_and_masked(
    scram_pg: PostgresCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://{ROLE}@127.0.0.1:{scram_pg.port}/postgres?password={SECRET}"
    code, out, err = _run(capsys, url)
    assert code == 0, out + err
    _no_secret(out, err)
    assert "password=***" in out


def test_tls_warnings_for_a_non_local_host() -> None:
    # Pure logic (no non-local server in the test environment): what a finished check warns.
    url = parse_url("postgresql://app@db.example.com/app?connect_timeout=5")
    plain = _check.HostCheck(host="db.example.com", port=5432, addresses=["192.0.2.7"])
    plain.tls, plain.auth = False, "ok"
    result = _check.CheckResult(
        url="", driver="psycopg", timeout=5, hosts=[plain], settings=[], warnings=[]
    )
    (warning,) = _check_advice.warnings_for(url, "psycopg", result, [])
    assert warning.startswith("no TLS to non-local host db.example.com:5432")

    plain.tls = True
    (warning,) = _check_advice.warnings_for(url, "psycopg", result, [])
    assert warning.startswith("sslmode=prefer to db.example.com:5432")

    url = parse_url("postgresql://app@db.example.com/app?connect_timeout=5&sslmode=disable")
    plain.tls = False
    (warning,) = _check_advice.warnings_for(url, "psycopg", result, [])
    assert warning.startswith("sslmode=disable to non-local host")

    local = _check.HostCheck(host="localhost", port=5432, addresses=["127.0.0.1", "::1"])
    local.tls = False
    result.hosts = [local]
    assert _check_advice.warnings_for(url, "psycopg", result, []) == []


def test_help_lists_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "check" in capsys.readouterr().out
    assert main(["check", "--help"]) == 0
    assert "--timeout" in capsys.readouterr().out


def test_json_needs_no_rich(shared_pg: PostgresCluster) -> None:
    code = (
        "import sys; sys.modules['rich'] = None\n"  # as if rich were not installed
        "from dbresilience.cli import main\n"
        f"sys.exit(main(['check', '--json', {shared_pg.url()!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["hosts"][0]["role"] == "primary"
    assert "rich" not in done.stderr


@pytest.mark.skipif(find_pgbouncer() is None, reason="needs Debian's pgbouncer package")
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_a_pooler_is_noticed_and_prepared_statements_advice_given(
    shared_pg: PostgresCluster, driver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, data = _run_json(capsys, shared_pg.url(driver))
    assert code == 0
    assert data["hosts"][0]["pooler"] is False
    assert not any("pooler" in w for w in data["warnings"])

    with PgBouncer(shared_pg, pool_mode="transaction") as bouncer:
        code, data = _run_json(capsys, bouncer.url(driver))
        human_code, out, _ = _run(capsys, bouncer.url(driver))
    assert code == 0 and human_code == 0
    assert data["hosts"][0]["pooler"] is True
    (advice,) = [w for w in data["warnings"] if "pooler" in w]
    assert advice.startswith(f"127.0.0.1:{bouncer.port}: a connection pooler answers")
    setting = {"psycopg": '"prepare_threshold": None', "asyncpg": '"statement_cache_size": 0'}
    assert setting[driver] in advice
    assert "through a connection pooler" in out
