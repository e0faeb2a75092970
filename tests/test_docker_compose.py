"""docker/compose.yaml stays a consistent compose project (validated only: no Docker engine runs
here). :func:`compose_problems` lists what is wrong with a copy of ``docker/``; it must find
nothing in the repository's, and must find each fault planted in a copy."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from dbresilience._engine import check_url, parse_url

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
REQUIRED_SERVICES = ("primary", "standby", "pgbouncer", "app")
POSTGRES_PORT = 5432
_HEALTHCHECK_KINDS = ("CMD", "CMD-SHELL", "NONE")
_DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}|\$\$")


def interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """Compose's interpolation of ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$$``;
    with ``env`` empty by default, so that the file's own defaults are what is checked."""
    env = env or {}

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        found = env.get(match.group("name"))
        return found if found else (match.group("default") or "")

    return _VARIABLE.sub(one, value)


def load(docker_dir: Path) -> dict[str, Any]:
    data = yaml.safe_load((docker_dir / "compose.yaml").read_text())
    assert isinstance(data, dict), "compose.yaml is not a mapping"
    return data


def _depends_on(service: Mapping[str, Any]) -> dict[str, str | None]:
    """``depends_on`` (list or mapping form) as {service: condition or None}."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return {str(name): None for name in raw}
    return {str(k): (v or {}).get("condition") for k, v in raw.items()}


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) for item in raw)
        return {k: interpolate(v) for k, v in pairs}
    return {str(k): interpolate(str(v)) for k, v in raw.items()}


def _bind_mounts(service: Mapping[str, Any], docker_dir: Path) -> list[tuple[Path, str]]:
    """(host path, container path) of the service's bind mounts (short syntax)."""
    mounts = []
    for volume in service.get("volumes") or []:
        source, _, rest = str(volume).partition(":")
        if source.startswith((".", "/")):
            mounts.append(((docker_dir / source).resolve(), rest.split(":")[0]))
    return mounts


def _host_file(service: Mapping[str, Any], docker_dir: Path, container_path: str) -> Path | None:
    """The repository file bind-mounted at ``container_path`` (directly or in a directory)."""
    for host, target in _bind_mounts(service, docker_dir):
        if container_path == target:
            return host
        if container_path.startswith(target.rstrip("/") + "/"):
            return host / container_path[len(target.rstrip("/")) + 1 :]
    return None


def _argument(command: list[str], flag: str) -> str | None:
    """The value after ``flag`` in an argv list."""
    for i, item in enumerate(command[:-1]):
        if item == flag:
            return command[i + 1]
    return None


def _pgbouncer_ini(services: Mapping[str, Any], docker_dir: Path) -> configparser.ConfigParser:
    path = _host_file(services["pgbouncer"], docker_dir, "/etc/pgbouncer/pgbouncer.ini")
    assert path is not None, "pgbouncer: no pgbouncer.ini mounted at /etc/pgbouncer"
    ini = configparser.ConfigParser(inline_comment_prefixes=(";",), comment_prefixes=(";", "#"))
    ini.read_string(path.read_text())
    return ini


def listen_port(name: str, services: Mapping[str, Any], docker_dir: Path) -> int | None:
    """The port the service listens on inside the network, from its own configuration."""
    service = services[name]
    command = [str(c) for c in service.get("command") or []]
    if str(service.get("image", "")).startswith("postgres:"):
        for i, item in enumerate(command[:-1]):
            if item == "-c" and command[i + 1].startswith("port="):
                return int(command[i + 1].split("=", 1)[1])
        return POSTGRES_PORT
    if name == "pgbouncer":
        return _pgbouncer_ini(services, docker_dir).getint("pgbouncer", "listen_port")
    port = _argument(command, "--port")
    return int(port) if port is not None else None


def _healthcheck_problems(name: str, check: Any) -> list[str]:
    if not isinstance(check, dict) or "test" not in check:
        return [f"{name}: healthcheck without a test"]
    test = check["test"]
    problems = []
    if isinstance(test, str):
        if not test.strip():
            problems.append(f"{name}: empty healthcheck test")
    elif isinstance(test, list) and test and all(isinstance(t, str) for t in test):
        kind, args = test[0], test[1:]
        if kind not in _HEALTHCHECK_KINDS:
            problems.append(f"{name}: healthcheck test starts with {kind!r}, not CMD/CMD-SHELL")
        elif kind == "CMD" and not args:
            problems.append(f"{name}: healthcheck CMD without a command")
        elif kind == "CMD-SHELL" and len(args) != 1:
            problems.append(f"{name}: healthcheck CMD-SHELL takes one shell string")
    else:
        problems.append(f"{name}: healthcheck test is neither a string nor a list of strings")
    for key in ("interval", "timeout", "start_period"):
        if key in check and not _DURATION.match(str(check[key])):
            problems.append(f"{name}: healthcheck {key} {check[key]!r} is not a duration")
    return problems


