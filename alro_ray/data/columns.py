"""A Parquet batch of interactions read column by column, without a Python object per row.

`typed_interactions` gives the values the per-row parsers of rows.py would give (ids as text,
ratings as float64, timestamps as int64 Unix seconds), computed on whole Arrow columns, or None
when any row of the batch needs those parsers: a null, an id with space or non-ASCII text at an
end (`str.strip` decides), a float id or timestamp with a fraction, text ratings or timestamps, a
value out of range, a negative timestamp that is not allowed, a type met nowhere else. The caller
then reads that batch row by row, so a bad row is still reported or counted by the same rules,
with its row number; this module only decides when nothing can be bad.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# An id whose first and last characters are printable ASCII other than space: `str.strip()` leaves
# it as it is (its middle may hold anything).
_PLAIN_ID = r"(?s)^[!-~](.*[!-~])?$"
_UNITS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# Python's datetime holds years 1 to 9999; a value outside makes the row reader fail, so leave it to it.
_FIRST_SECOND, _LAST_SECOND = -62_135_596_800, 253_402_300_799


def _plain(column: pa.Array) -> pa.Array:
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _integer(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)  # booleans are not integers to Arrow (nor to the row parsers)


def ids(column: pa.Array) -> pa.Array | None:
    """`rows.parse_id` of every value, as a string array; None when some value needs the row rule."""
    column = _plain(column)
    if column.null_count:
        return None
    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return column if pc.all(pc.match_substring_regex(column, _PLAIN_ID)).as_py() else None
    if _integer(t):
        return pc.cast(column, pa.string())
    if pa.types.is_floating(t):  # an integral float is an integer id ("7.0" -> "7")
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        if len(values) and not (np.isfinite(values).all() and (np.floor(values) == values).all()
                                and np.abs(values).max() < 2.0**62):
            return None
        return pc.cast(pa.array(values.astype(np.int64)), pa.string())
    return None


def ratings(column: pa.Array) -> np.ndarray | None:
    """`rows.parse_rating` of every value (finite numbers only); None when some value needs it."""
    column = _plain(column)
    if column.null_count or not (_integer(column.type) or pa.types.is_floating(column.type)):
        return None
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    return values if np.isfinite(values).all() else None


def timestamps(column: pa.Array) -> np.ndarray | None:
    """`rows.parse_timestamp` of every value: integers as they are, datetimes (UTC unless zoned,
    fractions of a second dropped) and dates as Unix seconds; None for anything else."""
    column = _plain(column)
    t = column.type
    if column.null_count:
        return None
    if _integer(t):
        if pa.types.is_uint64(t) and len(column) and pc.max(column).as_py() >= 2**63:
            return None
        return column.to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_timestamp(t):
        seconds = np.floor_divide(column.cast(pa.int64()).to_numpy(), _UNITS_PER_SECOND[t.unit])
    elif pa.types.is_date32(t):
        seconds = column.cast(pa.int32()).to_numpy().astype(np.int64) * 86_400
    else:
        return None
    if len(seconds) and (seconds.min() < _FIRST_SECOND or seconds.max() > _LAST_SECOND):
        return None
    return seconds


def typed_interactions(users: pa.Array, items: pa.Array, rating: pa.Array, timestamp: pa.Array,
                       allow_negative: bool) -> tuple[pa.Array, pa.Array, np.ndarray, np.ndarray] | None:
    """(user ids, item ids, ratings, timestamps) of a batch, as `rows.rating_row` reads each row
    and `Reader` checks its timestamp; None when some row must go through those."""
    stamps = timestamps(timestamp)
    if stamps is None or (not allow_negative and len(stamps) and stamps.min() < 0):
        return None
    values = ratings(rating)
    if values is None:
        return None
    u = ids(users)
    i = None if u is None else ids(items)
    return None if i is None else (u, i, values, stamps)
