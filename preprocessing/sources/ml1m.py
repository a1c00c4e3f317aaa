"""MovieLens-1M source (``--source ml1m``).

Input: a directory holding ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``,
UTF-8/ASCII) and, optionally, ``movies.dat`` (``MovieID::Title::Genres``, genres
``|``-separated, ISO-8859-1 encoded, so it is decoded as latin-1 and never fails
to decode). A path to ``ratings.dat`` itself is accepted too.

Rules:
    * every rating is an interaction (timestamp = the Unix time of the rating)
      unless ``SourceConfig.min_rating`` is set: ratings below it are
      ``Skipped`` with reason ``below_min_rating``;
    * the category of a movie is its FIRST genre (``Animation|Children's`` ->
      ``Animation``); a movie without genres is ``Skipped`` (``no_category``).

Rejection reasons: ``bad_encoding`` (ratings only), ``wrong_field_count``,
``empty_id``, ``invalid_id``, ``bad_rating``, ``non_integer_timestamp``,
``invalid_category`` (a genre with control characters). Blank lines are
``Skipped`` (``blank_line``). Both files are probed (first line read) before the
pipeline runs: an unreadable file raises ``InputError``.
"""

from __future__ import annotations

import functools
import posixpath
from typing import List, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from preprocessing.config import SourceConfig
from preprocessing.records import Interaction, ItemCategory, ParseResult, Skipped
from preprocessing.sources.common import (
    InputError,
    SourceOutputs,
    is_dir,
    match_files,
    merge_outputs,
    nonempty_files,
    parse_rows,
    read_first_line,
    read_lines,
    require_category,
    require_field_count,
    require_float,
    require_id,
    require_int,
    text_row_parser,
)

RATINGS, MOVIES = "ratings.dat", "movies.dat"
SEPARATOR = "::"


class Ml1mFiles(NamedTuple):
    """The files of an ML-1M input: ``ratings`` (required) and ``movies`` (or None)."""

    ratings: str
    movies: Optional[str]


def locate(input_path: str) -> Ml1mFiles:
    """Finds ``ratings.dat`` and the optional ``movies.dat`` of ``input_path``.

    Raises:
        InputError: the directory or ``ratings.dat`` is missing, or it is empty.
    """
    if posixpath.basename(input_path.rstrip("/")) == RATINGS and not is_dir(input_path):
        directory = posixpath.dirname(input_path.rstrip("/")) or "."
    elif is_dir(input_path):
        directory = input_path
    else:
        raise InputError(input_path, "ml1m input directory not found")
    ratings_path = FileSystems.join(directory, RATINGS)
    (ratings,) = nonempty_files(match_files(ratings_path), ratings_path, RATINGS)
    movies = [f.path for f in match_files(FileSystems.join(directory, MOVIES)) if f.size > 0]
    for path in [ratings, *movies]:
        read_first_line(path)  # InputError if unreadable
    return Ml1mFiles(ratings, movies[0] if movies else None)


@text_row_parser("utf-8")
def parse_rating_line(
    source: str, text: str, min_rating: Optional[float] = None
) -> List[ParseResult]:
    """Parses one raw ``ratings.dat`` line (bytes) into an ``Interaction``.

    Args:
        source: the file the line came from.
        text: the raw line (bytes; the decorator decodes it).
        min_rating: keep ratings ``>=`` this; others are ``Skipped``.

    Returns:
        One ``Interaction``, ``Skipped`` or ``Rejected``.
    """
    fields = text.split(SEPARATOR)
    require_field_count(fields, (4,), "UserID::MovieID::Rating::Timestamp")
    user_id = require_id(fields[0], "UserID")
    item_id = require_id(fields[1], "MovieID")
    rating = require_float(fields[2], "Rating", reason="bad_rating")
    timestamp = require_int(fields[3], "Timestamp", reason="non_integer_timestamp")
    if min_rating is not None and rating < min_rating:
        return [Skipped(source, "below_min_rating")]
    return [Interaction(user_id, item_id, timestamp)]


@text_row_parser("latin-1")
def parse_movie_line(source: str, text: str) -> List[ParseResult]:
    """Parses one raw ``movies.dat`` line (latin-1 bytes) into an ``ItemCategory``.

    The category is the first of the ``|``-separated genres.

    Returns:
        One ``ItemCategory``, ``Skipped`` (``no_category``) or ``Rejected``.
    """
    fields = text.split(SEPARATOR)
    require_field_count(fields, (3,), "MovieID::Title::Genres")
    item_id = require_id(fields[0], "MovieID")
    genre = require_category(fields[2].split("|")[0], "Genres")
    if not genre:
        return [Skipped(source, "no_category")]
    return [ItemCategory(item_id, genre)]


def read_ml1m(pipeline: beam.Pipeline, config: SourceConfig) -> SourceOutputs:
    """Adds the reading of an ML-1M directory to ``pipeline``.

    Raises:
        InputError: the input is missing or empty.
    """
    files = locate(config.input)
    parse_ratings = functools.partial(parse_rating_line, min_rating=config.min_rating)
    parts = [
        parse_rows(read_lines(pipeline, [files.ratings], "ml1m/Ratings"), parse_ratings, "ml1m")
    ]
    if files.movies:
        movies = read_lines(pipeline, [files.movies], "ml1m/Movies")
        parts.append(parse_rows(movies, parse_movie_line, "ml1m/movies"))
    return merge_outputs(pipeline, parts, "ml1m")