def _dockerfile_problems(name: str, context: Path, dockerfile: Path) -> list[str]:
    problems = []
    for line in dockerfile.read_text().splitlines():
        if line.split()[:1] not in (["COPY"], ["ADD"]):
            continue
        words = shlex.split(line, comments=True)
        sources = [w for w in words[1:-1] if not w.startswith("--")]
        problems.extend(
            f"{name}: {dockerfile.name} copies {source}, not in its build context"
            for source in sources
            if not (context / source).exists()
        )
    return problems


def _script_problems(label: str, path: Path) -> list[str]:
    if not path.is_file():
        return [f"{label}: {path} does not exist"]
    if not os.access(path, os.X_OK):
        return [f"{label}: {path} is not executable"]
    if not path.read_text().startswith("#!"):
        return [f"{label}: {path} has no #! line"]
    return []


def compose_problems(docker_dir: Path) -> list[str]:
    """Everything inconsistent in ``docker_dir`` (a copy of ``docker/``); empty when sound."""
    compose = load(docker_dir)
    services: dict[str, Any] = compose.get("services") or {}
    problems = [f"no {name!r} service" for name in REQUIRED_SERVICES if name not in services]
    if problems:
        return problems
    declared_volumes = set((compose.get("volumes") or {}).keys())

    for name, service in services.items():
        for dep, condition in _depends_on(service).items():
            if dep not in services:
                problems.append(f"{name} depends on unknown service {dep}")
            elif condition == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name} waits for {dep} to be healthy; {dep} has no healthcheck")
            elif condition not in (None, "service_started", "service_healthy",
                                   "service_completed_successfully"):
                problems.append(f"{name}: unknown depends_on condition {condition!r}")
        if "healthcheck" in service:
            problems.extend(_healthcheck_problems(name, service["healthcheck"]))
        if "image" not in service and "build" not in service:
            problems.append(f"{name}: neither image nor build")
        if "build" in service:
            build = service["build"]
            context = (docker_dir / build["context"]).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{name}: build file {dockerfile} does not exist")
            else:
                problems.extend(_dockerfile_problems(name, context, dockerfile))
                for line in dockerfile.read_text().splitlines():
                    if line.startswith("COPY") and line.split()[1].endswith(".sh"):
                        problems.extend(_script_problems(name, context / line.split()[1]))
        for volume in service.get("volumes") or []:
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                if not (docker_dir / source).exists():
                    problems.append(f"{name}: mounted {source} does not exist")
                elif source.endswith(".sh"):
                    problems.extend(_script_problems(name, docker_dir / source))
            elif source not in declared_volumes:
                problems.append(f"{name}: volume {source} is not declared")
        entrypoint = service.get("entrypoint")
        if isinstance(entrypoint, list) and entrypoint and entrypoint[0].startswith("/"):
            host = _host_file(service, docker_dir, entrypoint[0])
            if host is None:
                problems.append(f"{name}: entrypoint {entrypoint[0]} is not mounted")
            else:
                problems.extend(_script_problems(name, host))
        port = listen_port(name, services, docker_dir)
        for mapping in service.get("ports") or []:
            container = int(str(mapping).rsplit(":", 1)[-1].split("/")[0])
            if container != port:
                problems.append(f"{name}: publishes {container}, listens on {port}")
        check = (service.get("healthcheck") or {}).get("test")
        if isinstance(check, list) and "pg_isready" in check:
            probed = _argument(check, "-p")
            if probed is None or int(probed) != port:
                problems.append(f"{name}: pg_isready probes port {probed}, listens on {port}")
        http = isinstance(check, list) and any("http://" in c for c in check)
        if http and not any(f":{port}/" in c for c in check):
            problems.append(f"{name}: the HTTP health check is not on port {port}")

    problems.extend(_replication_problems(services))
    problems.extend(_pgbouncer_problems(services, docker_dir))
    problems.extend(_app_problems(services, docker_dir))
    return problems


def _replication_problems(services: Mapping[str, Any]) -> list[str]:
    problems = []
    standby = services["standby"]
    if _environment(standby).get("UPSTREAM_HOST") != "primary":
        problems.append("standby: UPSTREAM_HOST is not the primary service")
    if "primary" not in _depends_on(standby):
        problems.append("standby: does not depend on primary")
    if _environment(services["primary"]).get("UPSTREAM_HOST"):
        problems.append("primary: UPSTREAM_HOST set by default (it would start as a standby)")
    return problems


