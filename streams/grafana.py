"""The Grafana dashboard's SQL: one source of truth in ``deploy/clickhouse/queries/grafana/``.

Each ``*.sql`` file there is the query of one dashboard target (first line
``-- grafana: panel <id> (<title>), target <refId>``) or of a template variable
(``-- grafana: variable <name>``); the rest of the file is the SQL exactly as Grafana
sends it, macros and all. ``python -m streams.grafana`` writes those into
``deploy/grafana/dashboards/layerwatch.json`` (``--check`` only compares), and the tests
run every query against a ClickHouse server after :func:`expand` did what Grafana and the
``grafana-clickhouse-datasource`` plugin do to it, so a renamed column fails the build
rather than the dashboard.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
QUERIES_DIR = ROOT / "deploy" / "clickhouse" / "queries" / "grafana"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "layerwatch.json"

_HEAD = re.compile(r"^--\s*grafana:\s*(?:panel\s+(\d+)\s+\(.*\),\s*target\s+(\w+)|variable\s+(\w+))\s*$")


@dataclass(frozen=True)
class PanelQuery:
    """One query file: where it goes in the dashboard and its SQL."""

    name: str
    sql: str
    panel_id: int | None = None
    ref_id: str = ""
    variable: str = ""


def panel_queries(directory: Path | str = QUERIES_DIR) -> list[PanelQuery]:
    """Every query file, sorted by name; a file without a valid ``-- grafana:`` first line is an error."""
    out = []
    for path in sorted(Path(directory).glob("*.sql")):
        head, _, sql = path.read_text(encoding="utf-8").partition("\n")
        m = _HEAD.match(head)
        if not m:
            raise ValueError(f"{path}: first line must be '-- grafana: panel <id> (<title>), target <refId>' "
                             "or '-- grafana: variable <name>'")
        panel, ref, variable = m.groups()
        out.append(PanelQuery(path.stem, sql.strip(), int(panel) if panel else None, ref or "", variable or ""))
    return out


def render_dashboard(dashboard: dict[str, Any], queries: Sequence[PanelQuery]) -> dict[str, Any]:
    """``dashboard`` with every target's and variable's SQL taken from ``queries`` (each must find its place)."""
    out = json.loads(json.dumps(dashboard))
    targets = {(p["id"], t["refId"]): t for p in out["panels"] for t in p.get("targets", [])}
    variables = {v["name"]: v for v in out.get("templating", {}).get("list", [])}
    placed = set()
    for q in queries:
        if q.variable:
            var = variables.get(q.variable)
            if var is None:
                raise ValueError(f"{q.name}.sql: the dashboard has no variable {q.variable!r}")
            var["definition"] = var["query"]["rawSql"] = q.sql
            placed.add(("variable", q.variable))
        else:
            target = targets.get((q.panel_id, q.ref_id))
            if target is None:
                raise ValueError(f"{q.name}.sql: the dashboard has no panel {q.panel_id} target {q.ref_id}")
            target["rawSql"] = q.sql
            placed.add((q.panel_id, q.ref_id))
    missing = sorted(str(k) for k in targets if k not in placed)
    if missing:
        raise ValueError(f"dashboard targets without a query file in {QUERIES_DIR}: {', '.join(missing)}")
    return out


def expand(sql: str, *, from_s: int, to_s: int, interval_s: int = 60,
           variables: Mapping[str, str | Sequence[str]] | None = None) -> str:
    """``sql`` as ClickHouse receives it from Grafana: dashboard variables, then the plugin's macros.

    Grafana interpolates ``${name}``, ``$name`` and ``${name:singlequote}`` (a multi-value
    variable as ``'a','b'``); the grafana-clickhouse-datasource plugin (pkg/macros) then
    replaces ``$__timeFilter(col)`` with ``col >= toDateTime(from) AND col <= toDateTime(to)``,
    ``$__fromTime``/``$__toTime`` with ``toDateTime(s)``, their ``_ms`` forms with
    ``fromUnixTimestamp64Milli(ms)`` and ``$__interval_s`` with the interval in whole seconds.

    Example:
        >>> expand("SELECT 1 WHERE $__timeFilter(ts) AND m IN (${model:singlequote})", from_s=10, to_s=20,
        ...        variables={"model": ["a", "b"]})
        "SELECT 1 WHERE ts >= toDateTime(10) AND ts <= toDateTime(20) AND m IN ('a','b')"
    """
    def values(name: str) -> list[str]:
        value = (variables or {}).get(name)
        if value is None:
            raise KeyError(f"variable {name!r} has no value")
        return [value] if isinstance(value, str) else list(value)

    def variable(m: re.Match) -> str:
        name, fmt = m.group(1) or m.group(3), m.group(2)
        vals = values(name)
        if fmt == "singlequote":
            return ",".join("'" + v.replace("'", "\\'") + "'" for v in vals)
        if fmt not in (None, "raw", "csv"):
            raise ValueError(f"variable format {fmt!r} is not expanded here")
        return ",".join(vals)

    sql = re.sub(r"\$\{(\w+)(?::(\w+))?\}|\$(?!__)(\w+)", variable, sql)
    sql = re.sub(r"\$__timeFilter_ms\(\s*([^)]+?)\s*\)",
                 lambda m: f"{m[1]} >= fromUnixTimestamp64Milli({from_s * 1000}) AND "
                           f"{m[1]} <= fromUnixTimestamp64Milli({to_s * 1000})", sql)
    sql = re.sub(r"\$__timeFilter\(\s*([^)]+?)\s*\)",
                 lambda m: f"{m[1]} >= toDateTime({from_s}) AND {m[1]} <= toDateTime({to_s})", sql)
    sql = sql.replace("$__fromTime_ms", f"fromUnixTimestamp64Milli({from_s * 1000})")
    sql = sql.replace("$__toTime_ms", f"fromUnixTimestamp64Milli({to_s * 1000})")
    sql = sql.replace("$__fromTime", f"toDateTime({from_s})").replace("$__toTime", f"toDateTime({to_s})")
    sql = sql.replace("$__interval_s", str(max(1, int(interval_s))))
    if "$__" in sql:
        raise ValueError(f"macro not expanded: {sql[sql.index('$__'):][:40]!r}")
    return sql


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streams.grafana", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the dashboard is up to date")
    args = parser.parse_args(argv)
    current = json.loads(DASHBOARD.read_text())
    rendered = render_dashboard(current, panel_queries())
    if rendered == current:
        print(f"{DASHBOARD.relative_to(ROOT)} is up to date")
        return 0
    if args.check:
        print(f"{DASHBOARD.relative_to(ROOT)} differs from {QUERIES_DIR.relative_to(ROOT)}: "
              "run `python -m streams.grafana`", file=sys.stderr)
        return 1
    DASHBOARD.write_text(json.dumps(rendered, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {DASHBOARD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
