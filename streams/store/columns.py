"""Column normalisation for inserts, shared by both backends.

``insert`` takes columns as numpy arrays (or lists). Each is converted once,
vectorised where the input allows it, to a canonical form for its ClickHouse
type; each backend then turns the canonical form into what its client wants
(numpy arrays for clickhouse-driver, a pyarrow Table for chDB).

Canonical forms:

- integers / floats: 1-D numpy array of the exact dtype (``UInt32`` -> uint32 ...)
- ``DateTime``: 1-D uint32 array of epoch seconds (from datetime64, epoch
  seconds, or datetime objects; naive datetimes are taken as UTC)
- ``Date``: 1-D uint16 array of days since the epoch
- ``String``: 1-D object array of ``str`` / ``bytes`` (None -> ''); for a backend
  that ships Arrow (``normalize(..., arrow=True)``), a pyarrow string or binary array
  when every value is str (or bytes)
- ``Array(T)``: ``ArrayData(offsets, values)``; from a 2-D array (one row per
  value) or a sequence of 1-D arrays / lists
- anything else: a plain list, passed through
"""

from __future__ import annotations

import calendar
import datetime as _dt
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import StoreError

INT_TYPES: dict[str, np.dtype] = {
    name: np.dtype(name.lower())
    for name in ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64")
}
FLOAT_TYPES: dict[str, np.dtype] = {"Float32": np.dtype(np.float32), "Float64": np.dtype(np.float64)}
NUMERIC_TYPES = {**INT_TYPES, **FLOAT_TYPES, "Bool": np.dtype(np.uint8)}

_WRAPPER = re.compile(r"^(?:LowCardinality)\((.*)\)$")


@dataclass
class ArrayData:
    """A column of arrays, flattened: row i is values[offsets[i]:offsets[i+1]]."""

    offsets: np.ndarray  # int64, length n + 1, offsets[0] == 0
    values: Any  # numpy array (numeric) or object array (String), length offsets[-1]
    inner: str  # ClickHouse type of the elements

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def uniform_width(self) -> int | None:
        """The common row length when every row has the same length."""
        if len(self) == 0:
            return 0
        widths = np.diff(self.offsets)
        w = int(widths[0])
        return w if bool(np.all(widths == w)) else None

    def to_lists(self) -> list[list]:
        """Rows as Python lists (what clickhouse-driver's Array column writes)."""
        n = len(self)
        if n == 0:
            return []
        w = self.uniform_width()
        values = self.values
        if w is not None and isinstance(values, np.ndarray) and values.dtype != object:
            return values.reshape(n, w).tolist() if w else [[] for _ in range(n)]
        flat = values.tolist() if isinstance(values, np.ndarray) else list(values)
        off = self.offsets.tolist()
        return [flat[off[i] : off[i + 1]] for i in range(n)]


@dataclass
class Column:
    """One normalised column: its ClickHouse type, the base type without
    LowCardinality, and the canonical data."""

    name: str
    ch_type: str
    base: str
    data: Any
    has_bytes: bool = False  # String columns holding bytes values


def base_type(ch_type: str) -> str:
    """The type without LowCardinality(...)."""
    m = _WRAPPER.match(ch_type)
    return base_type(m.group(1)) if m else ch_type


def _length(value: Any) -> int:
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            raise StoreError("a column must be 1-D (or 2-D for Array columns), got a scalar")
        return int(value.shape[0])
    try:
        return len(value)
    except TypeError:
        raise StoreError(f"a column must be an array or a list, got {type(value).__name__}") from None


def _numeric(name: str, value: Any, dtype: np.dtype) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        items = list(value)
        if dtype.kind in "iu" and all(type(v) is int for v in items):
            # Python ints: convert exactly (np.asarray would go through float64
            # for values beyond int64, e.g. UInt64 offsets near 2**64).
            try:
                return np.array(items, dtype=dtype)
            except (OverflowError, ValueError) as e:
                raise StoreError(f"column {name!r}: {e}") from None
        value = items
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise StoreError(f"column {name!r}: expected a 1-D array, got shape {arr.shape}")
    if arr.dtype == dtype:
        return arr
    if arr.dtype.kind in "OUS":
        try:
            arr = arr.astype(np.float64 if dtype.kind == "f" else np.int64)
        except (TypeError, ValueError) as e:
            raise StoreError(f"column {name!r}: cannot convert to {dtype}: {e}") from None
    if dtype.kind in "iu" and arr.dtype.kind == "f":
        if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr == np.floor(arr))):
            raise StoreError(f"column {name!r}: non-integral values for an integer column")
    if dtype.kind in "iu" and arr.dtype.kind in "iuf" and arr.size:
        info = np.iinfo(dtype)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise StoreError(f"column {name!r}: values out of range for {dtype} ({lo}..{hi})")
    return arr.astype(dtype)


def _epoch(value: Any) -> float:
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            return calendar.timegm(value.timetuple()) + value.microsecond / 1e6
        return value.timestamp()
    if isinstance(value, _dt.date):
        return float(calendar.timegm(value.timetuple()))
    if isinstance(value, np.datetime64):
        return float(value.astype("datetime64[ms]").astype(np.int64)) / 1000.0
    if value is None:
        return 0.0
    return float(value)


