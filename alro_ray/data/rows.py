"""Parsing one raw row: the field parsers, each raising `BadRow` with a stable reason, and the
numbered raw lines the line-oriented readers go through."""

from __future__ import annotations

import ast
import gzip
import json
import math
from pathlib import Path
from typing import IO, Any, Iterator

SHOWN_CHARS = 200


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
        raise BadRow("bad rating", f"rating {value!r} is not a finite number")
    return rating


def parse_timestamp(value: Any) -> int:
    """An integer, or text or a float holding one ("881250949", "881250949.0"); not 1.5."""
    if isinstance(value, int) and not isinstance(value, bool):
        stamp = value
    elif isinstance(value, str) and value.strip().lstrip("+-").isdecimal():
        stamp = int(value)
    else:
        number = to_float(value)
        if not number.is_integer():
            raise BadRow("bad timestamp", f"timestamp {value!r} is not an integer")
        stamp = int(number)
    if not -(2**63) <= stamp < 2**63:
        raise BadRow("bad timestamp", f"timestamp {value!r} is out of range")
    return stamp


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


def show(record: Any) -> str:
    """A raw record as an error message quotes it, cut to SHOWN_CHARS."""
    if isinstance(record, bytes):
        record = record.decode("utf-8", "replace").rstrip("\r\n")
    elif isinstance(record, list):
        record = ",".join(map(str, record))
    text = str(record)
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


def numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank raw lines with 1-based numbers; bytes so a bad encoding is one bad row."""
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield number, raw


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
