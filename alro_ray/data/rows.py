"""Parsing one raw row: the field parsers, each raising `BadRow` with a stable reason, and the
numbered raw lines the line-oriented readers go through."""

from __future__ import annotations

import ast
import datetime as dt
import gzip
import json
import math
import re
import zlib
from pathlib import Path
from typing import IO, Any, Iterator

from alro_ray.errors import DataError

# An error quotes the offending field only, cut to this: a raw row can hold names and review text.
SHOWN_CHARS = 40
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+(?:\.0*)?")  # "881250949", "+5", "881250949.0"; not "1e9"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class BadRow(Exception):
    """Raised by a row parser. `reason` is the short stable key counted in skip mode; `message`
    is what an error shows after `file:line: ` (default: the reason, then the detail)."""

    def __init__(self, reason: str, detail: str | None = None, message: str | None = None):
        super().__init__(detail or reason)
        self.reason = reason
        self.message = message or (reason if detail is None else f"{reason} ({detail})")


def split_fields(line: str, sep: str, expected: int) -> list[str]:
    fields = line.split(sep)
    if len(fields) != expected:
        raise BadRow("wrong field count", f"expected {expected} {sep!r}-separated fields, got {len(fields)}")
    return fields


def rating_row(fields: list) -> tuple[str, str, float, int]:
    user, item, rating, timestamp = fields
    return parse_id(user, "user"), parse_id(item, "item"), parse_rating(rating), parse_timestamp(timestamp)


def parse_id(value: Any, what: str) -> str:
    if isinstance(value, float) and value.is_integer():  # Parquet ids written as floats
        value = int(value)
    text = clean_text(value)
    if not text:
        raise BadRow(f"empty {what} id")
    return text


def clean_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def parse_rating(value: Any) -> float:
    """A finite number; whether it is on the scale is `ratings.RatingRule`'s to check."""
    rating = to_float(value)
    if not math.isfinite(rating):
        raise BadRow("bad rating", f"rating {show(value)} is not a finite number")
    return rating


def parse_timestamp(value: Any) -> int:
    """Unix seconds, the one rule for every reader and column type: an integer; text holding one,
    optionally signed or with a zero fraction ("+881250949", "881250949.0"); an integral float; a
    date or datetime, or ISO 8601 text ("2018-03-10", "2018-03-10T12:00:00Z"), UTC unless it
    names a zone, fractions of a second dropped. Not 1.5, "12a" or "1e9": exponent text is how
    spreadsheets show a number they have rounded. Whether a negative one (before 1970) may pass
    is the Reader's to check (`data.allow_negative_timestamps`)."""
    if isinstance(value, bool):
        stamp = None
    elif isinstance(value, int):
        stamp = value
    elif isinstance(value, (dt.date, str)):
        stamp = _date_seconds(value)
    else:
        number = to_float(value)
        stamp = int(number) if number.is_integer() else None
    if stamp is None:
        raise BadRow("bad timestamp", f"timestamp {show(value)} is not whole seconds or an ISO 8601 date")
    if not -(2**63) <= stamp < 2**63:
        raise BadRow("bad timestamp", f"timestamp {show(value)} is out of range")
    return stamp


def _date_seconds(value: dt.date | str) -> int | None:
    """Seconds since 1970 of a date, a datetime, or text holding one of those or an integer; None
    when it holds none of them."""
    if isinstance(value, str):
        text = value.strip()
        if _INTEGER_TEXT.fullmatch(text):
            return int(text.split(".")[0])
        try:  # Python 3.10's fromisoformat does not read a "Z" zone
            value = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            return None
    if not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time())
    try:
        aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)
        return (aware - _EPOCH) // dt.timedelta(seconds=1)
    except (TypeError, ValueError, OverflowError):  # pandas' NaT is a datetime too
        return None


def to_float(value: Any) -> float:
    """`value` as a float, NaN when it is not a number (booleans are not)."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def json_object(line: str) -> dict:
    """Strict JSON, else a Python literal (Amazon 2014 metadata uses single quotes)."""
    try:
        obj = json.loads(line)
    except ValueError:
        try:
            obj = ast.literal_eval(line)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise BadRow("bad JSON", "not a JSON object") from None
    if not isinstance(obj, dict):
        raise BadRow("bad JSON", "not a JSON object")
    return obj


def require_field(obj: dict, name: str) -> Any:
    if obj.get(name) is None:
        raise BadRow(f"missing field {name}")
    return obj[name]


def decode(raw: bytes, encoding: str) -> str:
    try:
        return raw.decode(encoding).rstrip("\r\n")
    except UnicodeDecodeError:
        raise BadRow("bad encoding", f"not valid {encoding}") from None


def show(value: Any) -> str:
    """One field as an error message quotes it, cut to SHOWN_CHARS."""
    text = value if isinstance(value, str) else str(value)
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


def numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank raw lines with 1-based numbers; bytes so a bad encoding is one bad row. A file
    that cannot be read to its end (a truncated or corrupt .gz: an interrupted download) is a
    DataError naming the last line read whole, whatever the bad-row policy."""
    number = 0
    try:
        with _open_binary(path) as f:
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    yield number, raw
    except (EOFError, OSError, zlib.error) as e:
        what = "truncated or corrupt gzip data" if path.name.endswith(".gz") else "unreadable"
        raise DataError(f"{path}: {what} after line {number}, the last one read whole ({e}); "
                        "if it was downloaded, download it again") from None


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