def _datetime(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise StoreError(f"column {name!r}: expected a 1-D array, got shape {arr.shape}")
    if arr.dtype.kind == "M":
        secs = arr.astype("datetime64[s]").astype(np.int64)
    elif arr.dtype.kind in "iub":
        secs = arr.astype(np.int64)
    elif arr.dtype.kind == "f":
        secs = np.floor(arr).astype(np.int64)
    elif arr.dtype.kind == "O":
        secs = np.fromiter((math.floor(_epoch(v)) for v in arr), dtype=np.int64, count=len(arr))
    else:
        raise StoreError(f"column {name!r}: cannot convert {arr.dtype} to DateTime")
    if secs.size and (secs.min() < 0 or secs.max() > 0xFFFFFFFF):
        raise StoreError(f"column {name!r}: DateTime out of range (epoch seconds 0..2**32-1)")
    return secs.astype(np.uint32)


def _date(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind == "M":
        days = arr.astype("datetime64[D]").astype(np.int64)
    elif arr.dtype.kind in "iu":
        days = arr.astype(np.int64)
    else:
        days = np.fromiter((int(_epoch(v) // 86400) for v in arr), dtype=np.int64, count=len(arr))
    if days.size and (days.min() < 0 or days.max() > 0xFFFF):
        raise StoreError(f"column {name!r}: Date out of range")
    return days.astype(np.uint16)


def _arrow_strings(value: Any) -> tuple[Any, bool] | None:
    """The column as one pyarrow string (or binary) array, converted in C; None when it holds
    anything but str / bytes (None, numbers, ...), which the generic path below handles."""
    import pyarrow as pa

    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        arr = value
    else:
        if not isinstance(value, (list, np.ndarray)):
            value = list(value)
        if isinstance(value, np.ndarray) and (value.ndim != 1 or value.dtype.kind not in "OUS"):
            return None
        try:
            arr = pa.array(value, from_pandas=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return None
    if arr.null_count:
        return None
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr, False
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        return arr, True
    return None


def _strings(name: str, value: Any) -> tuple[np.ndarray, bool]:
    arr = value if isinstance(value, np.ndarray) else np.array(list(value), dtype=object)
    if arr.ndim != 1:
        raise StoreError(f"column {name!r}: expected a 1-D array of strings, got shape {arr.shape}")
    if arr.dtype.kind == "U":
        return arr.astype(object), False
    if arr.dtype.kind == "S":
        return arr.astype(object), True
    if arr.dtype != object:
        return arr.astype(str).astype(object), False
    has_bytes = False
    fixed = None
    for i, v in enumerate(arr):
        if isinstance(v, str):
            continue
        if isinstance(v, (bytes, bytearray, memoryview)):
            has_bytes = True
            if not isinstance(v, bytes):
                fixed = arr.copy() if fixed is None else fixed
                fixed[i] = bytes(v)
            continue
        fixed = arr.copy() if fixed is None else fixed
        fixed[i] = "" if v is None else str(v)
    return (arr if fixed is None else fixed), has_bytes


def _array(name: str, value: Any, inner: str) -> ArrayData:
    inner_base = base_type(inner)
    dtype = NUMERIC_TYPES.get(inner_base)
    if isinstance(value, np.ndarray) and value.ndim == 2 and dtype is not None:
        n, w = value.shape
        offsets = np.arange(0, n * w + 1, w, dtype=np.int64) if w else np.zeros(n + 1, np.int64)
        return ArrayData(offsets, np.ascontiguousarray(value.reshape(-1), dtype=dtype), inner)
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise StoreError(f"column {name!r}: Array column expects 2-D or a sequence of rows")
    rows = list(value)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if dtype is not None:
        parts = [np.asarray(r, dtype=dtype).reshape(-1) for r in rows]
        values = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        return ArrayData(offsets, values, inner)
    flat = [x for r in rows for x in r]
    if inner_base == "String":
        values, _ = _strings(name, np.array(flat, dtype=object) if flat else np.zeros(0, object))
        return ArrayData(offsets, values, inner)
    return ArrayData(offsets, flat, inner)


def normalize(
    table: str, types: Mapping[str, str], columns: Mapping[str, Any], *, arrow: bool = False
) -> tuple[int, list[Column]]:
    """Check ``columns`` against the table's column ``types`` and convert each to
    its canonical form. Returns (row count, columns in the given order).

    ``arrow=True`` (a backend that ships Arrow, chDB): String columns of str (or bytes)
    become one pyarrow array each, converted in C, instead of an object array checked
    element by element in Python and converted to Arrow afterwards."""
    if not columns:
        raise StoreError(f"insert into {table!r}: no columns given")
    unknown = [c for c in columns if c not in types]
    if unknown:
        raise StoreError(f"insert into {table!r}: unknown column(s) {', '.join(map(repr, unknown))}")
    lengths = {name: _length(v) for name, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise StoreError(f"insert into {table!r}: columns differ in length: {lengths}")
    n = next(iter(lengths.values()))
    out: list[Column] = []
    for name, value in columns.items():
        ch_type = types[name]
        base = base_type(ch_type)
        has_bytes = False
        if base in NUMERIC_TYPES:
            data: Any = _numeric(name, value, NUMERIC_TYPES[base])
        elif base == "DateTime" or base.startswith("DateTime("):
            data = _datetime(name, value)
        elif base == "Date":
            data = _date(name, value)
        elif base == "String" or base.startswith("FixedString("):
            fast = _arrow_strings(value) if arrow and base == "String" else None
            data, has_bytes = fast if fast is not None else _strings(name, value)
        elif base.startswith("Array(") and base.endswith(")"):
            data = _array(name, value, base[6:-1])
        else:
            data = value.tolist() if isinstance(value, np.ndarray) else list(value)
        out.append(Column(name, ch_type, base, data, has_bytes))
    return n, out
