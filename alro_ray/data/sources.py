"""Read raw datasets into one shape: interactions (user, item, rating, timestamp) and item metadata.

Readers stream their files line by line and check every row. A bad row either raises a
`DataError` that starts with `file:line: ` and shows the row (`on_bad_row="error"`), or is
skipped and counted by reason in `SourceData.bad_rows` (`on_bad_row="skip"`). Metadata reasons
carry the prefix `metadata: `, so `rows_read == len(interactions) + bad_interaction_rows`.
Interactions are returned as read: duplicates and unknown items are the pipeline's to count.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import pandas as pd

from alro_ray.config import DATASETS, SyntheticConfig
from alro_ray.errors import DataError

METADATA_PREFIX = "metadata: "
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
SHOWN_CHARS = 200
T = TypeVar("T")


@dataclass
class SourceData:
    interactions: pd.DataFrame  # user (str), item (str), rating (float64), timestamp (int64); file order
    items: pd.DataFrame  # item (str), title (str), attributes (str, "" when none); one row per item
    attribute_name: str  # the word the prompt puts before attributes ("genres", "category", ...)
    domain_plural: str  # "movies", "CDs", "products", "items"
    rows_read: int  # interaction rows read, good and bad (blank lines excluded)
    bad_rows: dict[str, int] = field(default_factory=dict)  # reason -> skipped rows
    files: list[str] = field(default_factory=list)

    @property
    def bad_interaction_rows(self) -> int:
        return sum(n for r, n in self.bad_rows.items() if not r.startswith(METADATA_PREFIX))


class _BadRow(Exception):
    """Raised by a row parser; `reason` is the short stable key counted in skip mode."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(detail or reason)
        self.reason = reason


class _Reader:
    """Shared state of one `read_source` call: bad-row policy, counts, files, and the rows."""

    def __init__(self, on_bad_row: str):
        if on_bad_row not in ("error", "skip"):
            raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.skip = on_bad_row == "skip"
        self.bad_rows: dict[str, int] = {}
        self.files: list[str] = []
        self.rows_read = 0
        self.users: list[str] = []
        self.items: list[str] = []
        self.ratings: list[float] = []
        self.timestamps: list[int] = []
        self.meta: dict[str, tuple[str, str]] = {}  # item -> (title, attributes), file order

    def records(self, path: Path, records: Iterable[tuple[int, Any]], parse: Callable[[Any], T],
                metadata: bool = False) -> Iterator[T]:
        """Parse numbered records, yielding good ones and raising or counting bad ones."""
        self.files.append(str(path))
        for number, record in records:
            if not metadata:
                self.rows_read += 1
            try:
                row = parse(record)
            except _BadRow as e:
                self._bad(path, number, record, e, metadata)
                continue
            yield row

    def lines(self, path: Path, parse: Callable[[str], T], encoding: str = "utf-8",
              metadata: bool = False) -> Iterator[T]:
        return self.records(path, _numbered_lines(path), lambda raw: parse(_decode(raw, encoding)),
                            metadata)

    def _bad(self, path: Path, number: int, record: Any, e: _BadRow, metadata: bool) -> None:
        if not self.skip:
            what = e.reason if str(e) == e.reason else f"{e.reason} ({e})"
            raise DataError(f"{path}:{number}: {what}: {_show(record)} "
                            "(set data.on_bad_row=skip to skip such rows)")
        self.count((METADATA_PREFIX if metadata else "") + e.reason)

    def count(self, reason: str) -> None:
        self.bad_rows[reason] = self.bad_rows.get(reason, 0) + 1

    def add_interactions(self, rows: Iterable[tuple[str, str, float, int]]) -> None:
        for user, item, rating, timestamp in rows:
            self.users.append(user)
            self.items.append(item)
            self.ratings.append(rating)
            self.timestamps.append(timestamp)

    def add_items(self, rows: Iterable[tuple[str, str, str]]) -> None:
        for item, title, attributes in rows:
            if item in self.meta:  # the first record wins; not an error, but worth knowing
                self.count(METADATA_PREFIX + "duplicate item")
            else:
                self.meta[item] = (title, attributes)

    def result(self, attribute_name: str, domain_plural: str) -> SourceData:
        return SourceData(
            interactions=interactions_frame(self.users, self.items, self.ratings, self.timestamps),
            items=items_frame(list(self.meta), [t for t, _ in self.meta.values()],
                              [a for _, a in self.meta.values()]),
            attribute_name=attribute_name,
            domain_plural=domain_plural,
            rows_read=self.rows_read,
            bad_rows=dict(self.bad_rows),
            files=list(self.files),
        )