def _pgbouncer_problems(services: Mapping[str, Any], docker_dir: Path) -> list[str]:
    ini = _pgbouncer_ini(services, docker_dir)
    problems = []
    if ini.get("pgbouncer", "pool_mode", fallback=None) != "transaction":
        problems.append("pgbouncer: pool_mode is not transaction")
    primary_port = listen_port("primary", services, docker_dir)
    for database, spec in ini.items("databases"):
        fields = dict(word.split("=", 1) for word in spec.split())
        if fields.get("host") != "primary":
            problems.append(f"pgbouncer: database {database} points at {fields.get('host')}")
        if int(fields.get("port", POSTGRES_PORT)) != primary_port:
            problems.append(f"pgbouncer: database {database} on port {fields.get('port')}")
    if "primary" not in _depends_on(services["pgbouncer"]):
        problems.append("pgbouncer: does not depend on primary")
    return problems


def _app_problems(services: Mapping[str, Any], docker_dir: Path) -> list[str]:
    app = services["app"]
    raw = _environment(app).get("DATABASE_URL")
    if raw is None:
        return ["app: no DATABASE_URL"]
    url = parse_url(raw)
    check_url(url, is_async=True)  # a driver create_async_resilient_engine accepts
    problems = []
    hosts = url.query.get("host")
    targets = [hosts] if isinstance(hosts, str) else list(hosts or [])
    if not targets:
        targets = [f"{url.host}:{url.port or POSTGRES_PORT}"]
    for target in targets:
        host, _, port = target.partition(":")
        if host not in services:
            problems.append(f"app: DATABASE_URL names {host}, not a service")
        elif int(port or POSTGRES_PORT) != listen_port(host, services, docker_dir):
            problems.append(f"app: DATABASE_URL reaches {host} on {port or POSTGRES_PORT}")
        elif host not in _depends_on(app):
            problems.append(f"app: does not depend on {host}")
    if len(targets) > 1 and url.query.get("target_session_attrs") != "read-write":
        problems.append("app: several hosts without target_session_attrs=read-write")
    created = "".join(  # what the primary's init scripts create
        host.read_text()
        for host, target in _bind_mounts(services["primary"], docker_dir)
        if target.startswith("/docker-entrypoint-initdb.d/") and host.is_file()
    )
    if f"create role {url.username} " not in created:
        problems.append(f"app: role {url.username} is not created on the primary")
    if f"create database {url.database} " not in created:
        problems.append(f"app: database {url.database} is not created on the primary")
    primary_env = _environment(services["primary"])
    if url.password != primary_env.get("APP_PASSWORD"):
        problems.append("app: DATABASE_URL's password is not the primary's APP_PASSWORD")
    command = [str(c) for c in app.get("command") or []]
    app_dir = _argument(command, "--app-dir") or "."
    module = command[1].split(":")[0] if len(command) > 1 else ""
    context = docker_dir / app.get("build", {}).get("context", ".")
    if not (context / app_dir / f"{module}.py").is_file():
        problems.append(f"app: {app_dir}/{module}.py does not exist in the build context")
    return problems


# -- the repository's files --------------------------------------------------------------


def test_the_compose_project_is_consistent() -> None:
    problems = compose_problems(DOCKER)
    assert not problems, "\n".join(problems)
    services = load(DOCKER)["services"]
    assert set(REQUIRED_SERVICES) <= set(services)
    # The wiring the drill in docker/README.md relies on, spelled out.
    assert _depends_on(services["app"]) == {
        "primary": "service_healthy",
        "standby": "service_healthy",
    }
    url = make_url(_environment(services["app"])["DATABASE_URL"])
    assert url.query["host"] == ("primary:5432", "standby:5432")
    assert listen_port("pgbouncer", services, DOCKER) == 6432


def test_interpolation_uses_the_files_defaults() -> None:
    assert interpolate("a${X:-b}c") == "abc"
    assert interpolate("a${X-b}c", {"X": "y"}) == "ayc"
    assert interpolate("${X}") == ""
    assert interpolate("$$HOME") == "$HOME"


def test_the_drill_names_the_commands_it_promises() -> None:
    drill = (DOCKER / "README.md").read_text()
    for command in (
        "docker compose -f docker/compose.yaml up",
        "docker compose -f docker/compose.yaml stop primary",
        "pg_ctl promote",
        "select pg_promote()",
        "PRIMARY_UPSTREAM=standby",
        "not run on the project's CI machines",
    ):
        assert command.lower() in drill.lower(), command


# -- the check finds planted faults ------------------------------------------------------


