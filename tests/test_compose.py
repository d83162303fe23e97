"""Static checks of the production stack: docker-compose.yml, deploy/Dockerfile, deploy/kafka/
and deploy/grafana/.

No Docker engine and no services: the compose file is parsed with PyYAML and checked
against the repository (files it mounts or builds from exist), the CLI parser (every
`layerwatch <subcommand>` it runs parses), the settings (every LW_* variable is a
setting and parses), the Kafka topic settings (one line per topic the app uses) and the
store's DDL (every table a Grafana panel queries exists). One extra test, marked
`integration`, runs every panel query on chDB against the shipped DDL.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DDL_DIR = ROOT / "deploy" / "clickhouse"
TOPICS_CONF = ROOT / "deploy" / "kafka" / "topics.conf"
LAYERWATCH_DOCKERFILE = (ROOT / "deploy" / "Dockerfile").resolve()
CLICKHOUSE_PLUGIN = "grafana-clickhouse-datasource"

# Tables every dashboard together must read, so each part of the pipeline is visible.
DASHBOARD_TABLES = {"predictions", "drift_windows", "sample_scores", "attack_labels", "alerts", "dead_letters"}


# ------------------------------------------------------------------ helpers

_VAR = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose variable interpolation (``${X:-default}``, ``${X-d}``, ``${X}``, ``$X``, ``$$``).

    With ``env`` empty every variable is unset, so the result is what a user gets without
    a ``.env`` file: the defaults written in the compose file.
    """
    if not isinstance(value, str):
        return value
    env = env or {}

    def sub(m: re.Match) -> str:
        if m.group("dollar"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        expr = m.group("braced")
        name = re.match(r"[A-Za-z_][A-Za-z0-9_]*", expr)
        assert name, f"bad variable reference ${{{expr}}}"
        rest = expr[name.end():]
        current = env.get(name.group(0))
        if rest.startswith(":-"):
            return current if current else rest[2:]
        if rest.startswith("-"):
            return current if current is not None else rest[1:]
        if rest.startswith(":+"):
            return rest[2:] if current else ""
        if rest.startswith("+"):
            return rest[1:] if current is not None else ""
        if rest.startswith((":?", "?")):
            return current or ""
        assert rest == "", f"unsupported interpolation ${{{expr}}}"
        return current or ""

    return _VAR.sub(sub, value)


def load_compose() -> dict:
    with open(COMPOSE_FILE, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "docker-compose.yml has no services"
    return data


COMPOSE = load_compose()
SERVICES: dict[str, dict] = COMPOSE["services"]


def environment(service: dict) -> dict[str, str]:
    """A service's environment (map or list form) after interpolation with defaults."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in env)
        env = dict(pairs)
    return {str(k): "" if v is None else str(interpolate(v)) for k, v in env.items()}


def as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(interpolate(value))
    return [str(interpolate(v)) for v in value]


def build_of(service: dict) -> tuple[Path, Path] | None:
    """(context dir, Dockerfile) of a service that builds its image, else None."""
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = (ROOT / interpolate(build.get("context", "."))).resolve()
    dockerfile = context / interpolate(build.get("dockerfile", "Dockerfile"))
    return context, dockerfile.resolve()


def bind_mounts(service: dict) -> Iterator[tuple[Path, PurePosixPath]]:
    """(host path in the repository, container path) of every bind mount of a service."""
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = interpolate(volume).split(":")
            if len(parts) < 2 or not parts[0].startswith((".", "/", "~")):
                continue  # a named volume or an anonymous one
            source, target = parts[0], parts[1]
        else:
            if volume.get("type") != "bind":
                continue
            source, target = interpolate(volume["source"]), interpolate(volume["target"])
        yield (ROOT / source).resolve(), PurePosixPath(target)


def named_volumes(service: dict) -> Iterator[str]:
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = interpolate(volume).split(":")
            if len(parts) >= 2 and not parts[0].startswith((".", "/", "~")):
                yield parts[0]
        elif volume.get("type") == "volume" and volume.get("source"):
            yield interpolate(volume["source"])


def host_path(service: dict, container_path: str) -> Path | None:
    """The repository file behind an absolute container path, when a bind mount provides it."""
    path = PurePosixPath(container_path)
    best: tuple[int, Path] | None = None
    for source, target in bind_mounts(service):
        if path == target or target in path.parents:
            depth = len(target.parts)
            if best is None or depth > best[0]:
                best = (depth, source / path.relative_to(target))
    return best[1] if best else None


def dockerfile_instruction(dockerfile: Path, name: str) -> list[str] | None:
    """The JSON-array argument of the last ENTRYPOINT or CMD in a Dockerfile."""
    found = None
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        m = re.match(rf"\s*{name}\s+(\[.*\])\s*$", line, re.IGNORECASE)
        if m:
            found = json.loads(m.group(1))
    return found


def layerwatch_services() -> dict[str, dict]:
    """Services that run the layerwatch image (built from deploy/Dockerfile)."""
    out = {}
    for name, service in SERVICES.items():
        build = build_of(service)
        if build and build[1] == LAYERWATCH_DOCKERFILE:
            out[name] = service
    return out


def layerwatch_argv(service: dict) -> list[str]:
    """The arguments a layerwatch container passes to the `layerwatch` entrypoint."""
    entrypoint = as_argv(service.get("entrypoint")) or dockerfile_instruction(LAYERWATCH_DOCKERFILE, "ENTRYPOINT")
    assert entrypoint and PurePosixPath(entrypoint[0]).name == "layerwatch", (
        f"entrypoint {entrypoint} is not the layerwatch CLI")
    command = as_argv(service.get("command")) if "command" in service else \
        dockerfile_instruction(LAYERWATCH_DOCKERFILE, "CMD") or []
    return entrypoint[1:] + command


def subcommand(argv: list[str]) -> str | None:
    """The first positional argument (skipping the global ``--config PATH``)."""
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def worker_services() -> dict[str, dict]:
    return {n: s for n, s in layerwatch_services().items() if subcommand(layerwatch_argv(s)) == "worker"}


def has_gpu_reservation(service: dict) -> bool:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return any(
        d.get("driver") == "nvidia" and d.get("count") == 1 and "gpu" in (d.get("capabilities") or [])
        for d in devices
    )


def grafana_service() -> tuple[str, dict]:
    found = [(n, s) for n, s in SERVICES.items() if str(s.get("image", "")).startswith("grafana/grafana")]
    assert len(found) == 1, f"expected one Grafana service, found {[n for n, _ in found]}"
    return found[0]


def provisioning_dir() -> Path:
    _, service = grafana_service()
    path = host_path(service, "/etc/grafana/provisioning")
    assert path is not None, "Grafana has no provisioning directory mounted at /etc/grafana/provisioning"
    return path


def provisioning_files(kind: str) -> list[Path]:
    folder = provisioning_dir() / kind
    return sorted(p for p in folder.glob("*") if p.suffix in (".yaml", ".yml"))


def dashboard_files() -> list[Path]:
    _, service = grafana_service()
    files: list[Path] = []
    for provider_file in provisioning_files("dashboards"):
        for provider in yaml.safe_load(provider_file.read_text(encoding="utf-8")).get("providers") or []:
            container_dir = provider["options"]["path"]
            folder = host_path(service, container_dir)
            assert folder is not None and folder.is_dir(), (
                f"{provider_file.name}: dashboards path {container_dir} is not a mounted repository directory")
            files += sorted(folder.glob("*.json"))
    return files


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels") or [])  # collapsed rows


def dashboard_queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(where, SQL) of every panel target and template variable of a dashboard."""
    for panel in iter_panels(dashboard.get("panels") or []):
        for target in panel.get("targets") or []:
            if target.get("rawSql"):
                yield f"panel {panel.get('title')!r} target {target.get('refId')}", target["rawSql"]
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        query = variable.get("query")
        if isinstance(query, dict) and query.get("rawSql"):
            yield f"variable {variable['name']!r}", query["rawSql"]


def ddl_tables() -> set[str]:
    names = set()
    for path in sorted(DDL_DIR.glob("[0-9][0-9][0-9]_*.sql")):
        text = re.sub(r"--[^\n]*", "", path.read_text(encoding="utf-8"))
        for m in re.finditer(
            r"\bCREATE\s+(?:OR\s+REPLACE\s+)?(?:TABLE|(?:MATERIALIZED\s+)?VIEW|DICTIONARY)\s+"
            r"(?:IF\s+NOT\s+EXISTS\s+)?([`\"]?[\w.]+[`\"]?)", text, re.IGNORECASE):
            names.add(m.group(1).strip('`"').split(".")[-1])
    return names


def referenced_tables(sql: str) -> set[str]:
    """Table names after FROM / JOIN (subqueries skipped, database prefix dropped)."""
    sql = re.sub(r"'(?:[^'\\]|\\.)*'", "''", sql)  # no FROM inside string literals
    return {
        m.group(1).strip('`"').split(".")[-1]
        for m in re.finditer(r"\b(?:FROM|JOIN)\s+(?!\()([`\"]?[A-Za-z_][\w.]*[`\"]?)", sql, re.IGNORECASE)
    }


def topics_conf() -> dict[str, dict[str, str]]:
    topics = {}
    for line in TOPICS_CONF.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, *configs = line.split()
        assert all(re.fullmatch(r"[a-z][a-z0-9.]*=\S+", c) for c in configs), f"topics.conf: bad configs in {line!r}"
        topics[name] = dict(c.split("=", 1) for c in configs)
    return topics


# ------------------------------------------------------------------ compose: files and wiring

def test_compose_parses_and_has_the_stack() -> None:
    images = {n: str(s.get("image", "")) for n, s in SERVICES.items()}
    assert any(i.startswith("apache/kafka") for i in images.values()), "no apache/kafka service"
    assert any(i.startswith("clickhouse/clickhouse-server") for i in images.values()), "no ClickHouse server"
    assert any(i.startswith("grafana/grafana") for i in images.values()), "no Grafana"
    kafka = next(s for s in SERVICES.values() if str(s.get("image", "")).startswith("apache/kafka")
                 and "KAFKA_PROCESS_ROLES" in environment(s))
    assert set(environment(kafka)["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "not KRaft"
    assert len(worker_services()) >= 2, "expected two layerwatch workers"
    serve = [n for n, s in layerwatch_services().items() if subcommand(layerwatch_argv(s)) == "serve"]
    assert serve, "no `layerwatch serve` model server"


def test_build_contexts_and_dockerfiles_exist() -> None:
    built = 0
    for name, service in SERVICES.items():
        build = build_of(service)
        if build is None:
            continue
        context, dockerfile = build
        assert context.is_dir(), f"{name}: build context {context} does not exist"
        assert dockerfile.is_file(), f"{name}: Dockerfile {dockerfile} does not exist"
        built += 1
    assert built, "no service builds the layerwatch image"


def test_mounted_paths_exist() -> None:
    for name, service in SERVICES.items():
        for source, target in bind_mounts(service):
            assert ROOT in source.parents or source == ROOT, f"{name}: mount {source} is outside the repository"
            assert source.exists(), f"{name}: mounted path {source.relative_to(ROOT)} (-> {target}) does not exist"


def test_env_files_exist() -> None:
    for name, service in SERVICES.items():
        env_files = service.get("env_file") or []
        for entry in [env_files] if isinstance(env_files, (str, dict)) else env_files:
            path, required = (entry, True) if isinstance(entry, str) else (entry["path"], entry.get("required", True))
            if required:
                assert (ROOT / interpolate(path)).is_file(), f"{name}: env_file {path} does not exist"
    for kind in ("configs", "secrets"):
        for name, item in (COMPOSE.get(kind) or {}).items():
            if isinstance(item, dict) and item.get("file"):
                assert (ROOT / interpolate(item["file"])).exists(), f"{kind} {name}: {item['file']} does not exist"


def test_container_paths_in_commands_and_environment_are_provided_by_mounts() -> None:
    """An absolute path under a bind mount (a script, a config file) must exist in the repository."""
    for name, service in SERVICES.items():
        values = as_argv(service.get("entrypoint")) + as_argv(service.get("command")) + list(environment(service).values())
        for value in values:
            if not value.startswith("/"):
                continue
            path = host_path(service, value)
            if path is not None:
                assert path.exists(), f"{name}: {value} maps to {path.relative_to(ROOT)}, which does not exist"


def test_named_volumes_are_declared_and_data_is_persisted() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for volume in named_volumes(service):
            assert volume in declared, f"{name}: volume {volume} is not declared under top-level volumes"
    clickhouse = next(s for s in SERVICES.values() if str(s.get("image", "")).startswith("clickhouse/"))
    _, grafana = grafana_service()
    assert any(PurePosixPath(v.split(":")[1]) == PurePosixPath("/var/lib/clickhouse")
               for v in clickhouse.get("volumes", []) if isinstance(v, str)), "ClickHouse data is not on a volume"
    assert any(PurePosixPath(v.split(":")[1]) == PurePosixPath("/var/lib/grafana")
               for v in grafana.get("volumes", []) if isinstance(v, str)), "Grafana data is not on a volume"


def test_depends_on_conditions_are_satisfiable() -> None:
    for name, service in SERVICES.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on should use the long form with conditions"
        for other, spec in depends.items():
            assert other in SERVICES, f"{name} depends on unknown service {other}"
            condition = (spec or {}).get("condition", "service_started")
            if condition == "service_healthy":
                assert SERVICES[other].get("healthcheck"), f"{name} waits for {other} to be healthy; it has no healthcheck"
            elif condition == "service_completed_successfully":
                assert str(SERVICES[other].get("restart", "no")) in ("no", "False", "false"), (
                    f"{name} waits for {other} to complete, but {other} restarts")
            else:
                assert condition == "service_started", f"{name}: unknown condition {condition}"
    for name in layerwatch_services():
        assert SERVICES[name].get("healthcheck"), f"{name} has no healthcheck"


# ------------------------------------------------------------------ compose: layerwatch processes

LAYERWATCH_COMMANDS = [(name, layerwatch_argv(service)) for name, service in layerwatch_services().items()]


@pytest.mark.parametrize("service,argv", LAYERWATCH_COMMANDS, ids=[n for n, _ in LAYERWATCH_COMMANDS])
def test_layerwatch_commands_are_known_to_the_cli(service: str, argv: list[str]) -> None:
    from streams.cli import UsageError, build_parser

    parser = build_parser()
    choices = {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }
    name = subcommand(argv)
    assert name in choices, (
        f"service {service} runs `layerwatch {' '.join(argv)}`, but the CLI has no {name!r} subcommand "
        f"(it has: {', '.join(sorted(choices))})")
    try:
        parser.parse_args(argv)
    except UsageError as exc:
        pytest.fail(f"service {service}: `layerwatch {' '.join(argv)}` does not parse: {exc}")


def test_layerwatch_environment_is_valid_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import fields

    from streams.settings import Settings, load_settings

    monkeypatch.chdir(tmp_path)  # no stray ./layerwatch.toml
    known = {f"LW_{f.name.upper()}" for f in fields(Settings)} | {"LW_CONFIG"}
    for name, service in layerwatch_services().items():
        env = environment(service)
        unknown = sorted(k for k in env if k.startswith("LW_") and k not in known)
        assert not unknown, f"{name}: {unknown} are not layerwatch settings (streams/settings.py)"
        load_settings(env=env)  # raises SettingsError naming the variable when a value does not parse


def test_services_reach_kafka_and_clickhouse_by_service_name() -> None:
    hostnames = set(SERVICES) | {s["hostname"] for s in SERVICES.values() if s.get("hostname")}
    for name, service in layerwatch_services().items():
        env = environment(service)
        for address in env["LW_KAFKA_BOOTSTRAP"].split(","):
            assert address.rsplit(":", 1)[0] in hostnames, f"{name}: Kafka at {address} is not a service"
        url = env.get("LW_CLICKHOUSE_URL", "")
        m = re.match(r"clickhouse://([^:/]+)(?::(\d+))?/(\w+)$", url)
        assert m and m.group(1) in hostnames, f"{name}: LW_CLICKHOUSE_URL={url!r} is not a clickhouse:// service URL"


def test_workers_one_with_gpu_reservation_and_distinct_web_ports() -> None:
    workers = worker_services()
    gpu = [n for n, s in workers.items() if has_gpu_reservation(s)]
    assert len(gpu) == 1, f"expected exactly one worker with an nvidia GPU reservation, found {gpu}"
    build = SERVICES[gpu[0]].get("build")
    args = build.get("args", {}) if isinstance(build, dict) else {}
    assert "TORCH_INDEX_URL" in args or "TORCH_SPEC" in args, (
        f"{gpu[0]} reserves a GPU but builds the default CPU torch (set TORCH_INDEX_URL / TORCH_SPEC)")
    ports = [environment(s).get("LW_WEB_PORT") for s in workers.values()]
    assert None not in ports and len(set(ports)) == len(ports), f"workers need distinct LW_WEB_PORT, got {ports}"
    for name, service in workers.items():
        assert environment(service).get("LW_WEB_TOKEN"), f"{name}: LW_WEB_TOKEN is empty"


def test_cpu_workers_ingest_and_the_gpu_worker_tests_their_windows() -> None:
    from streams.runtime import parse_agents

    workers = worker_services()
    roles = {}
    for name, service in workers.items():
        spec = environment(service)["LW_AGENTS"]
        default = re.fullmatch(r"\$\{\w+:-(\w+)\}", spec)
        roles[name] = parse_agents(default.group(1) if default else spec)
    gpu = [n for n, s in workers.items() if has_gpu_reservation(s)]
    assert all(roles[n] == {"test"} for n in gpu), roles
    cpu = [n for n in workers if n not in gpu]
    assert cpu and all("windows" in roles[n] and "test" not in roles[n] for n in cpu), roles


# ------------------------------------------------------------------ Kafka topics

def topic_service() -> tuple[str, dict]:
    found = [(n, s) for n, s in SERVICES.items()
             if any("create-topics" in a for a in as_argv(s.get("entrypoint")) + as_argv(s.get("command")))]
    assert len(found) == 1, "expected one topic-creation service running deploy/kafka/create-topics.sh"
    return found[0]


def test_topics_conf_lists_every_topic_the_app_uses() -> None:
    from streams.kafka import TOPICS

    topics = topics_conf()
    assert set(topics) == set(TOPICS), f"topics.conf has {sorted(topics)}, the app uses {sorted(TOPICS)}"
    for name, configs in topics.items():
        assert int(configs.get("retention.ms", "0")) > 0, f"{name}: set a retention.ms"


def test_topic_creation_agrees_with_the_workers() -> None:
    name, service = topic_service()
    env = environment(service)
    assert int(env["LW_TOPIC_PARTITIONS"]) >= 1
    for other, lw in layerwatch_services().items():
        lw_env = environment(lw)
        for key, default in (("LW_TOPIC_PARTITIONS", "4"), ("LW_TOPIC_PREFIX", "lw.")):
            assert lw_env.get(key, default) == env.get(key, default), (
                f"{other} uses {key}={lw_env.get(key, default)} but {name} creates topics with {env.get(key, default)}")
        assert (lw.get("depends_on") or {}).get(name, {}).get("condition") == "service_completed_successfully", (
            f"{other} must wait for {name} to complete")


# ------------------------------------------------------------------ image

def test_dockerfile_and_dockerignore() -> None:
    text = LAYERWATCH_DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM\s+(\$\{PYTHON_IMAGE\}|python:3\.11-slim)", text, re.MULTILINE)
    assert "python:3.11-slim" in text
    assert re.search(r"^ARG\s+TORCH_SPEC", text, re.MULTILINE), "no TORCH_SPEC build arg"
    assert re.search(r"pip install[^\n]*-e \.", text), "the project is not installed with pip install -e ."
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert dockerfile_instruction(LAYERWATCH_DOCKERFILE, "ENTRYPOINT") == ["layerwatch"]
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", ".layerwatch", ".pytest_cache", ".hypothesis", ".git"):
        assert entry in ignored, f".dockerignore does not exclude {entry}"


# ------------------------------------------------------------------ Grafana

def provisioned_datasources() -> list[dict]:
    sources = []
    for path in provisioning_files("datasources"):
        sources += yaml.safe_load(path.read_text(encoding="utf-8")).get("datasources") or []
    return sources


def test_grafana_installs_the_plugin_and_provisions_clickhouse() -> None:
    _, service = grafana_service()
    assert CLICKHOUSE_PLUGIN in environment(service).get("GF_INSTALL_PLUGINS", ""), "plugin not in GF_INSTALL_PLUGINS"
    clickhouse = [d for d in provisioned_datasources() if d.get("type") == CLICKHOUSE_PLUGIN]
    assert clickhouse, "no provisioned ClickHouse data source"
    for source in clickhouse:
        data = source.get("jsonData") or {}
        assert data.get("host") in SERVICES, f"data source host {data.get('host')!r} is not a compose service"
        assert data.get("defaultDatabase") == "layerwatch"
        assert source.get("uid"), "give the data source a uid so dashboards can refer to it"


def test_dashboards_parse_and_query_only_shipped_tables() -> None:
    tables = ddl_tables()
    assert DASHBOARD_TABLES <= tables, f"DDL lacks {sorted(DASHBOARD_TABLES - tables)}"
    uids = {d["uid"] for d in provisioned_datasources() if d.get("uid")}
    files = dashboard_files()
    assert files, "no dashboard JSON provisioned"
    queried: set[str] = set()
    for path in files:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert dashboard.get("uid") and dashboard.get("title"), f"{path.name}: no uid or title"
        variables = {v["name"] for v in (dashboard.get("templating") or {}).get("list") or []}
        for panel in iter_panels(dashboard.get("panels") or []):
            for item in [panel] + list(panel.get("targets") or []):
                uid = (item.get("datasource") or {}).get("uid")
                assert uid is None or uid.startswith("$") or uid in uids or uid.startswith("-- "), (
                    f"{path.name}: panel {panel.get('title')!r} uses data source {uid}, not a provisioned one")
        for where, sql in dashboard_queries(dashboard):
            used = referenced_tables(sql)
            unknown = used - tables
            assert not unknown, f"{path.name}, {where}: unknown table(s) {sorted(unknown)}"
            queried |= used
            assert "toStartOfInterval" not in sql and "$__timeInterval" not in sql, (
                f"{path.name}, {where}: bucket time with intDiv on the epoch, not toStartOfInterval")
            for ref in re.findall(r"\$\{(\w+)(?::\w+)?\}|\$(?!__)(\w+)", sql):
                name = ref[0] or ref[1]
                assert name in variables, f"{path.name}, {where}: ${name} is not a dashboard variable"
    assert DASHBOARD_TABLES <= queried, f"no panel reads {sorted(DASHBOARD_TABLES - queried)}"


# ------------------------------------------------------------------ panel SQL on chDB

def expand_grafana(sql: str, variables: dict[str, list[str]], start: int, end: int) -> str:
    """Expand the ClickHouse plugin's macros and dashboard variables like Grafana does."""

    def macro(m: re.Match) -> str:
        name, arg = m.group(1), m.group(3)
        if name == "timeFilter":
            return f"{arg} >= toDateTime({start}) AND {arg} <= toDateTime({end})"
        if name == "timeFilter_ms":
            return (f"{arg} >= fromUnixTimestamp64Milli({start * 1000}) AND "
                    f"{arg} <= fromUnixTimestamp64Milli({end * 1000})")
        values = {"fromTime": f"toDateTime({start})", "toTime": f"toDateTime({end})",
                  "fromTime_ms": f"fromUnixTimestamp64Milli({start * 1000})",
                  "toTime_ms": f"fromUnixTimestamp64Milli({end * 1000})", "interval_s": "60"}
        assert name in values, f"macro $__{name} not handled by this test"
        return values[name]

    sql = re.sub(r"\$__(\w+)(\(([^)]*)\))?", macro, sql)

    def variable(m: re.Match) -> str:
        name, fmt = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), None)
        values = variables[name]
        if fmt == "singlequote":
            return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
        return ",".join(values)

    return re.sub(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)", variable, sql)


CHDB_RUNNER = r"""
import json, sys, tempfile
from chdb import session
job = json.load(sys.stdin)
s = session.Session(tempfile.mkdtemp(prefix="lw-grafana-"))
out = []
try:
    for statement in job["setup"]:
        s.query(statement)
    for where, sql in job["queries"]:
        try:
            r = json.loads(str(s.query(sql, "JSONCompact")) or "{}")
            out.append([where, r.get("rows", 0), None])
        except Exception as exc:
            out.append([where, 0, str(exc).splitlines()[0]])
finally:
    s.close()
print(json.dumps(out))
"""


@pytest.mark.integration
def test_panel_queries_run_on_chdb_against_the_shipped_ddl() -> None:
    if importlib.util.find_spec("chdb") is None:
        pytest.skip("chdb is not installed")
    now = int(time.time())
    t, ms = now - 120, (now - 120) * 1000
    setup = []
    for path in sorted(DDL_DIR.glob("[0-9][0-9][0-9]_*.sql")):
        text = re.sub(r"--[^\n]*", "", path.read_text(encoding="utf-8"))
        setup += [s.strip() for s in text.split(";") if s.strip()]
    rows = {
        "predictions (event_id, model_id, model_version, client_id, ts, ts_ms, predicted, confidence)":
            f"('e1', 'cnn', 'v1', 'client-7', toDateTime({t}), {ms}, 3, 0.91)",
        "drift_windows (window_id, model_id, model_version, layer, window_start_ms, window_end_ms, ts, "
        "p_value, detection_rate, alpha)":
            f"('w1', 'cnn', 'v1', 'penultimate', {ms - 10000}, {ms}, toDateTime({t}), 0.002, 0.9, 0.05)",
        "sample_scores (window_id, model_id, model_version, layer, event_id, rank, score, ts)":
            f"('w1', 'cnn', 'v1', 'penultimate', 'e1', 1, 3.5, toDateTime({t}))",
        "attack_labels (event_id, model_id, model_version, ts, ts_ms, p_adversarial, attack_type)":
            f"('e1', 'cnn', 'v1', toDateTime({t}), {ms}, 0.97, 'pgd')",
        "alerts (alert_id, ts, ts_ms, model_id, kind, state, severity, window_id, event_ids, message)":
            f"('a1', toDateTime({t}), {ms}, 'cnn', 'distribution_shift', 'open', 'high', 'w1', ['e1'], 'drift')",
        "dead_letters (dl_id, ts, ts_ms, topic, partition, offset, reason, raw)":
            f"('lw.predictions:0:5', toDateTime({t}), {ms}, 'lw.predictions', 0, 5, 'bad magic byte', 'x')",
    }
    setup += [f"INSERT INTO {table} SETTINGS async_insert=0 VALUES {values}" for table, values in rows.items()]

    queries = []
    for path in dashboard_files():
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        variables = {}
        for v in (dashboard.get("templating") or {}).get("list") or []:
            variables[v["name"]] = ["cnn"] if v.get("type") == "query" else [str(v.get("query", ""))]
        for where, sql in dashboard_queries(dashboard):
            queries.append([f"{path.name}, {where}", expand_grafana(sql, variables, now - 3600, now)])

    proc = subprocess.run([sys.executable, "-c", CHDB_RUNNER], input=json.dumps({"setup": setup, "queries": queries}),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [f"{where}: {error}" for where, _, error in results if error]
    assert not errors, "\n".join(errors)
    empty = [where for where, n, _ in results if n == 0]
    assert not empty, f"queries returned no rows on sample data: {empty}"
