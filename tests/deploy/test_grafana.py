"""The Grafana dashboard runs the shipped SQL (deploy/clickhouse/queries/grafana), and that SQL runs on ClickHouse.

Each query is executed on the ClickHouse server (Debian's, 18.16) over the native protocol,
as the grafana-clickhouse-datasource plugin sends it: dashboard variables and macros
expanded by :func:`streams.grafana.expand`, against a store migrated by layerwatch with one
row in every table, so a renamed column or a function the server lacks fails here.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from typing import Any

import pytest
import yaml

from streams.grafana import DASHBOARD, QUERIES_DIR, ROOT, expand, panel_queries, render_dashboard
from streams.store import open_store

DATASOURCE = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "clickhouse.yaml"


def test_dashboard_sql_is_the_shipped_sql() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert render_dashboard(dashboard, panel_queries()) == dashboard, "run `python -m streams.grafana`"
    files = {q.name: q.sql for q in panel_queries()}
    raw = [t["rawSql"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert sorted(raw) == sorted(sql for name, sql in files.items() if name != "model_variable")


def test_dashboard_uses_the_provisioned_clickhouse_plugin() -> None:
    source = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]
    assert source["type"] == "grafana-clickhouse-datasource"  # the plugin whose macros expand() mirrors
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": source["type"], "uid": source["uid"]}, panel["title"]


def test_expand_matches_the_plugin_macros() -> None:
    sql = expand("SELECT $__interval_s WHERE $__timeFilter(ts) AND t < $__toTime AND t > $__fromTime "
                 "AND x > ${alert_threshold} AND $__timeFilter_ms(t64)", from_s=100, to_s=200, interval_s=30,
                 variables={"alert_threshold": "0.5"})
    assert sql == ("SELECT 30 WHERE ts >= toDateTime(100) AND ts <= toDateTime(200) AND t < toDateTime(200) "
                   "AND t > toDateTime(100) AND x > 0.5 AND t64 >= fromUnixTimestamp64Milli(100000) AND "
                   "t64 <= fromUnixTimestamp64Milli(200000)")
    with pytest.raises(ValueError, match="macro not expanded"):
        expand("SELECT $__unknown", from_s=0, to_s=1)


def _value(column: str, ctype: str, now: dt.datetime) -> Any:
    """One plausible value of a ClickHouse column type (model 'cnn', layer 'combined', open, now)."""
    inner = re.fullmatch(r"(?:LowCardinality|Nullable)\((.*)\)", ctype)
    if inner:
        return _value(column, inner.group(1), now)
    if ctype.startswith("Array("):
        return []
    if ctype.startswith("Enum"):
        return re.search(r"'([^']*)'", ctype).group(1)  # type: ignore[union-attr]
    if ctype.startswith("DateTime"):
        return now
    if ctype == "Date":
        return now.date()
    if ctype.startswith(("Int", "UInt")):
        return int(now.timestamp() * 1000) if column.endswith("_ms") else 1
    if ctype.startswith("Float"):
        return 0.9
    overrides = {"model_id": "cnn", "layer": "combined", "state": "open", "severity": "critical",
                 "kind": "distribution_shift", "role": "live", "attack_type": "fgsm", "topic": "lw.predictions"}
    return overrides.get(column, "x")


@pytest.mark.integration
def test_every_dashboard_query_runs_on_the_clickhouse_server(clickhouse_server) -> None:
    from clickhouse_driver import Client

    if not clickhouse_server.is_running():
        clickhouse_server.start()
    database = "layerwatch_test_grafana17"
    url = clickhouse_server.url_for(database)
    store = open_store(url)
    try:
        store.migrate()
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0, tzinfo=None)
        for table in ("predictions", "drift_windows", "sample_scores", "attack_labels", "alerts", "dead_letters"):
            types = store.table_columns(table)
            store.insert(table, {c: [_value(c, t, now)] for c, t in types.items()})
        client = Client(clickhouse_server.host, port=clickhouse_server.tcp_port, user=clickhouse_server.user,
                        password=clickhouse_server.password, database=database)
        to_s = int(time.time()) + 60
        variables = {"model": ["cnn", "other'model"], "alert_threshold": "0.5"}
        dashboard = json.loads(DASHBOARD.read_text())
        formats = {(p["id"], t["refId"]): t["format"] for p in dashboard["panels"] for t in p.get("targets", [])}
        for query in panel_queries(QUERIES_DIR):
            sql = expand(query.sql, from_s=to_s - 6 * 3600, to_s=to_s, interval_s=60, variables=variables)
            rows, columns = client.execute(sql, with_column_types=True)
            names = [name for name, _ in columns]
            assert rows, f"{query.name}.sql returned no row for the data it should show:\n{sql}"
            if query.variable:
                assert [r[0] for r in rows] == ["cnn"]
            elif formats[(query.panel_id, query.ref_id)] == 0:  # time series: a time column first
                assert names[0] == "time" and isinstance(rows[0][0], dt.datetime), (query.name, names)
        client.execute(f"DROP DATABASE IF EXISTS {database}")
        client.disconnect()
    finally:
        store.close()
