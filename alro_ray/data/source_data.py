"""The one shape every source is read into (`SourceData`), and the `Reader` that builds it.

The Reader holds the bad-row policy of one read: a row parser raises `BadRow`, and the Reader
either raises a `DataError` that starts with `file:line: ` and quotes the offending field, cut
short (`on_bad_row="error"`; never the whole row, which can hold reviewers' names and text), or
skips the row and counts it by reason (`on_bad_row="skip"`).
Metadata reasons carry the prefix `metadata: `, so `rows_read == len(interactions) +
bad_interaction_rows`. Every interaction's rating goes through the `RatingRule` (grading and
`data.rating_scale`) as it is read, so an off-scale rating is a bad row like any other; so is a
negative timestamp unless `data.allow_negative_timestamps`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from alro_ray.data.ratings import RatingRule
from alro_ray.data.rows import BadRow, decode, numbered_lines
from alro_ray.errors import DataError

METADATA_PREFIX = "metadata: "
NEGATIVE_TIMESTAMP = "negative timestamp"
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
        self.users: list[str] = []
        self.items: list[str] = []
        self.ratings: list[float] = []
        self.timestamps: list[int] = []
        self.meta: dict[str, tuple[str, str]] = {}  # item -> (title, attributes), file order

    def records(self, path: Path, records: Iterable[tuple[int, Any]], parse: Callable[[Any], T],
                metadata: bool = False) -> Iterator[T]:
        """Parse numbered records, yielding good ones and raising or counting bad ones.
        Interaction rows (not `metadata`) are (user, item, rating, timestamp), rating graded
        and timestamp checked."""
        self.files.append(str(path))
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
        ratings, grading = self.rule.finish(np.asarray(self.ratings, dtype=np.float64))
        return SourceData(
            interactions=interactions_frame(self.users, self.items, ratings, self.timestamps),
            items=items_frame(list(self.meta), [t for t, _ in self.meta.values()],
                              [a for _, a in self.meta.values()]),
            attribute_name=attribute_name,
            domain_plural=domain_plural,
            rows_read=self.rows_read,
            bad_rows=dict(self.bad_rows),
            files=list(self.files),
            grading=grading,
        )
