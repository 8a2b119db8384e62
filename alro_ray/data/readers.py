"""The per-format readers: MovieLens 100K and 1M, Amazon 2014/2018 reviews, generic tables.

Each streams its files through a `Reader` (source_data.py), which checks every row and applies
the bad-row policy and the rating rule; `READERS` maps a dataset name to its reader. A `table`'s
Parquet interactions are read in batches, column by column where no row can be bad (columns.py),
row by row, numbered, where one might.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from alro_ray.data.columns import typed_interactions
from alro_ray.data.rows import (BadRow, clean_text, json_object, numbered_lines, parse_id, parse_rating,
                                parse_timestamp, rating_row, require_field, show, split_fields)
from alro_ray.data.source_data import Reader, SourceData
from alro_ray.errors import DataError

BATCH_ROWS = 65_536  # Parquet rows decoded at a time: a large table is never held twice
RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]  # of a `table` dataset's interactions

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)


def _read_ml100k(directory: Path, reader: Reader) -> SourceData:
    data, item = _require(directory, "movielens-100k", [["u.data"], ["u.item"]])
    genre_file = directory / "u.genre"
    genres = _read_ml100k_genres(genre_file, reader) if genre_file.is_file() else ML100K_GENRES

    def parse_item(line: str) -> tuple[str, str, str]:
        fields = split_fields(line, "|", 5 + len(genres))
        flags = fields[5:]
        if any(f not in ("0", "1") for f in flags):
            raise BadRow("bad genre flag", "genre flags must be 0 or 1")
        return (parse_id(fields[0], "item"), fields[1],
                "|".join(g for g, f in zip(genres, flags) if f == "1"))

    reader.add_interactions(reader.lines(data, lambda line: rating_row(split_fields(line, "\t", 4)),
                                         encoding="latin-1"))
    reader.add_items(reader.lines(item, parse_item, encoding="latin-1", metadata=True))
    return reader.result("genres", "movies")


def _read_ml100k_genres(path: Path, reader: Reader) -> tuple[str, ...]:
    """`name|index` lines. Strict even in skip mode: a bad entry would shift every genre flag."""
    reader.files.append(str(path))
    by_index: dict[int, str] = {}
    for number, raw in numbered_lines(path):
        line = raw.decode("latin-1").rstrip("\r\n")
        name, _, index = line.rpartition("|")
        if not name or not index.strip().isdigit():
            raise DataError(f"{path}:{number}: expected 'name|index': {show(line)}")
        by_index[int(index)] = name
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(f"{path}: genre indexes must be 0..{len(by_index) - 1}, got {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index)))


def _read_ml1m(directory: Path, reader: Reader) -> SourceData:
    ratings, movies = _require(directory, "movielens-1m", [["ratings.dat"], ["movies.dat"]])

    def parse_movie(line: str) -> tuple[str, str, str]:
        movie, title, genres = split_fields(line, "::", 3)
        return parse_id(movie, "item"), title, genres

    reader.add_interactions(reader.lines(ratings, lambda line: rating_row(split_fields(line, "::", 4)),
                                         encoding="latin-1"))
    reader.add_items(reader.lines(movies, parse_movie, encoding="latin-1", metadata=True))
    return reader.result("genres", "movies")


def _read_amazon(directory: Path, reader: Reader) -> SourceData:
    reviews, meta = _amazon_files(directory)

    def parse_review(line: str) -> tuple[str, str, float, int]:
        obj = json_object(line)
        return (parse_id(require_field(obj, "reviewerID"), "user"),
                parse_id(require_field(obj, "asin"), "item"),
                parse_rating(require_field(obj, "overall")),
                parse_timestamp(require_field(obj, "unixReviewTime")))

    def parse_meta(line: str) -> tuple[str, str, list[str]]:
        obj = json_object(line)
        title = obj.get("title")
        return (parse_id(require_field(obj, "asin"), "item"), "" if title is None else str(title),
                _category_path(obj))

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
        raise BadRow("bad category", f"category is not a list: {show(path)}")
    return [str(c).strip() for c in path if str(c).strip()]


def _shared_root(paths: list[list[str]]) -> str | None:
    """The first category when every non-empty path starts with it (e.g. "CDs & Vinyl")."""
    firsts = {p[0] for p in paths if p}
    return firsts.pop() if len(firsts) == 1 else None


def _read_table(directory: Path, reader: Reader) -> SourceData:
    """`interactions.{parquet,csv}` and `items.{parquet,csv}`; Parquet wins when both exist."""
    interactions, items = _require(directory, "table", [["interactions.parquet", "interactions.csv"],
                                                        ["items.parquet", "items.csv"]])
    if interactions.suffix == ".parquet":
        _read_parquet_interactions(interactions, reader)
    else:
        header, rows = _table_records(interactions)
        pick = _picker(interactions, header, RATING_COLUMNS)
        reader.add_interactions(reader.records(interactions, rows, lambda rec: rating_row(pick(rec))))

    header, rows = _table_records(items)
    pick = _picker(items, header, ["item_id", "title"] + [c for c in header if c not in ("item_id", "title")])

    def parse_item(rec: list) -> tuple[str, str, str]:
        item, title, *extra = pick(rec)
        return parse_id(item, "item"), clean_text(title), "|".join(v for v in map(clean_text, extra) if v)

    reader.add_items(reader.records(items, rows, parse_item, metadata=True))
    extra_names = [c for c in header if c not in ("item_id", "title")]
    return reader.result("/".join(extra_names) or "attributes", "items")


def _read_parquet_interactions(path: Path, reader: Reader) -> None:
    """Batch by batch: a batch that no row rule can object to goes in as typed columns
    (`columns.typed_interactions`: no Python object per value), any other row by row, numbered."""
    header, batches = _parquet_batches(path)
    _unique_header(path, header)
    pick = _picker(path, header, RATING_COLUMNS)
    index = [header.index(c) for c in RATING_COLUMNS]
    reader.files.append(str(path))
    for start, batch in batches:
        typed = typed_interactions(*(batch.column(i) for i in index), reader.allow_negative)
        if typed is None or not reader.add_columns(*typed):
            reader.add_interactions(reader.parse(path, _batch_rows(path, start, batch),
                                                 lambda rec: rating_row(pick(rec))))


def _picker(path: Path, header: list[str], names: list[str]) -> Callable[[list], list]:
    """A function taking a row to the values of columns `names`, checking the field count and, in
    a CSV, that the row decoded (a byte that was not UTF-8 arrives as a surrogate: one bad row)."""
    missing = [c for c in names if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(header)})")
    indexes = [header.index(c) for c in names]
    text = path.suffix != ".parquet"  # Arrow's strings are valid UTF-8 already

    def pick(row: list) -> list:
        if len(row) != len(header):
            raise BadRow("wrong field count", f"expected {len(header)} fields, got {len(row)}")
        if text and not _decoded("".join(row)):
            raise BadRow("bad encoding", "not valid utf-8")
        return [row[i] for i in indexes]

    return pick


def _decoded(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a byte that was not UTF-8
        return False
    return True


def _table_records(path: Path) -> tuple[list[str], Iterator[tuple[int, list]]]:
    """The header and the numbered rows (CSV line numbers; Parquet 1-based row numbers), streamed."""
    if path.suffix == ".parquet":
        header, batches = _parquet_batches(path)
        rows = (row for start, batch in batches for row in _batch_rows(path, start, batch))
    else:
        header, rows = _csv_header(path), _csv_rows(path)
    _unique_header(path, header)
    return header, rows


def _unique_header(path: Path, header: list[str]) -> None:
    repeated = [name for name, n in Counter(header).items() if n > 1]
    if repeated:
        where = f"{path}:1" if path.suffix != ".parquet" else str(path)
        raise DataError(f"{where}: column {repeated[0]!r} appears {header.count(repeated[0])} times in the "
                        f"header; give each column its own name (columns: {', '.join(header)})")


def _parquet_batches(path: Path) -> tuple[list[str], Iterator[tuple[int, object]]]:
    """The header and the record batches, each with the number of rows before it, streamed."""
    import pyarrow.parquet as pq  # here: only Parquet tables need it

    try:
        with pq.ParquetFile(path) as f:
            header = list(f.schema_arrow.names)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e

    def batches() -> Iterator[tuple[int, object]]:
        number = 0
        with pq.ParquetFile(path) as f:
            it = f.iter_batches(batch_size=BATCH_ROWS)
            while True:
                try:
                    batch = next(it, None)
                except Exception as e:  # a corrupt page
                    raise DataError(f"{path}: unreadable Parquet after row {number}: {e}") from e
                if batch is None:
                    return
                yield number, batch
                number += batch.num_rows

    return header, batches()


def _batch_rows(path: Path, start: int, batch) -> Iterator[tuple[int, list]]:
    """A batch's rows as Python values, numbered from start + 1 (1-based row numbers)."""
    try:
        columns = [c.to_pylist() for c in batch.columns]
    except Exception as e:  # a value Python cannot hold (year 10000)
        raise DataError(f"{path}: unreadable Parquet after row {start}: {e}") from e
    for k, row in enumerate(zip(*columns), start + 1):
        yield k, list(row)


