"""The inputs real files contain: signed, junk, negative and date-typed timestamps; byte-order
marks; bad bytes; truncated gzip; repeated header names; large tables read in batches. Each
malformed value is a `file:line: reason` DataError, or one skipped and counted row; never a
traceback. Errors quote only the offending field, cut short."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import zlib
from pathlib import Path

import pandas as pd
import pytest

from alro_ray.data import readers
from alro_ray.data.rows import SHOWN_CHARS
from alro_ray.data.sources import METADATA_PREFIX, read_source
from alro_ray.errors import DataError

HEADER = "user_id,item_id,rating,timestamp\n"
DAY = 1520640000  # 2018-03-10T00:00:00Z


def table_dir(tmp_path: Path, rows: str, header: str = HEADER, encoding_prefix: bytes = b"") -> Path:
    (tmp_path / "interactions.csv").write_bytes(encoding_prefix + (header + rows).encode())
    (tmp_path / "items.csv").write_text("item_id,title\ni1,One\ni2,Two\n")
    return tmp_path


def stamps(tmp_path: Path, *values: str, **kwargs) -> list[int]:
    rows = "".join(f"u,i1,3,{v}\n" for v in values)
    src = read_source("table", table_dir(tmp_path, rows), **kwargs)
    return src.interactions["timestamp"].tolist()


# ---------------------------------------------------------------------------------------------
# Timestamps: one rule for every reader and column type.


@pytest.mark.parametrize("text, expected", [
    ("881250949", 881250949), ("+881250949", 881250949), (" 42 ", 42), ("881250949.0", 881250949),
    ("2018-03-10", DAY), ("2018-03-10T12:00:00Z", DAY + 43200), ("2018-03-10 13:00:00+01:00", DAY + 43200),
    ("2018-03-10T00:00:00.900", DAY),  # fractions of a second are dropped, not rounded
])
def test_timestamp_forms_accepted(tmp_path, text, expected):
    assert stamps(tmp_path, text) == [expected]


@pytest.mark.parametrize("text", ["+-5", "--5", "12a", "1e9", "1.52064E+09", "1.5", "0x10", "", "٣"])
def test_junk_timestamps_are_bad_rows_never_tracebacks(tmp_path, text):
    d = table_dir(tmp_path, f"u,i1,3,1\nu,i1,3,{text}\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(d / 'interactions.csv'))}:3: bad timestamp"):
        read_source("table", d)
    src = read_source("table", d, on_bad_row="skip")
    assert src.bad_rows == {"bad timestamp": 1} and src.interactions["timestamp"].tolist() == [1]


def test_negative_timestamps_are_refused_unless_allowed(tmp_path):
    d = table_dir(tmp_path, "u,i1,3,5\nu,i1,3,-5\nu,i2,3,1969-12-31T23:59:59Z\n")
    with pytest.raises(DataError, match=r"interactions.csv:3: timestamp -5 is negative .*"
                                        r"data.allow_negative_timestamps"):
        read_source("table", d)
    src = read_source("table", d, on_bad_row="skip")
    assert src.bad_rows == {"negative timestamp": 2} and src.rows_read == 3
    assert read_source("table", d, allow_negative_timestamps=True).interactions["timestamp"].tolist() == [5, -5, -1]


def test_negative_timestamps_in_amazon_and_movielens_too(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::-978300760\n")
    (tmp_path / "movies.dat").write_text("10::Heat (1995)::Action\n")
    with pytest.raises(DataError, match=r"ratings.dat:1: timestamp -978300760 is negative"):
        read_source("movielens-1m", tmp_path)


def test_datetime_typed_parquet_columns_become_unix_seconds(tmp_path):
    when = pd.to_datetime(["2018-03-10 00:00:00", "2018-03-10 12:00:00.75", "1969-12-31 23:59:59"], format="ISO8601")
    pd.DataFrame({"user_id": ["u", "u", "u"], "item_id": ["i1", "i2", "i1"], "rating": [3.0] * 3,
                  "timestamp": when}).to_parquet(tmp_path / "interactions.parquet")
    pd.DataFrame({"item_id": ["i1", "i2"], "title": ["One", "Two"]}).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(DataError, match=r"interactions.parquet:3: timestamp -1 is negative"):
        read_source("table", tmp_path)
    src = read_source("table", tmp_path, on_bad_row="skip")
    assert src.interactions["timestamp"].tolist() == [DAY, DAY + 43200]
    assert src.bad_rows == {"negative timestamp": 1}


def test_zone_aware_parquet_datetimes_and_dates(tmp_path):
    aware = pd.to_datetime(["2018-03-10T01:00:00+01:00", "2018-03-10T00:00:00+00:00"], utc=True)
    pd.DataFrame({"user_id": ["u", "u"], "item_id": ["i1", "i2"], "rating": [3.0, 4.0],
                  "timestamp": aware}).to_parquet(tmp_path / "interactions.parquet")
    pd.DataFrame({"item_id": ["i1", "i2"], "title": ["One", "Two"]}).to_parquet(tmp_path / "items.parquet")
    assert read_source("table", tmp_path).interactions["timestamp"].tolist() == [DAY, DAY]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["i1"], "rating": [3.0],
                             "timestamp": pa.array([dt.date(2018, 3, 10)], pa.date32())}),
                   tmp_path / "interactions.parquet")
    assert read_source("table", tmp_path).interactions["timestamp"].tolist() == [DAY]


# ---------------------------------------------------------------------------------------------
# Encodings and headers.


def test_csv_with_a_byte_order_mark(tmp_path):
    d = table_dir(tmp_path, "u,i1,3,7\n", encoding_prefix=b"\xef\xbb\xbf")
    (d / "items.csv").write_bytes(b"\xef\xbb\xbfitem_id,title\ni1,One\n")
    src = read_source("table", d)
    assert src.interactions.values.tolist() == [["u", "i1", 3.0, 7]]
    assert src.items.values.tolist() == [["i1", "One", ""]]


def test_a_bad_byte_in_a_csv_is_one_bad_row_on_its_own_line(tmp_path):
    """Past the decoder's first buffer, behind a quoted title that spans two lines."""
    rows = b"".join(b"u%d,i1,3,%d\n" % (k, k) for k in range(3000))  # lines 2..3001
    bad_line = 3000 + 2
    (tmp_path / "interactions.csv").write_bytes(HEADER.encode() + rows + b"u\xff,i1,3,1\nu,i2,3,2\n")
    (tmp_path / "items.csv").write_bytes(b'item_id,title\ni1,"Two\nlines"\ni2,Caf\xe9\ni3,Three\n')
    with pytest.raises(DataError, match=rf"interactions.csv:{bad_line}: bad encoding"):
        read_source("table", tmp_path)
    src = read_source("table", tmp_path, on_bad_row="skip")
    assert src.bad_rows == {"bad encoding": 1, METADATA_PREFIX + "bad encoding": 1}
    assert src.rows_read == 3002 and len(src.interactions) == 3001
    assert src.items.values.tolist() == [["i1", "Two\nlines", ""], ["i3", "Three", ""]]
    (tmp_path / "interactions.csv").write_bytes(HEADER.encode() + b"u,i1,3,1\n")
    with pytest.raises(DataError, match=r"items.csv:4: bad encoding"):  # the row ends on line 4
        read_source("table", tmp_path)