def interactions_frame(users: list[str], items: list[str], ratings: Iterable[float],
                       timestamps: Iterable[int]) -> pd.DataFrame:
    return pd.DataFrame({
        "user": pd.Series(users, dtype=str),
        "item": pd.Series(items, dtype=str),
        "rating": pd.Series(ratings, dtype="float64"),
        "timestamp": pd.Series(timestamps, dtype="int64"),
    })


def items_frame(items: list[str], titles: list[str], attributes: list[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "item": pd.Series(items, dtype=str),
        "title": pd.Series(titles, dtype=str),
        "attributes": pd.Series(attributes, dtype=str),
    })


# ---------------------------------------------------------------------------------------------
# Entry point.


def read_source(dataset: str, data_dir: str | Path | None, on_bad_row: str = "error",
                synthetic: SyntheticConfig | None = None) -> SourceData:
    """Read `dataset` from `data_dir` (ignored for "synthetic")."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if dataset == "synthetic":
        from alro_ray.data.synthetic import generate  # here: synthetic.py imports SourceData from us

        return generate(synthetic or SyntheticConfig())
    if data_dir is None:
        raise DataError(f"dataset {dataset!r} needs a data directory (data.data_dir)")
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataError(f"data directory for {dataset!r} not found (or not a directory): {directory}")
    reader = _Reader(on_bad_row)
    read = {"movielens-100k": _read_ml100k, "movielens-1m": _read_ml1m,
            "amazon": _read_amazon, "table": _read_table}[dataset]
    return read(directory, reader)


# ---------------------------------------------------------------------------------------------
# Readers.


def _read_ml100k(directory: Path, reader: _Reader) -> SourceData:
    data, item = _require(directory, "movielens-100k", [["u.data"], ["u.item"]])
    genre_file = directory / "u.genre"
    genres = _read_ml100k_genres(genre_file, reader) if genre_file.is_file() else ML100K_GENRES

    def parse_item(line: str) -> tuple[str, str, str]:
        fields = _split(line, "|", 5 + len(genres))
        flags = fields[5:]
        if any(f not in ("0", "1") for f in flags):
            raise _BadRow("bad genre flag", "genre flags must be 0 or 1")
        return (_id(fields[0], "item"), fields[1],
                "|".join(g for g, f in zip(genres, flags) if f == "1"))

    reader.add_interactions(reader.lines(data, lambda line: _rating_row(_split(line, "\t", 4)),
                                         encoding="latin-1"))
    reader.add_items(reader.lines(item, parse_item, encoding="latin-1", metadata=True))
    return reader.result("genres", "movies")


def _read_ml100k_genres(path: Path, reader: _Reader) -> tuple[str, ...]:
    """`name|index` lines. Strict even in skip mode: a bad entry would shift every genre flag."""
    reader.files.append(str(path))
    by_index: dict[int, str] = {}
    for number, raw in _numbered_lines(path):
        line = raw.decode("latin-1").rstrip("\r\n")
        name, _, index = line.rpartition("|")
        if not name or not index.strip().isdigit():
            raise DataError(f"{path}:{number}: expected 'name|index': {_show(line)}")
        by_index[int(index)] = name
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(f"{path}: genre indexes must be 0..{len(by_index) - 1}, got {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index)))


def _read_ml1m(directory: Path, reader: _Reader) -> SourceData:
    ratings, movies = _require(directory, "movielens-1m", [["ratings.dat"], ["movies.dat"]])

    def parse_movie(line: str) -> tuple[str, str, str]:
        movie, title, genres = _split(line, "::", 3)
        return _id(movie, "item"), title, genres

    reader.add_interactions(reader.lines(ratings, lambda line: _rating_row(_split(line, "::", 4)),
                                         encoding="latin-1"))
    reader.add_items(reader.lines(movies, parse_movie, encoding="latin-1", metadata=True))
    return reader.result("genres", "movies")


def _read_amazon(directory: Path, reader: _Reader) -> SourceData:
    reviews, meta = _amazon_files(directory)

    def parse_review(line: str) -> tuple[str, str, float, int]:
        obj = _json_object(line)
        return (_id(_field(obj, "reviewerID"), "user"), _id(_field(obj, "asin"), "item"),
                _rating(_field(obj, "overall")), _timestamp(_field(obj, "unixReviewTime")))

    def parse_meta(line: str) -> tuple[str, str, list[str]]:
        obj = _json_object(line)
        title = obj.get("title")
        return _id(_field(obj, "asin"), "item"), "" if title is None else str(title), _category_path(obj)

    reader.add_interactions(reader.lines(reviews, parse_review))
    records = list(reader.lines(meta, parse_meta, metadata=True))
    root = _shared_root([path for _, _, path in records])
    reader.add_items(
        (item, title, "|".join(path[1:] if len(path) > 1 and path[0] == root else path))
        for item, title, path in records
    )
    plural = "CDs" if any("CDs" in p.name for p in (reviews, meta)) else "products"
    return reader.result("category", plural)


def _amazon_files(directory: Path) -> tuple[Path, Path]:
    """The one reviews file and the one `meta_` file (`.json` or `.json.gz`) in `directory`."""
    found = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.name.endswith((".json", ".json.gz")))
    meta = [p for p in found if p.name.startswith("meta_")]
    reviews = [p for p in found if not p.name.startswith("meta_")]
    if len(reviews) != 1 or len(meta) != 1:
        raise DataError(
            f"amazon expects exactly one reviews file (*.json or *.json.gz) and one metadata file "
            f"(meta_*.json or meta_*.json.gz) in {directory}; found reviews files: "
            f"{[p.name for p in reviews] or 'none'}, metadata files: {[p.name for p in meta] or 'none'}"
            + _listing(directory)
        )
    return reviews[0], meta[0]


def _category_path(obj: dict) -> list[str]:
    """2018: `category` is a list of names; 2014: `categories` is a list of paths, use the first."""
    if "category" in obj:
        path = obj["category"]
    else:
        paths = obj.get("categories") or [[]]
        path = paths[0] if isinstance(paths, list) else paths
    if isinstance(path, str):
        path = [path]
    if not isinstance(path, list):
        raise _BadRow("bad category", f"category is not a list: {path!r}")
    return [str(c).strip() for c in path if str(c).strip()]


def _shared_root(paths: list[list[str]]) -> str | None:
    """The first category when every non-empty path starts with it (e.g. "CDs & Vinyl")."""
    firsts = {p[0] for p in paths if p}
    return firsts.pop() if len(firsts) == 1 else None


def _read_table(directory: Path, reader: _Reader) -> SourceData:
    """`interactions.{parquet,csv}` and `items.{parquet,csv}`; Parquet wins when both exist."""
    interactions, items = _require(directory, "table", [["interactions.parquet", "interactions.csv"],
                                                        ["items.parquet", "items.csv"]])
    header, rows = _table_records(interactions)
    pick = _picker(interactions, header, ["user_id", "item_id", "rating", "timestamp"])
    reader.add_interactions(reader.records(interactions, rows, lambda rec: _rating_row(pick(rec))))

    header, rows = _table_records(items)
    pick = _picker(items, header, ["item_id", "title"] + [c for c in header if c not in ("item_id", "title")])

    def parse_item(rec: list) -> tuple[str, str, str]:
        item, title, *extra = pick(rec)
        return _id(item, "item"), _text(title), "|".join(v for v in map(_text, extra) if v)

    reader.add_items(reader.records(items, rows, parse_item, metadata=True))
    extra_names = [c for c in header if c not in ("item_id", "title")]
    return reader.result("/".join(extra_names) or "attributes", "items")


def _picker(path: Path, header: list[str], names: list[str]) -> Callable[[list], list]:
    """A function taking a row to the values of columns `names`, checking the field count."""
    missing = [c for c in names if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(header)})")
    indexes = [header.index(c) for c in names]

    def pick(row: list) -> list:
        if len(row) != len(header):
            raise _BadRow("wrong field count", f"expected {len(header)} fields, got {len(row)}")
        return [row[i] for i in indexes]

    return pick


def _table_records(path: Path) -> tuple[list[str], Iterator[tuple[int, list]]]:
    """The header and the numbered rows (CSV line numbers; Parquet 1-based row numbers)."""
    return _parquet_rows(path) if path.suffix == ".parquet" else (_csv_header(path), _csv_rows(path))


def _parquet_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, list]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    return list(table.column_names), enumerate((list(r) for r in zip(*columns)), 1)


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        try:
            return [c.strip() for c in next(csv.reader(f), [])]
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}:1: unreadable CSV header: {e}") from e


def _csv_rows(path: Path) -> Iterator[tuple[int, list]]:
    """Rows after the header, with the line each ends on; blank lines are not rows."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        try:
            next(rows, None)
            for row in rows:
                if any(field.strip() for field in row):
                    yield rows.line_num, row
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}:{rows.line_num + 1}: unreadable CSV: {e}") from e


