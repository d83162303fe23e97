"""One masking function for everything layerwatch prints: settings, logs, `/health`, errors.

:func:`mask` replaces, in any text:

- every secret value registered with :func:`register` (the settings' secret fields, and
  the passwords and tokens found in URL settings), however it is embedded;
- the password of any ``scheme://user:password@host`` URL (``user:***@host``);
- the value of URL query parameters named like a credential (``?token=``, ``&password=`` …);
- ``Bearer <token>`` headers.

:func:`install` registers a settings object's secrets and masks every log record of the
process (a log-record factory, so Faust's, aiokafka's and the driver's loggers are covered
whatever handlers they install) and uncaught tracebacks. Secrets shorter than
:data:`MIN_SECRET_CHARS` are not replaced inside free text (a one-letter password would mask
every such letter); URLs and settings fields are masked whatever their length.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Any, Iterable
from urllib.parse import quote, unquote, urlsplit

MASK = "***"
MIN_SECRET_CHARS = 4

_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<secret>[^@/\s]*)@")
_QUERY = re.compile(
    r"(?i)(?P<head>[?&;](?:password|passwd|pwd|pass|token|access_token|auth_token|api_key|apikey|key|secret"
    r"|client_secret|signature|sig|x-amz-signature|x-amz-credential|sas|auth)=)(?P<secret>[^&#\s\"']+)")
_BEARER = re.compile(r"(?i)(?P<head>\bbearer\s+)(?P<secret>[A-Za-z0-9._~+/=\-]{4,})")

_lock = threading.Lock()
_secrets: set[str] = set()
_installed = False


def register(values: Iterable[str]) -> None:
    """Add secret values that :func:`mask` replaces from now on (their URL-quoted forms too)."""
    with _lock:
        for value in values:
            if value and len(value) >= MIN_SECRET_CHARS:
                _secrets.update({value, quote(value, safe=""), unquote(value)})


def mask(text: Any) -> str:
    """``text`` (made a string) with every known secret and credential-looking URL part masked."""
    out = text if isinstance(text, str) else str(text)
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in out:
            out = out.replace(secret, MASK)
    out = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", out)
    out = _QUERY.sub(lambda m: f"{m['head']}{MASK}", out)
    return _BEARER.sub(lambda m: f"{m['head']}{MASK}", out)


def mask_data(value: Any) -> Any:
    """``mask`` applied to every string inside dicts, lists and tuples (for JSON answers)."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: mask_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_data(v) for v in value)
    return value


def url_secrets(url: str) -> list[str]:
    """The password and credential query values of a URL (nothing when it has none)."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found.append(unquote(parts.password))
    except ValueError:
        pass
    found.extend(m["secret"] for m in _QUERY.finditer(url))
    return found


class _Masked(logging.LogRecord):
    """A log record whose message and traceback pass through :func:`mask` when first rendered."""

    def getMessage(self) -> str:  # noqa: N802 - logging's name
        return mask(super().getMessage())


def install(settings: Any = None) -> None:
    """Register the settings' secrets and mask every log record and uncaught traceback of this process."""
    global _installed
    if settings is not None:
        register(settings.secret_values())
    with _lock:
        if _installed:
            return
        _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.__class__ = _Masked if type(record) is logging.LogRecord else record.__class__
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)
    hook = sys.excepthook

    def excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        import traceback

        sys.stderr.write(mask("".join(traceback.format_exception(kind, exc, tb))))

    if hook is sys.__excepthook__:
        sys.excepthook = excepthook