def test_a_header_that_is_not_utf8_is_refused(tmp_path):
    (tmp_path / "interactions.csv").write_bytes(b"user_id,item_id,rating,timestamp,caf\xe9\nu,i1,3,1,x\n")
    (tmp_path / "items.csv").write_text("item_id,title\ni1,One\n")
    with pytest.raises(DataError, match=r"interactions.csv:1: .*not valid UTF-8"):
        read_source("table", tmp_path)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_repeated_header_name_is_refused_naming_it(tmp_path, fmt):
    if fmt == "csv":
        table_dir(tmp_path, "u,i1,3,1,4\n", header="user_id,item_id,rating,timestamp, rating\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table([["u"], ["i1"], [3.0], [1], [4.0]],
                                names=["user_id", "item_id", "rating", "timestamp", "rating"]),
                       tmp_path / "interactions.parquet")
        pd.DataFrame({"item_id": ["i1"], "title": ["One"]}).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(DataError, match=rf"interactions.{fmt}.*column 'rating' appears 2 times"):
        read_source("table", tmp_path, on_bad_row="skip")


# ---------------------------------------------------------------------------------------------
# Truncated and corrupt gzip (an interrupted download).


def amazon_dir(tmp_path: Path, reviews: bytes) -> Path:
    (tmp_path / "reviews.json.gz").write_bytes(reviews)
    (tmp_path / "meta_x.json").write_text(json.dumps({"asin": "B1", "title": "T"}) + "\n")
    return tmp_path