# ---------------------------------------------------------------------------------------------
# Row helpers: each raises _BadRow with a stable reason.


def _rating_row(fields: list) -> tuple[str, str, float, int]:
    user, item, rating, timestamp = fields
    return _id(user, "user"), _id(item, "item"), _rating(rating), _timestamp(timestamp)


def _split(line: str, sep: str, expected: int) -> list[str]:
    fields = line.split(sep)
    if len(fields) != expected:
        raise _BadRow("wrong field count", f"expected {expected} {sep!r}-separated fields, got {len(fields)}")
    return fields


def _id(value: Any, what: str) -> str:
    if isinstance(value, float) and value.is_integer():  # Parquet ids written as floats
        value = int(value)
    text = _text(value)
    if not text:
        raise _BadRow(f"empty {what} id")
    return text


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _rating(value: Any) -> float:
    rating = _float(value)
    if not math.isfinite(rating):
        raise _BadRow("bad rating", f"rating {value!r} is not a finite number")
    return rating


def _timestamp(value: Any) -> int:
    """An integer, or text or a float holding one ("881250949", "881250949.0"); not 1.5."""
    if isinstance(value, int) and not isinstance(value, bool):
        stamp = value
    elif isinstance(value, str) and value.strip().lstrip("+-").isdecimal():
        stamp = int(value)
    else:
        number = _float(value)
        if not number.is_integer():
            raise _BadRow("bad timestamp", f"timestamp {value!r} is not an integer")
        stamp = int(number)
    if not -(2**63) <= stamp < 2**63:
        raise _BadRow("bad timestamp", f"timestamp {value!r} is out of range")
    return stamp


