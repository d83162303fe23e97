"""layerwatch storage: one ``Store`` interface over a ClickHouse server or chDB.

    store = open_store("chdb://./.layerwatch/store")          # embedded default
    store = open_store("clickhouse://host:9000/layerwatch",   # production
                       user="lw", password=secret)
    store.migrate()
    store.insert("predictions", {"event_id": ids, "ts": ts, ...})
    rows = store.query("SELECT count() FROM predictions FINAL WHERE model_id = {m}",
                       {"m": "resnet"}, readonly=True)

URLs:

- ``clickhouse://[user[:password]@]host[:port]/database`` (native protocol,
  port 9000 by default); ``clickhouses://`` is the same with TLS (port 9440).
  Query options: ``secure``, ``verify``, ``ca_certs``, ``connect_timeout``,
  ``send_receive_timeout``, ``compression``. Keyword arguments win over the URL.
  The database is created if missing.
- ``chdb://PATH`` (``chdb://./rel/path``, ``chdb:///abs/path``): chDB persisted at
  PATH, created if missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .base import ReadonlyLimits, Result, Store
from .errors import StoreError, StoreUnavailable, redact

__all__ = [
    "DEFAULT_URL",
    "ReadonlyLimits",
    "Result",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "open_store",
    "open_store_from_settings",
    "redact_url",
]

#: The embedded default used when LW_CLICKHOUSE_URL is not set.
DEFAULT_URL = "chdb://./.layerwatch/store"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise StoreError(f"option {name}: expected a boolean, got {value!r}")


def redact_url(url: str) -> str:
    """The URL without a password (``user:***@host``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def _chdb_path(url: str) -> Path:
    rest = url[len("chdb://"):]
    rest = rest.split("?", 1)[0]
    if not rest:
        raise StoreError("chdb:// URL needs a path, e.g. chdb://./.layerwatch/store")
    return Path(unquote(rest)).expanduser()


def open_store(
    url: str | None = None,
    *,
    user: str | None = None,
    password: str | None = None,
    secure: bool | None = None,
    verify: bool | None = None,
    ca_certs: str | None = None,
    connect_timeout: float | None = None,
    send_receive_timeout: float | None = None,
    readonly_limits: ReadonlyLimits | None = None,
    migrations_dir: str | Path | None = None,
) -> Store:
    """Open the store named by ``url`` (default: ``DEFAULT_URL``).

    Does not connect to a server yet (calls raise ``StoreUnavailable`` while it
    is down); opens the chDB session at once (raises ``StoreError`` when the
    path is held by another process). Error messages never contain the password.
    """
    url = url or DEFAULT_URL
    if not isinstance(url, str):
        raise StoreError("store URL must be a string")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""

    if scheme == "chdb":
        from .embedded import ChdbStore

        return ChdbStore(_chdb_path(url), url=url, readonly_limits=readonly_limits,
                         migrations_dir=migrations_dir)

    if scheme in ("clickhouse", "clickhouses"):
        from .clickhouse import ClickHouseStore

        safe = redact_url(url)
        secrets = [password or ""]
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise StoreError(f"invalid store URL {safe}: {redact(str(e), secrets)}") from None
        if parts.password:
            secrets.append(unquote(parts.password))
        opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        host = parts.hostname or "localhost"
        database = unquote(parts.path.lstrip("/")) or "default"
        use_tls = scheme == "clickhouses"
        if "secure" in opts:
            use_tls = _flag(opts["secure"], "secure")
        if secure is not None:
            use_tls = bool(secure)
        do_verify = _flag(opts.get("verify", True), "verify")
        if verify is not None:
            do_verify = bool(verify)
        kwargs: dict[str, Any] = {}
        ct = connect_timeout if connect_timeout is not None else opts.get("connect_timeout")
        if ct is not None:
            kwargs["connect_timeout"] = float(ct)
        srt = send_receive_timeout if send_receive_timeout is not None else opts.get("send_receive_timeout")
        if srt is not None:
            kwargs["send_receive_timeout"] = float(srt)
        if "compression" in opts:
            comp = opts["compression"]
            kwargs["compression"] = comp if comp.lower() not in _TRUE | _FALSE else _flag(comp, "compression")
        the_user = user if user is not None else (unquote(parts.username) if parts.username else None)
        the_password = password if password is not None else (
            unquote(parts.password) if parts.password else None)
        if the_password is None:
            the_password = ""
        return ClickHouseStore(
            host,
            port or (9440 if use_tls else 9000),
            database,
            user=the_user or "default",
            password=the_password,
            secure=use_tls,
            verify=do_verify,
            ca_certs=ca_certs or opts.get("ca_certs"),
            url=safe,
            readonly_limits=readonly_limits,
            migrations_dir=migrations_dir,
            **kwargs,
        )

    raise StoreError(
        f"unsupported store URL {redact_url(url)!r}: use clickhouse://host:port/db, "
        "clickhouses://host:port/db or chdb://PATH"
    )


def open_store_from_settings(settings: Any, **options: Any) -> Store:
    """``open_store`` with the ``clickhouse_*`` fields of a settings object
    (``streams.settings.Settings``): url, user, password, secure, ca_certs.

    Empty values mean "not set", so a URL's own user/password/?secure= apply.
    """
    return open_store(
        getattr(settings, "clickhouse_url", None) or DEFAULT_URL,
        user=getattr(settings, "clickhouse_user", "") or None,
        password=getattr(settings, "clickhouse_password", "") or None,
        secure=True if getattr(settings, "clickhouse_secure", False) else None,
        ca_certs=getattr(settings, "clickhouse_ca_certs", "") or None,
        **options,
    )
