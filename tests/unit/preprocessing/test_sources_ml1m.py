"""Tests of the MovieLens-1M source."""

from __future__ import annotations

from preprocessing.config import SourceConfig
from preprocessing.records import Interaction, ItemCategory, Skipped
from preprocessing.sources.ml1m import locate, parse_movie_line, parse_rating_line
from tests.unit.preprocessing.test_sources_common import FIXTURES, reasons, run_source

ML1M = FIXTURES / "ml1m"
RATINGS = str(ML1M / "ratings.dat")
ACCEPTED = [
    Interaction("1", "1193", 978300760),
    Interaction("1", "661", 978302109),
    Interaction("2", "1193", 978298413),
    Interaction("3", "1193", 978297000),
    Interaction("9", "2355", 978300001),
]
REJECTED = {
    "wrong_field_count": 2,  # one rating, one movie
    "non_integer_timestamp": 1,
    "empty_id": 1,
    "invalid_id": 1,
    "bad_rating": 1,
    "bad_encoding": 1,
}


def test_parse_rating_line():
    assert parse_rating_line("r", b"1::1193::5::978300760") == [Interaction("1", "1193", 978300760)]
    assert parse_rating_line("r", b"1::1193::2::9", min_rating=3) == [
        Skipped("r", "below_min_rating")
    ]
    (bad,) = parse_rating_line("r", b"1::1193::5")
    assert (bad.source, bad.reason, bad.raw) == ("r", "wrong_field_count", "1::1193::5")
    (bad,) = parse_rating_line("r", b"1::1193::5::12.5")
    assert bad.reason == "non_integer_timestamp" and "12.5" in bad.detail


def test_parse_movie_line_first_genre_and_latin1():
    line = "1001::Associate, The (L'Associ\u00e9)(1982)::Comedy|Drama".encode("latin-1")
    assert parse_movie_line("m", line) == [ItemCategory("1001", "Comedy")]
    assert parse_movie_line("m", b"3000::Title::") == [Skipped("m", "no_category")]


def test_locate_accepts_directory_or_ratings_file():
    assert locate(str(ML1M)).ratings.endswith("ratings.dat")
    assert locate(RATINGS).movies.endswith("movies.dat")


def test_read_ml1m_all_rows_accounted_for():
    out = run_source(SourceConfig(name="ml1m", input=str(ML1M)))
    assert sorted(out["interactions"]) == sorted(ACCEPTED)
    assert sorted(out["item_categories"]) == sorted(
        [
            ItemCategory("1193", "Drama"),
            ItemCategory("661", "Animation"),
            ItemCategory("2355", "Animation"),
            ItemCategory("1001", "Comedy"),  # latin-1 title decoded, not bad_encoding
        ]
    )
    assert reasons(out["rejected"]) == REJECTED
    assert reasons(out["skipped"]) == {"blank_line": 1, "no_category": 1}
    assert out["rows_read"] == 12 + 6
    (bad,) = [r for r in out["rejected"] if r.reason == "bad_encoding"]
    assert bad.raw == "8::\\xff\\xfe::5::978300000" and bad.source.endswith("ratings.dat")


def test_read_ml1m_min_rating_skips_low_ratings():
    out = run_source(SourceConfig(name="ml1m", input=RATINGS, min_rating=3))
    assert sorted(out["interactions"]) == sorted(i for i in ACCEPTED if i.user_id not in ("2", "9"))
    assert reasons(out["skipped"]) == {"blank_line": 1, "no_category": 1, "below_min_rating": 2}