def _float(value: Any) -> float:
    """`value` as a float, NaN when it is not a number (booleans are not)."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _json_object(line: str) -> dict:
    """Strict JSON, else a Python literal (Amazon 2014 metadata uses single quotes)."""
    try:
        obj = json.loads(line)
    except ValueError:
        try:
            obj = ast.literal_eval(line)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise _BadRow("bad JSON", "not a JSON object") from None
    if not isinstance(obj, dict):
        raise _BadRow("bad JSON", "not a JSON object")
    return obj


def _field(obj: dict, name: str) -> Any:
    if obj.get(name) is None:
        raise _BadRow(f"missing field {name}")
    return obj[name]


def _decode(raw: bytes, encoding: str) -> str:
    try:
        return raw.decode(encoding).rstrip("\r\n")
    except UnicodeDecodeError:
        raise _BadRow("bad encoding", f"not valid {encoding}") from None


def _show(record: Any) -> str:
    if isinstance(record, bytes):
        record = record.decode("utf-8", "replace").rstrip("\r\n")
    elif isinstance(record, list):
        record = ",".join(map(str, record))
    text = str(record)
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


# ---------------------------------------------------------------------------------------------
# Files.


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank raw lines with 1-based numbers; bytes so a bad encoding is one bad row."""
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield number, raw


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _require(directory: Path, dataset: str, choices: list[list[str]]) -> list[Path]:
    """For each list of acceptable names, the first present; else a DataError naming them all."""
    found, missing = [], []
    for names in choices:
        present = [directory / n for n in names if (directory / n).is_file()]
        found.extend(present[:1])
        if not present:
            missing.append(" or ".join(names))
    if missing:
        expected = " and ".join(" or ".join(names) for names in choices)
        raise DataError(f"{dataset} expects {expected} in {directory}; missing: {', '.join(missing)}"
                        + _listing(directory))
    return found


def _listing(directory: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in directory.iterdir())
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f" (the directory holds: {', '.join(names[:limit]) + more or 'nothing'})"