def _open_csv(path: Path):
    """Text that never fails to decode: a byte-order mark is dropped (spreadsheets write one), and
    a byte that is not UTF-8 becomes a surrogate the row's check finds, on the row's own line (a
    strict decoder fails a whole buffer ahead, on no line in particular)."""
    return open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")


def _csv_header(path: Path) -> list[str]:
    with _open_csv(path) as f:
        try:
            header = [c.strip() for c in next(csv.reader(f), [])]
        except csv.Error as e:
            raise DataError(f"{path}:1: unreadable CSV header: {e}") from e
    if not _decoded("".join(header)):
        raise DataError(f"{path}:1: the header is not valid UTF-8")
    return header


def _csv_rows(path: Path) -> Iterator[tuple[int, list]]:
    """Rows after the header, with the line each ends on; blank lines are not rows."""
    with _open_csv(path) as f:
        rows = csv.reader(f)
        try:
            next(rows, None)
            for row in rows:
                if any(field.strip() for field in row):
                    yield rows.line_num, row
        except csv.Error as e:
            raise DataError(f"{path}:{rows.line_num}: unreadable CSV: {e}") from e


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


READERS: dict[str, Callable[[Path, Reader], SourceData]] = {
    "movielens-100k": _read_ml100k, "movielens-1m": _read_ml1m, "amazon": _read_amazon, "table": _read_table,
}
