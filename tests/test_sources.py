"""Readers of every source format, their handling of bad input, and the synthetic generator."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alro_ray.config import GradingConfig, SyntheticConfig, load_config
from alro_ray.errors import ConfigError, DataError
from alro_ray.data.sources import METADATA_PREFIX, SourceData, read_source
from alro_ray.data.synthetic import generate

FLAGS_COMEDY = "|".join(["0"] * 5 + ["1"] + ["0"] * 13)  # index 5 = Comedy
FLAGS_ACTION_WAR = "|".join(["0", "1"] + ["0"] * 15 + ["1", "0"])


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def check_shape(src: SourceData) -> None:
    assert list(src.interactions.columns) == ["user", "item", "rating", "timestamp"]
    assert list(src.items.columns) == ["item", "title", "attributes"]
    assert src.interactions["rating"].dtype == np.float64
    assert src.interactions["timestamp"].dtype == np.int64
    assert src.items["item"].is_unique
    assert src.rows_read == len(src.interactions) + src.bad_interaction_rows


def ml100k(tmp_path: Path, data: str, genre: bool = True) -> Path:
    write(tmp_path / "u.data", data)
    write(tmp_path / "u.item",
          f"1|Café Society (1995)|01-Jan-1995||http://x|{FLAGS_COMEDY}\n"
          f"2|Top Gun (1986)|01-Jan-1986||http://y|{FLAGS_ACTION_WAR}\n", encoding="latin-1")
    if genre:
        names = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]
        write(tmp_path / "u.genre", "".join(f"{n}|{i}\n" for i, n in enumerate(names)) + "\n")
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Readers.


@pytest.mark.parametrize("genre", [True, False])
def test_movielens_100k(tmp_path, genre):
    d = ml100k(tmp_path, "196\t1\t3\t881250949\n\n186\t2\t4\t891717742\n186\t1\t5\t891717743\n", genre)
    src = read_source("movielens-100k", d)
    check_shape(src)
    assert src.interactions.values.tolist() == [
        ["196", "1", 3.0, 881250949], ["186", "2", 4.0, 891717742], ["186", "1", 5.0, 891717743]]
    assert src.items.values.tolist() == [["1", "Café Society (1995)", "Comedy"],
                                         ["2", "Top Gun (1986)", "Action|War"]]
    assert (src.attribute_name, src.domain_plural, src.rows_read, src.bad_rows) == ("genres", "movies", 3, {})
    assert str(d / "u.data") in src.files


def test_movielens_1m(tmp_path):
    write(tmp_path / "ratings.dat", "1::10::5::978300760\r\n2::11::3::978302109\r\n")
    write(tmp_path / "movies.dat", "10::Amélie (2001)::Comedy|Romance\n11::Heat (1995)::Action\n",
          encoding="iso-8859-1")
    src = read_source("movielens-1m", str(tmp_path))
    check_shape(src)
    assert src.interactions.values.tolist() == [["1", "10", 5.0, 978300760], ["2", "11", 3.0, 978302109]]
    assert src.items.values.tolist() == [["10", "Amélie (2001)", "Comedy|Romance"],
                                         ["11", "Heat (1995)", "Action"]]


def amazon_reviews(rows: list[dict]) -> list[str]:
    return [json.dumps(r) for r in rows]


def review(user: str, asin: str, rating: float = 5.0, t: int = 1520640000) -> dict:
    return {"overall": rating, "reviewerID": user, "asin": asin, "unixReviewTime": t, "verified": True}


def test_amazon_2018_gz(tmp_path):
    write_gz(tmp_path / "CDs_and_Vinyl_5.json.gz",
             amazon_reviews([review("A1", "B1"), review("A1", "B2", 3.0, 1520640001), review("A2", "B9")]))
    write_gz(tmp_path / "meta_CDs_and_Vinyl.json.gz", [
        json.dumps({"asin": "B1", "title": "Blue Train", "category": ["CDs & Vinyl", "Jazz", "Hard Bop"]}),
        json.dumps({"asin": "B2", "category": ["CDs & Vinyl"]}),
        json.dumps({"asin": "B1", "title": "Blue Train (dup)", "category": ["CDs & Vinyl"]}),
    ])
    src = read_source("amazon", tmp_path)
    check_shape(src)
    assert len(src.interactions) == 3  # B9 has no metadata: kept, the pipeline counts it
    assert src.items.values.tolist() == [["B1", "Blue Train", "Jazz|Hard Bop"], ["B2", "", "CDs & Vinyl"]]
    assert (src.attribute_name, src.domain_plural) == ("category", "CDs")
    assert src.bad_rows == {METADATA_PREFIX + "duplicate item": 1}


def test_amazon_2014_python_literal_metadata(tmp_path):
    write(tmp_path / "reviews_Books_5.json", "\n".join(amazon_reviews([review("A1", "X1")])))
    write(tmp_path / "meta_Books.json",
          "{'asin': 'X1', 'title': \"Gödel's Proof\", 'categories': [['Books', 'Science', 'Math'], ['Books']]}\n"
          "{'asin': 'X2', 'categories': [['Books', 'Fiction']]}\n")
    src = read_source("amazon", tmp_path)
    assert src.items.values.tolist() == [["X1", "Gödel's Proof", "Science|Math"], ["X2", "", "Fiction"]]
    assert src.domain_plural == "products"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table(tmp_path, fmt):
    inter = pd.DataFrame({"user_id": ["007", "b"], "item_id": ["x", "y"], "rating": [4.0, 2.5],
                          "timestamp": [10, 20]})
    items = pd.DataFrame({"item_id": ["x", "y"], "title": ["Ex", "Why"], "genre": ["Rock", ""],
                          "era": ["70s", "90s"]})
    if fmt == "csv":
        inter.to_csv(tmp_path / "interactions.csv", index=False)
        items.to_csv(tmp_path / "items.csv", index=False)
    else:
        inter.to_parquet(tmp_path / "interactions.parquet")
        items.to_parquet(tmp_path / "items.parquet")
    src = read_source("table", tmp_path)
    check_shape(src)
    assert src.interactions.values.tolist() == [["007", "x", 4.0, 10], ["b", "y", 2.5, 20]]
    assert src.items.values.tolist() == [["x", "Ex", "Rock|70s"], ["y", "Why", "90s"]]
    assert (src.attribute_name, src.domain_plural) == ("genre/era", "items")


def test_table_without_attributes(tmp_path):
    write(tmp_path / "interactions.csv", "user_id,item_id,rating,timestamp\n1,2,3,4\n")
    write(tmp_path / "items.csv", "item_id,title\n2,Two\n")
    src = read_source("table", tmp_path)
    assert src.attribute_name == "attributes"
    assert src.items.values.tolist() == [["2", "Two", ""]]


# ---------------------------------------------------------------------------------------------
# Bad input.

BAD_100K = ("1\t1\t5\t100\n"
            "2\t1\t4\n"  # line 2: wrong field count
            "3\t1\tfive\t100\n"  # 3: bad rating
            "4\t1\tnan\t100\n"  # 4: bad rating
            "\n"  # 5: blank, not a row
            "5\t1\t4\tsoon\n"  # 6: bad timestamp
            "\t1\t4\t100\n"  # 7: empty user id
            "6\t2\t2\t101\n")


def test_bad_line_raises_with_file_and_line(tmp_path):
    d = ml100k(tmp_path, BAD_100K)
    with pytest.raises(DataError) as e:
        read_source("movielens-100k", d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'u.data'}:2: ")
    assert "wrong field count" in msg and "'2\\t1\\t4'" not in msg  # the row itself is not quoted


def test_bad_lines_skipped_and_counted(tmp_path):
    d = ml100k(tmp_path, BAD_100K)
    src = read_source("movielens-100k", d, on_bad_row="skip")
    check_shape(src)
    assert src.bad_rows == {"wrong field count": 1, "bad rating": 2, "bad timestamp": 1,
                            "empty user id": 1}
    assert src.rows_read == 7 and len(src.interactions) == 2


@pytest.mark.parametrize("line,reason", [
    ("not json", "bad JSON"),
    ("[1, 2]", "bad JSON"),
    (json.dumps({"reviewerID": "A", "overall": 5, "unixReviewTime": 1}), "missing field asin"),
    (json.dumps({"reviewerID": "A", "asin": "B", "overall": "x", "unixReviewTime": 1}), "bad rating"),
    (json.dumps({"reviewerID": "A", "asin": "B", "overall": 5, "unixReviewTime": 1.5}), "bad timestamp"),
    (json.dumps({"reviewerID": "A", "asin": "B", "overall": 10**400, "unixReviewTime": 1}), "bad rating"),
    (json.dumps({"reviewerID": "A", "asin": "B", "overall": 11, "unixReviewTime": 1}),
     "rating outside data.rating_scale"),
    (json.dumps({"reviewerID": "", "asin": "B", "overall": 5, "unixReviewTime": 1}), "empty user id"),
])
def test_amazon_bad_lines(tmp_path, line, reason):
    reviews = write_gz(tmp_path / "r.json.gz", amazon_reviews([review("A1", "B1")]) + [line])
    write(tmp_path / "meta_x.json", json.dumps({"asin": "B1", "title": "T"}) + "\n{broken\n")
    with pytest.raises(DataError, match=f"^{reviews}:2: "):
        read_source("amazon", tmp_path)
    src = read_source("amazon", tmp_path, on_bad_row="skip")
    assert src.bad_rows == {reason: 1, METADATA_PREFIX + "bad JSON": 1}
    assert src.rows_read == 2 == len(src.interactions) + src.bad_interaction_rows


def test_bad_metadata_line(tmp_path):
    d = ml100k(tmp_path, "1\t1\t5\t100\n")
    with open(d / "u.item", "ab") as f:
        f.write(b"3|Short line\n")
    with pytest.raises(DataError, match=f"^{d / 'u.item'}:3: wrong field count"):
        read_source("movielens-100k", d)
    src = read_source("movielens-100k", d, on_bad_row="skip")
    assert src.bad_rows == {METADATA_PREFIX + "wrong field count": 1}
    assert src.rows_read == 1 and len(src.items) == 2


def test_bad_encoding_is_a_bad_row(tmp_path):
    write(tmp_path / "r.json", json.dumps(review("A1", "B1")) + "\n")
    with open(tmp_path / "r.json", "ab") as f:
        f.write(b'{"reviewerID": "\xff"}\n')
    write(tmp_path / "meta_x.json", json.dumps({"asin": "B1"}) + "\n")
    with pytest.raises(DataError, match=":2: "):
        read_source("amazon", tmp_path)
    assert read_source("amazon", tmp_path, on_bad_row="skip").bad_rows == {"bad encoding": 1}


def test_table_csv_bad_rows(tmp_path):
    write(tmp_path / "interactions.csv",
          "user_id,item_id,rating,timestamp\n1,2,3,4\n\n1,2,3\n1,2,x,4\n")
    write(tmp_path / "items.csv", "item_id,title\n2,Two\n")
    with pytest.raises(DataError, match=f"^{tmp_path / 'interactions.csv'}:4: wrong field count"):
        read_source("table", tmp_path)
    src = read_source("table", tmp_path, on_bad_row="skip")
    assert src.bad_rows == {"wrong field count": 1, "bad rating": 1} and src.rows_read == 3


def test_table_parquet_bad_row_number_and_missing_column(tmp_path):
    pd.DataFrame({"user_id": ["a", None], "item_id": ["x", "y"], "rating": [1.0, 2.0],
                  "timestamp": [1, 2]}).to_parquet(tmp_path / "interactions.parquet")
    pd.DataFrame({"item_id": ["x"]}).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(DataError, match=":2: empty user id"):
        read_source("table", tmp_path)
    with pytest.raises(DataError, match="items.parquet: missing column.*title"):
        read_source("table", tmp_path, on_bad_row="skip")


@pytest.mark.parametrize("dataset,expected", [
    ("movielens-100k", "movielens-100k expects u.data and u.item in .*; missing: u.data"),
    ("movielens-1m", "movielens-1m expects ratings.dat and movies.dat in .*; missing: ratings.dat, movies.dat"),
    ("table", "missing: interactions.parquet or interactions.csv, items.parquet or items.csv"),
    ("amazon", "amazon expects exactly one reviews file .*found reviews files: none"),
])
def test_missing_files(tmp_path, dataset, expected):
    write(tmp_path / "u.item", "")  # a partial MovieLens 100K directory
    with pytest.raises(DataError, match=expected):
        read_source(dataset, tmp_path)


def test_amazon_ambiguous_reviews_file(tmp_path):
    for name in ("a.json", "b.json.gz", "meta_a.json"):
        write(tmp_path / name, "")
    with pytest.raises(DataError, match=r"found reviews files: \['a.json', 'b.json.gz'\]"):
        read_source("amazon", tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'ml'; valid: synthetic, movielens-100k"):
        read_source("ml", tmp_path)
    with pytest.raises(DataError, match="needs a data directory"):
        read_source("amazon", None)
    with pytest.raises(DataError, match="not a directory"):
        read_source("amazon", tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# Rating scale and grading.


def table(tmp_path: Path, ratings: list) -> Path:
    rows = "".join(f"u{k % 2},i{k},{r},{100 + k}\n" for k, r in enumerate(ratings))
    write(tmp_path / "interactions.csv", "user_id,item_id,rating,timestamp\n" + rows)
    write(tmp_path / "items.csv", "item_id,title\n" + "".join(f"i{k},T{k}\n" for k in range(len(ratings))))
    return tmp_path


def test_rating_outside_scale_is_a_bad_row(tmp_path):
    """The new-user case: a table with ratings 5000 and -3 (gain 2^5000 overflows; NDCG refuses
    negative relevance). Error names file:line and the scale; skip counts them."""
    d = table(tmp_path, [4, 5000, 0, -3, 10, 2.5])
    with pytest.raises(DataError, match=rf"^{d / 'interactions.csv'}:3: rating 5000 outside "
                                        r"data.rating_scale \[0, 10\] \(set data.on_bad_row=skip"):
        read_source("table", d)
    src = read_source("table", d, on_bad_row="skip")
    check_shape(src)
    assert src.bad_rows == {"rating outside data.rating_scale": 2}
    assert src.interactions["rating"].tolist() == [4.0, 0.0, 10.0, 2.5]
    assert src.rows_read == 6 and src.grading == {"method": "none"}
    with pytest.raises(DataError, match=r":2: rating 4 outside data.rating_scale \[1, 3\]"):
        read_source("table", d, rating_scale=[1, 3])


def test_movielens_ratings_unchanged_by_the_default_scale(tmp_path):
    d = ml100k(tmp_path, "1\t1\t1\t100\n2\t2\t5\t101\n")
    src = read_source("movielens-100k", d)
    assert src.interactions["rating"].tolist() == [1.0, 5.0] and src.grading == {"method": "none"}


def test_bins_grade_play_counts(tmp_path):
    """bins [0, 2, 10, 50]: 0 -> 0; 1-2 -> 1; 3-10 -> 2; 11-50 -> 3; over 50 -> 4."""
    d = table(tmp_path, [0, 1, 2, 3, 10, 11, 51, 500])
    src = read_source("table", d, rating_scale=[0, 4],
                      grading=GradingConfig(method="bins", bins=[0, 2, 10, 50]))
    assert src.interactions["rating"].tolist() == [0, 1, 1, 2, 2, 3, 4, 4]
    assert src.grading == {"method": "bins", "edges": [0, 2, 10, 50], "levels": 5}
    check_shape(src)


def test_quantiles_grade_by_the_values_read(tmp_path):
    """10 values, 3 levels: the edges are the 1/3 and 2/3 quantiles, at sorted positions 9/3 = 3
    and 18/3 = 6: values 1 and 5. A value equal to an edge takes the lower level."""
    d = table(tmp_path, [1, 1, 1, 1, 2, 3, 5, 8, 20, 100])
    src = read_source("table", d, rating_scale=[0, 2], grading=GradingConfig(method="quantiles", levels=3))
    assert src.interactions["rating"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert src.grading == {"method": "quantiles", "edges": [1.0, 5.0], "levels": 3}


def test_synthetic_ratings_go_through_the_same_rule():
    src = read_source("synthetic", None, synthetic=SMALL, rating_scale=[0, 2],
                      grading=GradingConfig(method="bins", bins=[2, 4]))
    raw = generate(SMALL).interactions["rating"]
    assert src.interactions["rating"].tolist() == [0 if r <= 2 else 1 if r <= 4 else 2 for r in raw]
    with pytest.raises(DataError, match=r"synthetic data: rating 5 outside data.rating_scale \[0, 4\]"):
        read_source("synthetic", None, synthetic=SMALL, rating_scale=[0, 4])


@pytest.mark.parametrize("override, message", [
    (["data.rating_scale=[-1, 5]"], r"data.rating_scale must be \[min, max\] with 0 <= min < max"),
    (["data.rating_scale=[5, 5]"], "0 <= min < max"),
    (["data.rating_scale=[1]"], "0 <= min < max"),
    (["data.rating_scale=[0, 5000]"], "max must be <= 100"),
    (["data.grading.method=bins"], "bins must be a non-empty, strictly ascending list"),
    (["data.grading={method: bins, bins: [5, 2]}"], "strictly ascending"),
    (["data.grading.bins=[1, 2]"], "bins is set but data.grading.method is 'none'"),
    (["data.grading.method=quantiles"], "levels must be >= 2 for method 'quantiles'"),
    (["data.grading={method: bins, bins: [1], levels: 3}"], "levels is set but"),
    (["data.grading={method: quantiles, levels: 12}"], r"levels 0..11; data.rating_scale \[0.0, 10.0\] must"),
    (["data.grading={method: bins, bins: [1, 2]}", "data.rating_scale=[1, 5]"], r"rating_scale=\[0, 2\]"),
])
def test_bad_scale_or_grading_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_scale_and_grading_from_config():
    d = load_config(None, ["data.rating_scale=[0, 4]", "data.grading={method: bins, bins: [0, 2, 10, 50]}"]).data
    assert d.rating_scale == [0.0, 4.0] and d.grading.top_level() == 4


# ---------------------------------------------------------------------------------------------
# Synthetic data.

SMALL = SyntheticConfig(users=60, items=80, genres=6, min_interactions=20, max_interactions=30)


def test_synthetic_shape_and_determinism():
    a, b = generate(SMALL), read_source("synthetic", None, synthetic=SMALL)
    check_shape(a)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    c = generate(SyntheticConfig(**{**SMALL.__dict__, "seed": 1}))
    assert not a.interactions.equals(c.interactions)
    assert (a.attribute_name, a.domain_plural, a.bad_rows) == ("genres", "movies", {})
    assert a.items["title"].is_unique and len(a.items) == 80
    assert set(a.interactions["rating"]) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    per_user = a.interactions.groupby("user", sort=False)
    assert per_user.size().between(20, 30).all()
    assert per_user["item"].apply(lambda s: s.is_unique).all()
    assert per_user["timestamp"].apply(lambda s: s.is_monotonic_increasing and s.is_unique).all()
    assert a.interactions["item"].isin(a.items["item"]).all()


def test_synthetic_titles_unique_past_word_lists():
    src = generate(SyntheticConfig(users=2, items=1400, genres=20, min_interactions=1, max_interactions=2))
    assert src.items["title"].is_unique
    assert src.items["attributes"].str.split("|").str.len().between(1, 2).all()


def test_synthetic_planted_taste():
    """Each user's ratings follow their genres: the genre a user rates highest in one half of
    their ratings predicts high ratings in the other half, much better than item quality does."""
    src = generate(SMALL)
    assert src.interactions["rating"].nunique() >= 3
    genres = src.items.set_index("item")["attributes"].str.split("|")
    df = src.interactions.assign(genres=src.interactions["item"].map(genres))
    wins = 0
    for _, g in df.groupby("user"):
        first, second = g.iloc[::2], g.iloc[1::2]
        by_genre = first.explode("genres").groupby("genres")["rating"].mean()
        liked = set(by_genre[by_genre >= by_genre.max() - 0.5].index)
        hit = second["genres"].apply(lambda gs: bool(liked & set(gs)))
        if hit.any() and (~hit).any() and second.loc[hit, "rating"].mean() > second.loc[~hit, "rating"].mean():
            wins += 1
    assert wins >= 0.8 * df["user"].nunique()


def test_synthetic_taste_groups_share_profiles():
    """taste_groups=1: every user likes the same genres, so one genre's mean rating is high for
    everyone; with per-user tastes (the default) users disagree about the same genre."""
    def genre_means(cfg):
        src = generate(cfg)
        genres = src.items.set_index("item")["attributes"].str.split("|")
        df = src.interactions.assign(genre=src.interactions["item"].map(genres)).explode("genre")
        return df.groupby(["user", "genre"])["rating"].mean().unstack()

    shared = genre_means(SyntheticConfig(**{**SMALL.__dict__, "taste_groups": 1, "noise": 0.1}))
    best = shared.mean().idxmax()
    assert (shared[best] >= 4).mean() > 0.9
    own = genre_means(SMALL)
    assert own.std().min() > 0.5  # every genre is loved by some users and disliked by others
    with pytest.raises(ConfigError, match="taste_groups"):
        generate(SyntheticConfig(taste_groups=-1))