@pytest.fixture
def docker_copy(tmp_path: Path) -> Path:
    """A copy of docker/ next to links to what the app's build context copies."""
    shutil.copytree(DOCKER, tmp_path / "docker", symlinks=True)
    for name in ("pyproject.toml", "README.md", "dbresilience", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    assert compose_problems(tmp_path / "docker") == []
    return tmp_path / "docker"


def _edit_compose(docker_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    compose = load(docker_dir)
    change(compose["services"])
    (docker_dir / "compose.yaml").write_text(yaml.safe_dump(compose, sort_keys=False))


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def _drop_healthcheck(s: dict[str, Any]) -> None:
    del s["primary"]["healthcheck"]


def _unknown_dependency(s: dict[str, Any]) -> None:
    s["app"]["depends_on"]["replica"] = {"condition": "service_started"}


def _wrong_app_port(s: dict[str, Any]) -> None:
    url = s["app"]["environment"]["DATABASE_URL"]
    s["app"]["environment"]["DATABASE_URL"] = url.replace("standby:5432", "standby:6432")


def _unknown_app_host(s: dict[str, Any]) -> None:
    url = s["app"]["environment"]["DATABASE_URL"]
    s["app"]["environment"]["DATABASE_URL"] = url.replace("host=primary", "host=db")


def _no_session_attrs(s: dict[str, Any]) -> None:
    url = s["app"]["environment"]["DATABASE_URL"]
    s["app"]["environment"]["DATABASE_URL"] = url.replace("&target_session_attrs=read-write", "")


def _bad_healthcheck(s: dict[str, Any]) -> None:
    s["standby"]["healthcheck"]["test"] = ["pg_isready", "-p", "5432"]


def _missing_mount(s: dict[str, Any]) -> None:
    s["primary"]["volumes"][0] = "./postgresql:/opt/dbresilience:ro"


def _published_wrong_port(s: dict[str, Any]) -> None:
    s["pgbouncer"]["ports"] = ["6432:5432"]


def _probe_wrong_port(s: dict[str, Any]) -> None:
    s["pgbouncer"]["healthcheck"]["test"][5] = "5432"


def _standby_of_nothing(s: dict[str, Any]) -> None:
    s["standby"]["environment"]["UPSTREAM_HOST"] = "standby"


def _undeclared_volume(s: dict[str, Any]) -> None:
    s["standby"]["volumes"][1] = "replica-data:/var/lib/postgresql/data"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_drop_healthcheck, "waits for primary to be healthy; primary has no healthcheck"),
        (_unknown_dependency, "app depends on unknown service replica"),
        (_wrong_app_port, "app: DATABASE_URL reaches standby on 6432"),
        (_unknown_app_host, "app: DATABASE_URL names db, not a service"),
        (_no_session_attrs, "several hosts without target_session_attrs=read-write"),
        (_bad_healthcheck, "standby: healthcheck test starts with 'pg_isready'"),
        (_missing_mount, "primary: mounted ./postgresql does not exist"),
        (_published_wrong_port, "pgbouncer: publishes 5432, listens on 6432"),
        (_probe_wrong_port, "pgbouncer: pg_isready probes port 5432, listens on 6432"),
        (_standby_of_nothing, "standby: UPSTREAM_HOST is not the primary service"),
        (_undeclared_volume, "standby: volume replica-data is not declared"),
    ],
)
def test_compose_faults_are_found(
    docker_copy: Path, change: Callable[[dict[str, Any]], None], expected: str
) -> None:
    _edit_compose(docker_copy, change)
    problems = compose_problems(docker_copy)
    assert any(expected in p for p in problems), problems


def test_pgbouncer_pointing_elsewhere_is_found(docker_copy: Path) -> None:
    ini = docker_copy / "pgbouncer" / "pgbouncer.ini"
    _replace(ini, "host=primary port=5432", "host=standby")
    _replace(ini, "pool_mode = transaction", "pool_mode = session")
    problems = compose_problems(docker_copy)
    assert "pgbouncer: database * points at standby" in problems, problems
    assert "pgbouncer: pool_mode is not transaction" in problems, problems


def test_pgbouncer_listening_elsewhere_is_found(docker_copy: Path) -> None:
    ini = docker_copy / "pgbouncer" / "pgbouncer.ini"
    _replace(ini, "listen_port = 6432", "listen_port = 6543")
    problems = compose_problems(docker_copy)
    assert "pgbouncer: publishes 6432, listens on 6543" in problems, problems


def test_scripts_and_build_files_are_checked(docker_copy: Path) -> None:
    (docker_copy / "postgres" / "entrypoint.sh").chmod(0o644)
    (docker_copy / "pgbouncer" / "entrypoint.sh").unlink()
    _replace(docker_copy / "Dockerfile", "COPY examples ./examples", "COPY samples ./samples")
    init = docker_copy / "postgres" / "init-primary.sh"
    _replace(init, "create database app ", "create database x ")
    problems = "\n".join(compose_problems(docker_copy))
    assert "entrypoint.sh is not executable" in problems, problems
    assert "pgbouncer: Dockerfile copies entrypoint.sh, not in its build context" in problems
    assert "app: Dockerfile copies samples, not in its build context" in problems
    assert "app: database app is not created on the primary" in problems