def reviews_gz(n: int) -> bytes:
    lines = [json.dumps({"reviewerID": f"A{k}", "asin": "B1", "overall": 5.0, "unixReviewTime": DAY + k,
                         "reviewText": "words " * (k % 50)}) for k in range(n)]
    return gzip.compress(("\n".join(lines) + "\n").encode())


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_truncated_gzip_names_the_file_and_the_last_good_line(tmp_path, on_bad_row):
    whole = reviews_gz(3000)
    cut = whole[: len(whole) // 2]
    complete = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")  # whole lines in the cut file
    assert 100 < complete < 3000
    d = amazon_dir(tmp_path, cut)
    with pytest.raises(DataError, match=rf"^{re.escape(str(d / 'reviews.json.gz'))}: .*truncated or corrupt.* "
                                        rf"after line {complete}\b"):
        read_source("amazon", d, on_bad_row=on_bad_row)


@pytest.mark.parametrize("damage", ["flip", "not gzip"])
def test_corrupt_gzip_is_a_data_error(tmp_path, damage):
    whole = reviews_gz(50)
    data = (whole[:40] + bytes(b ^ 0xFF for b in whole[40:60]) + whole[60:]) if damage == "flip" \
        else b"<html>503 Service Unavailable</html>\n"
    d = amazon_dir(tmp_path, data)
    with pytest.raises(DataError, match=rf"^{re.escape(str(d / 'reviews.json.gz'))}: .*truncated or corrupt"):
        read_source("amazon", d)


# ---------------------------------------------------------------------------------------------
# Large tables, read in batches.


def test_parquet_is_read_in_batches_with_running_row_numbers(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    n = 10
    users = [f"u{k}" for k in range(n)]
    users[7] = ""
    pd.DataFrame({"user_id": users, "item_id": ["i1"] * n, "rating": [3.0] * n,
                  "timestamp": list(range(n))}).to_parquet(tmp_path / "interactions.parquet")
    pd.DataFrame({"item_id": ["i1"], "title": ["One"]}).to_parquet(tmp_path / "items.parquet")

    def whole(*args, **kwargs):
        raise AssertionError("read in batches, not whole")

    monkeypatch.setattr(pq, "read_table", whole)
    monkeypatch.setattr(readers, "BATCH_ROWS", 3)
    with pytest.raises(DataError, match=r"interactions.parquet:8: empty user id"):
        read_source("table", tmp_path)
    src = read_source("table", tmp_path, on_bad_row="skip")
    assert src.interactions["timestamp"].tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]


def columnar_cases():
    """Interaction columns of many Parquet types, each as a clean batch and with odd rows planted."""
    import pyarrow as pa

    n, zone = 6, "Europe/Paris"
    clean = {
        "user_id": [pa.array([f"u{k % 3}" for k in range(n)]), pa.array(range(10, 10 + n), pa.int32()),
                    pa.array([7.0, -0.0, 3.0, 1e15, 2.0, 7.0]),
                    pa.array([f"u{k % 2}" for k in range(n)]).dictionary_encode()],
        "item_id": [pa.array([f"i{k % 2 + 1}" for k in range(n)]), pa.array([1, 2] * 3, pa.uint8())],
        "rating": [pa.array([3.0, 4.5, 1.0, 5.0, 2.0, 0.0]), pa.array([1, 2, 3, 4, 5, 5], pa.int8()),
                   pa.array([1.5, 2.0, 3.0, 4.0, 5.0, 1.0], pa.float32())],
        "timestamp": [pa.array(range(n), pa.int64()), pa.array(range(n), pa.uint64()),
                      pa.array([1_520_640_000_750 + k for k in range(n)], pa.timestamp("ms", zone)),
                      pa.array([10**18 + 999_999_999 * k for k in range(n)], pa.timestamp("ns")),
                      pa.array([17_600 + k for k in range(n)], pa.date32())],
    }
    odd = {
        "user_id": [pa.array([" u1", "u1 ", "\xa0u", "u\x1c", "ü", ""]), pa.array([1.5, None, 2.0, 3.0, 4.0, 5.0]),
                    pa.array([True, False] * 3)],
        "item_id": [pa.array(["i1", None, "i2", "i1", "i2", "i1"])],
        "rating": [pa.array([3.0, float("nan"), 11.0, -1.0, 4.0, None]), pa.array(["3", "4", "x", "5", "1", "2"])],
        "timestamp": [pa.array([5, -3, 1, 2, 3, 4]), pa.array([1.0, 2.5, 3.0, 4.0, 5.0, 6.0]),
                      pa.array([2**63 + 1, 1, 2, 3, 4, 5], pa.uint64()), pa.array(["1", "2018-03-10", "x", "4", "5", "6"])],
    }
    base = {name: cases[0] for name, cases in clean.items()}
    for name in clean:
        for column in clean[name] + odd[name]:
            yield pa.table({**base, name: column})


@pytest.mark.parametrize("skip", [False, True])
def test_parquet_read_by_columns_equals_row_by_row(tmp_path, monkeypatch, skip):
    """Whatever the columns hold, reading a batch as typed columns gives what the row parsers give:
    the same frame (values and dtypes), counts and bad rows, the same error on the same row."""
    import pyarrow.parquet as pq

    pd.DataFrame({"item_id": ["i1", "i2", "1", "2"], "title": ["One", "Two", "Uno", "Dos"]}).to_parquet(
        tmp_path / "items.parquet")
    monkeypatch.setattr(readers, "BATCH_ROWS", 4)  # a clean batch beside one with an odd row
    for table in columnar_cases():
        pq.write_table(table, tmp_path / "interactions.parquet")

        def read(rowwise: bool):
            with monkeypatch.context() as m:
                if rowwise:
                    m.setattr(readers, "typed_interactions", lambda *a: None)
                try:
                    return read_source("table", tmp_path, on_bad_row="skip" if skip else "error")
                except DataError as e:
                    return str(e)

        by_columns, by_rows = read(False), read(True)
        where = (table.schema, table.to_pydict())
        if isinstance(by_rows, str):
            assert by_columns == by_rows, where
            continue
        pd.testing.assert_frame_equal(by_columns.interactions, by_rows.interactions, obj=str(where))
        assert (by_columns.rows_read, by_columns.bad_rows) == (by_rows.rows_read, by_rows.bad_rows), where


# ---------------------------------------------------------------------------------------------
# Logs: a bad row's error quotes the offending field only, cut short.


def test_errors_quote_the_field_not_the_row(tmp_path):
    secret = {"reviewerName": "Jane Q. Public", "reviewText": "my private thoughts " * 20}
    bad = {"reviewerID": "A1", "asin": "B1", "overall": 5.0, "unixReviewTime": "soon", **secret}
    huge = {"reviewerID": "A1", "asin": "B1", "overall": "9" * 500 + "x", "unixReviewTime": 1, **secret}
    for line in (bad, huge):
        (tmp_path / "r.json").write_text(json.dumps(line) + "\n")
        (tmp_path / "meta_x.json").write_text(json.dumps({"asin": "B1"}) + "\n")
        with pytest.raises(DataError) as e:
            read_source("amazon", tmp_path)
        msg = str(e.value)
        assert "Jane" not in msg and "private" not in msg, msg
        quoted = re.findall(r"'[^']*'", msg)
        assert quoted and all(len(q) <= SHOWN_CHARS + 5 for q in quoted), msg
    assert "'soon'" in str(read_error(tmp_path, bad))


def read_error(tmp_path: Path, line: dict) -> DataError:
    (tmp_path / "r.json").write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError) as e:
        read_source("amazon", tmp_path)
    return e.value
