"""The one shape every source is read into (`SourceData`), and the `Reader` that builds it.

The Reader holds the bad-row policy of one read: a row parser raises `BadRow`, and the Reader
either raises a `DataError` that starts with `file:line: ` and quotes the offending field, cut
short (`on_bad_row="error"`; never the whole row, which can hold reviewers' names and text), or
skips the row and counts it by reason (`on_bad_row="skip"`).
Metadata reasons carry the prefix `metadata: `, so `rows_read == len(interactions) +
bad_interaction_rows`. Every interaction's rating goes through the `RatingRule` (grading and
`data.rating_scale`) as it is read, so an off-scale rating is a bad row like any other; so is a
negative timestamp unless `data.allow_negative_timestamps`.

Interactions are kept as typed chunks (Arrow text for the ids, NumPy for ratings and timestamps):
rows parsed one at a time are turned into a chunk every CHUNK_ROWS, and a Parquet batch that
needs no row rule arrives as columns (`add_columns`), so a large log is never held as a Python
object per value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa

from alro_ray.data.ratings import RatingRule
from alro_ray.data.rows import BadRow, decode, numbered_lines
from alro_ray.errors import DataError

METADATA_PREFIX = "metadata: "
NEGATIVE_TIMESTAMP = "negative timestamp"
CHUNK_ROWS = 65_536  # rows parsed one at a time are turned into typed columns this many at a time
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
    grading: dict = field(default_factory=lambda: {"method": "none"})  # how ratings became levels

    @property
    def bad_interaction_rows(self) -> int:
        return sum(n for r, n in self.bad_rows.items() if not r.startswith(METADATA_PREFIX))


def interactions_frame(users: list[str] | pa.ChunkedArray, items: list[str] | pa.ChunkedArray,
                       ratings: Iterable[float], timestamps: Iterable[int]) -> pd.DataFrame:
    """Ids as pandas' text dtype (Arrow-backed: built from Arrow text without a Python str each)."""
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


class Reader:
    """Shared state of one `read_source` call: bad-row policy, rating rule, counts, files, rows."""

    def __init__(self, on_bad_row: str, rule: RatingRule | None = None, allow_negative_timestamps: bool = False):
        if on_bad_row not in ("error", "skip"):
            raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.skip = on_bad_row == "skip"
        self.rule = rule or RatingRule()
        self.allow_negative = allow_negative_timestamps
        self.bad_rows: dict[str, int] = {}
        self.files: list[str] = []
        self.rows_read = 0
        self.chunks: list[tuple[pa.Array, pa.Array, np.ndarray, np.ndarray]] = []  # file order
        self.pending: tuple[list, list, list, list] = ([], [], [], [])  # rows not in a chunk yet
        self.meta: dict[str, tuple[str, str]] = {}  # item -> (title, attributes), file order

    def records(self, path: Path, records: Iterable[tuple[int, Any]], parse: Callable[[Any], T],
                metadata: bool = False) -> Iterator[T]:
        """Parse numbered records, yielding good ones and raising or counting bad ones.
        Interaction rows (not `metadata`) are (user, item, rating, timestamp), rating graded
        and timestamp checked."""
        self.files.append(str(path))
        return self.parse(path, records, parse, metadata)

    def parse(self, path: Path, records: Iterable[tuple[int, Any]], parse: Callable[[Any], T],
              metadata: bool = False) -> Iterator[T]:
        """`records` for a file already named in `files` (a Parquet file read batch by batch)."""
        for number, record in records:
            if not metadata:
                self.rows_read += 1
            try:
                row = parse(record)
                if not metadata:
                    user, item, rating, timestamp = row
                    if timestamp < 0 and not self.allow_negative:
                        raise BadRow(NEGATIVE_TIMESTAMP, message=f"timestamp {timestamp} is negative (before 1970); "
                                     "set data.allow_negative_timestamps=true if the data means it")
                    row = (user, item, self.rule.level(rating), timestamp)
            except BadRow as e:
                self._bad(path, number, e, metadata)
                continue
            yield row

    def lines(self, path: Path, parse: Callable[[str], T], encoding: str = "utf-8",
              metadata: bool = False) -> Iterator[T]:
        return self.records(path, numbered_lines(path), lambda raw: parse(decode(raw, encoding)),
                            metadata)

    def _bad(self, path: Path, number: int, e: BadRow, metadata: bool) -> None:
        if not self.skip:
            raise DataError(f"{path}:{number}: {e.message} (set data.on_bad_row=skip to skip such rows)")
        self.count((METADATA_PREFIX if metadata else "") + e.reason)

    def count(self, reason: str) -> None:
        self.bad_rows[reason] = self.bad_rows.get(reason, 0) + 1

    def add_interactions(self, rows: Iterable[tuple[str, str, float, int]]) -> None:
        users, items, ratings, timestamps = self.pending
        for user, item, rating, timestamp in rows:
            users.append(user)
            items.append(item)
            ratings.append(rating)
            timestamps.append(timestamp)
            if len(users) >= CHUNK_ROWS:
                self._flush()

    def add_columns(self, users: pa.Array, items: pa.Array, ratings: np.ndarray, timestamps: np.ndarray) -> bool:
        """A batch of interactions whose every field is known good (`columns.typed_interactions`),
        counted as read; False, adding nothing, when a rating is off the scale: the caller then
        reads the batch row by row, so the row rules report or count it."""
        levels = self.rule.levels(ratings)
        if levels is None:
            return False
        self._flush()  # keep file order
        self.rows_read += len(levels)
        self.chunks.append((users, items, levels, timestamps))
        return True

    def _flush(self) -> None:
        users, items, ratings, timestamps = self.pending
        if users:
            self.chunks.append((pa.array(users, pa.string()), pa.array(items, pa.string()),
                                np.asarray(ratings, dtype=np.float64), np.asarray(timestamps, dtype=np.int64)))
            for values in self.pending:  # emptied in place: add_interactions holds these lists
                values.clear()

    def _ids(self, k: int) -> pa.ChunkedArray:
        return pa.chunked_array([c[k].cast(pa.large_string()) for c in self.chunks], pa.large_string())

    def _numbers(self, k: int, dtype: type) -> np.ndarray:
        return np.concatenate([c[k] for c in self.chunks]).astype(dtype, copy=False) if self.chunks \
            else np.zeros(0, dtype)

    def add_items(self, rows: Iterable[tuple[str, str, str]]) -> None:
        for item, title, attributes in rows:
            if item in self.meta:  # the first record wins; not an error, but worth knowing
                self.count(METADATA_PREFIX + "duplicate item")
            else:
                self.meta[item] = (title, attributes)

    def result(self, attribute_name: str, domain_plural: str) -> SourceData:
        self._flush()
        ratings, grading = self.rule.finish(self._numbers(2, np.float64))
        users, items, timestamps = self._ids(0), self._ids(1), self._numbers(3, np.int64)
        self.chunks = []
        return SourceData(
            interactions=interactions_frame(users, items, ratings, timestamps),
            items=items_frame(list(self.meta), [t for t, _ in self.meta.values()],
                              [a for _, a in self.meta.values()]),
            attribute_name=attribute_name,
            domain_plural=domain_plural,
            rows_read=self.rows_read,
            bad_rows=dict(self.bad_rows),
            files=list(self.files),
            grading=grading,
        )
