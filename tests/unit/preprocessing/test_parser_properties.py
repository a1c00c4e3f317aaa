"""Hostile input for every source parser: property tests, then real Beam runs.

Property, per raw row of every parser (ml1m ratings and movies, KuaiRand logs
and item table, sequence lines and item2attributes entries, CSV lines, Parquet
records): parsing never raises; the row has exactly one outcome (accepted,
quarantined with a documented reason, or skipped by a documented policy); a
quarantine row is bounded in size and serializes to UTF-8 JSON; accepted
records hold valid ids, int64 timestamps and printable categories. Hence
accepted + quarantined + skipped = rows read for any file. Rows: random bytes,
random text in UTF-8/UTF-16/latin-1, valid rows truncated, with another
separator, with NUL, CR, BOM, bad UTF-8, unicode, huge fields inserted, blank
lines.

The Beam runs read hostile files with the real readers and check the same
accounting in ``stats.json`` and the quarantine (a full ``dnc preprocess``) or
in the source outputs (``read_source``), against the pure parsers applied to
the file's lines as Beam splits them.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import random
import tempfile
from collections import Counter
from typing import Callable, Dict, FrozenSet, List, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from preprocessing import features
from preprocessing.config import SourceConfig
from preprocessing.records import (
    MAX_RAW_CHARS,
    MAX_SHOWN_CHARS,
    Interaction,
    ItemCategory,
    Rejected,
    Skipped,
    valid_id,
)
from preprocessing.sources import kuairand, ml1m, sequences, tabular
from preprocessing.sources.common import (
    INT64_MAX,
    INT64_MIN,
    InputError,
    check_input,
    row_outcome,
)
from tests.unit.preprocessing.test_sources_common import run_source

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "fixtures")
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KUAIRAND_COLUMNS = {name: i for i, name in enumerate(kuairand.LOG_HEADER)}
ITEM_COLUMNS = {name: i for i, name in enumerate(kuairand.ITEM_HEADER)}
CSV_BAD = frozenset({"bad_encoding", "bad_csv", "wrong_field_count", "empty_id", "invalid_id"})


class Parser:
    """A row parser with its documented rejection and skip reasons."""

    def __init__(
        self,
        parse: Callable,
        rejected: FrozenSet[str],
        skipped: FrozenSet[str],
        valid: Sequence[bytes],
        separator: bytes,
    ) -> None:
        self.parse = parse
        self.rejected = rejected
        self.skipped = skipped
        self.valid = valid
        self.separator = separator


def _kuairand_row(user: str, video: str, time_ms: str, click: str = "1", tab: str = "1") -> bytes:
    values = dict.fromkeys(kuairand.LOG_HEADER, "0")
    values.update(user_id=user, video_id=video, time_ms=time_ms, is_click=click, tab=tab)
    return ",".join(values[name] for name in kuairand.LOG_HEADER).encode()


def _video_row(video: str, tag: str) -> bytes:
    values = dict.fromkeys(kuairand.ITEM_HEADER, "0")
    values.update(video_id=video, tag=tag)
    return ",".join(values[name] for name in kuairand.ITEM_HEADER).encode()


PARSERS: Dict[str, Parser] = {
    "ml1m_ratings": Parser(
        functools.partial(ml1m.parse_rating_line, min_rating=3.0),
        frozenset(
            {
                "bad_encoding",
                "wrong_field_count",
                "empty_id",
                "invalid_id",
                "bad_rating",
                "non_integer_timestamp",
            }
        ),
        frozenset({"blank_line", "below_min_rating"}),
        [b"1::1193::5::978300760", b"u9::m7::2.5::-5"],
        b"::",
    ),
    "ml1m_movies": Parser(
        ml1m.parse_movie_line,
        frozenset({"wrong_field_count", "empty_id", "invalid_id", "invalid_category"}),
        frozenset({"blank_line", "no_category"}),
        [b"1::Toy Story (1995)::Animation|Children's|Comedy", b"7::Sabrina::"],
        b"::",
    ),
    "kuairand_logs": Parser(
        functools.partial(kuairand.parse_log_line, columns=KUAIRAND_COLUMNS),
        CSV_BAD | {"non_integer_timestamp", "bad_value"},
        frozenset({"blank_line", "other_tab", "not_clicked"}),
        [_kuairand_row("0", "42", "1649400000000"), _kuairand_row("1", "7", "5", "0", "2")],
        b",",
    ),
    "kuairand_items": Parser(
        functools.partial(kuairand.parse_video_line, columns=ITEM_COLUMNS),
        CSV_BAD | {"invalid_category"},
        frozenset({"blank_line", "no_category"}),
        [_video_row("42", "39"), _video_row("43", '"20,43"'), _video_row("44", "nan")],
        b",",
    ),
    "sequences": Parser(
        sequences.parse_sequence_line,
        frozenset({"bad_encoding", "empty_id", "invalid_id", "no_items"}),
        frozenset({"blank_line"}),
        [b"u1 i1 i2 i3", b"A2 B00 B01"],
        b" ",
    ),
    "csv": Parser(
        tabular.parse_csv_line,
        CSV_BAD | {"non_integer_timestamp", "invalid_category"},
        frozenset({"blank_line"}),
        [b"u1,i1,17", b'u2,i2,-3,"Skin Care"', b"u3,i3,0,"],
        b",",
    ),
}
ATTRIBUTE_REJECTED = frozenset(
    {"bad_encoding", "bad_json", "bad_value", "empty_id", "invalid_id", "duplicate_id"}
)
PARQUET_REJECTED = frozenset(
    {
        "bad_encoding",
        "wrong_field_count",
        "empty_id",
        "invalid_id",
        "non_integer_timestamp",
        "invalid_category",
    }
)

# --------------------------------------------------------------------------- strategies

INSERTS = [
    b"\x00",
    b"\r",
    b"\t",
    b"\xff",
    b"\xc3",
    b"\xef\xbb\xbf",
    "\u00e9\u4e2d\U0001f600\u200b\u2028".encode(),
    b'"',
    b"::",
    b",",
    b" ",
    b"\\",
    b"-",
    b"9" * 5000,
    b"9" * 30,
    b"x" * 200_000,
    b"1e999",
    b"nan",
    "\u0663".encode(),
]


@st.composite
def mutated(draw, valid: Sequence[bytes], separator: bytes) -> bytes:
    """A valid row damaged a few times: truncated, separator swapped, bytes inserted."""
    line = draw(st.sampled_from(list(valid)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "separator", "insert", "drop_field", "repeat"]))
        if kind == "truncate":
            line = line[: draw(st.integers(0, len(line)))]
        elif kind == "separator":
            other = draw(st.sampled_from([b",", b";", b"\t", b"|", b" ", b"::", b":", b""]))
            line = line.replace(separator, other) if separator else line
        elif kind == "insert":
            at = draw(st.integers(0, len(line)))
            line = line[:at] + draw(st.sampled_from(INSERTS)) + line[at:]
        elif kind == "drop_field":
            fields = line.split(separator)
            del fields[draw(st.integers(0, len(fields) - 1))]
            line = separator.join(fields)
        else:
            line = line + separator + line
    return line


def hostile_rows(valid: Sequence[bytes], separator: bytes):
    """Raw rows (bytes, no line break): random, encoded text, mutated valid rows, blanks."""
    return st.one_of(
        st.binary(max_size=200),
        st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.text(max_size=40).map(lambda t: t.encode("utf-16", "surrogatepass")),
        st.text(st.characters(max_codepoint=255), max_size=60).map(lambda t: t.encode("latin-1")),
        st.sampled_from([b"", b" ", b"\t", b"\r", b"\x0c", b"\xef\xbb\xbf", b"\x00"]),
        mutated(valid, separator),
        st.sampled_from(list(valid)),
    ).map(lambda row: row.replace(b"\n", b""))  # one line: Beam splits at \n


# --------------------------------------------------------------------------- the property


def check_row(results: List, rejected: FrozenSet[str], skipped: FrozenSet[str]) -> str:
    """Asserts the per-row contract; returns the outcome."""
    outcome = row_outcome(results)
    for result in results:
        if isinstance(result, Rejected):
            assert result.reason in rejected, result
            assert result.detail and len(result.detail) <= 3 * MAX_SHOWN_CHARS + 200, result
            assert len(result.raw) <= MAX_RAW_CHARS + len("...[truncated]")
            json.dumps(result._asdict(), ensure_ascii=False).encode("utf-8")  # the quarantine
        elif isinstance(result, Skipped):
            assert result.reason in skipped, result
        elif isinstance(result, Interaction):
            assert valid_id(result.user_id) and valid_id(result.item_id), result
            assert isinstance(result.timestamp, int)
            assert INT64_MIN <= result.timestamp <= INT64_MAX
            assert result.category is None or (result.category and result.category.isprintable())
        elif isinstance(result, ItemCategory):
            assert valid_id(result.item_id) and result.category.isprintable(), result
            assert result.category.strip() == result.category != ""
        else:
            assert isinstance(result, sequences.ItemAttributes), result
    return outcome


def outcomes(parser: Parser, rows: Sequence[bytes]) -> Counter:
    """Outcome counts of ``rows`` (each checked against the contract)."""
    return Counter(
        check_row(parser.parse("f", row), parser.rejected, parser.skipped) for row in rows
    )


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_row_has_one_documented_outcome(name):
    parser = PARSERS[name]

    @PROPERTY
    @given(st.lists(hostile_rows(parser.valid, parser.separator), max_size=8))
    def check(rows):
        counts = outcomes(parser, rows)
        assert sum(counts.values()) == len(rows)  # accepted + quarantined + skipped

    check()


def test_valid_rows_are_accepted():
    for name, parser in PARSERS.items():
        counts = outcomes(parser, parser.valid)
        assert counts["accepted"] + counts["skipped"] == len(parser.valid), name
        assert counts["accepted"] >= 1, name


@pytest.mark.parametrize(
    "row,reason",
    [
        (b"1::2::5::" + b"9" * 5000, "non_integer_timestamp"),  # int() limit: crashed before
        (b"1::2::\xd9\xa3::5", "bad_rating"),  # Arabic-Indic three: float() accepted it
        (b"1::2::1_0::5", "bad_rating"),  # float() accepted "1_0" as 10
        (b"1::2::5::" + b"1" * 20, "non_integer_timestamp"),  # out of int64, 20 digits
    ],
)
def test_ml1m_regressions(row, reason):
    (result,) = ml1m.parse_rating_line("f", row)
    assert isinstance(result, Rejected) and result.reason == reason
    assert len(result.detail) < 300


def test_bom_is_not_part_of_the_first_id():
    assert ml1m.parse_rating_line("f", b"\xef\xbb\xbf1::2::5::7") == [Interaction("1", "2", 7)]


def test_categories_with_control_characters_are_quarantined():
    (row,) = tabular.parse_csv_line("f", b'u,i,1,"a\rb"')
    assert (type(row), row.reason) == (Rejected, "invalid_category")
    (movie,) = ml1m.parse_movie_line("f", b"1::T::Dra\x85ma|Comedy")
    assert movie.reason == "invalid_category"
    (video,) = kuairand.parse_video_line("f", _video_row("1", '"x\x00y"'), ITEM_COLUMNS)
    assert video.reason == "invalid_category"


# ------------------------------------------------------------------- item2attributes JSON


def attribute_entries(raw: bytes) -> List:
    """The raw rows of an item2attributes file, as ``load_attribute_entries`` yields them."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "x_item2attributes.json")
        with open(path, "wb") as f:
            f.write(raw)
        return [entry for _, entry in sequences.load_attribute_entries(path)]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)


@PROPERTY
@given(
    st.one_of(
        st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6).map(
            lambda d: json.dumps(d).encode()
        ),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=100),
        st.sampled_from(
            [b'{"1": ["a"], "1": ["b"]}', b"[" * 100_000, b'{"1": ' * 50_000, b"\xff{}"]
        ),
    )
)
def test_every_attribute_entry_has_one_documented_outcome(raw):
    entries = attribute_entries(raw)
    if not entries:  # only an empty object has no row
        assert json.loads(raw) == {}
    for entry in entries:
        check_row(sequences.parse_attribute_entry("f", entry), ATTRIBUTE_REJECTED, {"no_category"})


def test_repeated_json_keys_are_quarantined_not_lost():
    entries = attribute_entries(b'{"1": ["a"], "2": ["c"], "1": ["b"]}')
    results = [sequences.parse_attribute_entry("f", e)[0] for e in entries]
    assert results[:2] == [
        sequences.ItemAttributes("1", ("a",)),
        sequences.ItemAttributes("2", ("c",)),
    ]
    assert results[2].reason == "duplicate_id"


def test_deeply_nested_json_is_one_bad_json_row():
    (entry,) = attribute_entries(b"[" * 100_000)
    (result,) = sequences.parse_attribute_entry("f", entry)
    assert (result.reason, result.detail) == ("bad_json", "nested too deeply")


# ------------------------------------------------------------------------ Parquet records

PARQUET_VALUES = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.datetimes(),
)


@PROPERTY
@given(
    st.fixed_dictionaries(
        {"user_id": PARQUET_VALUES, "item_id": PARQUET_VALUES, "timestamp": PARQUET_VALUES},
        optional={"category": PARQUET_VALUES},
    )
)
def test_every_parquet_record_has_one_documented_outcome(record):
    check_row(tabular.parse_parquet_record("f", record), PARQUET_REJECTED, frozenset())


# --------------------------------------------------------------------------- Beam runs

CURATED = [
    b"",
    b"   ",
    b"\r",
    b"\x00\x00\x00",
    b"\xef\xbb\xbf",
    b"\xff\xfe\x00\x00",
    b"1::2",
    b"1::2::3::4::5",
    b"1,2,3,4",
    b"1;2;3;4",
    b"1\t2\t3\t4",
    b"u 1::2::3::4",
    b"1::2::3::" + b"9" * 5000,
    b"1::" + b"x" * 300_000 + b"::3::4",
    "\u00e9\u4e2d::\U0001f600::4::5".encode(),
    "1::2::3::4".encode("utf-16"),
    b'"1","2","3","4"',
    b"1::2::\xd9\xa3::4",
    b"1::2::3::4\r",
]


def beam_lines(data: bytes) -> List[bytes]:
    """The lines Beam's text reader yields: split at ``\\n``, a ``\\r`` right before it dropped."""
    lines = data.split(b"\n")
    last = lines.pop()  # after the final line break: b"" or a last unterminated line
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    return lines + ([last] if last else [])


def hostile_file(valid: Sequence[bytes], seed: int, extra: Sequence[bytes] = ()) -> bytes:
    """Valid lines interleaved with curated hostile lines and seeded random bytes."""
    rng = random.Random(seed)
    noise = [bytes(rng.randrange(256) for _ in range(rng.randrange(60))) for _ in range(30)]
    hostile = [row.replace(b"\n", b"") for row in [*CURATED, *extra, *noise]]
    lines = list(valid)
    for row in hostile:
        lines.insert(rng.randrange(len(lines) + 1), row)
    return b"\n".join(lines) + b"\n"


def expected(parse: Callable, data: bytes, source: str = "f") -> Tuple[Counter, Counter, int]:
    """(rejected reasons, skipped reasons, accepted rows) of the pure parser over the file."""
    rejected, skipped, accepted = Counter(), Counter(), 0
    for line in beam_lines(data):
        results = parse(source, line)
        outcome = row_outcome(results)
        if outcome == "rejected":
            rejected[results[0].reason] += 1
        elif outcome == "skipped":
            skipped[results[0].reason] += 1
        else:
            accepted += 1
    return rejected, skipped, accepted


def test_hostile_ml1m_preprocess_accounts_for_every_row(tmp_path):
    source = tmp_path / "ml1m"
    source.mkdir()
    with open(os.path.join(FIXTURES, "ml1m", "ratings.dat"), "rb") as f:
        ratings = hostile_file(f.read().splitlines(), seed=1)
    with open(os.path.join(FIXTURES, "ml1m", "movies.dat"), "rb") as f:
        movies = hostile_file(f.read().splitlines(), seed=2, extra=[b"9::T::Dr\x85ama"])
    (source / "ratings.dat").write_bytes(ratings)
    (source / "movies.dat").write_bytes(movies)
    out = str(tmp_path / "out")
    args = ["--log-level=WARNING", "preprocess", "--source=ml1m", f"--input={source}"]
    assert main([*args, f"--output={out}", "--num-clusters=3"]) == 0

    with open(os.path.join(out, features.STATS_FILE)) as f:
        stats = json.load(f)
    rejected_r, skipped_r, accepted_r = expected(ml1m.parse_rating_line, ratings)
    rejected_m, skipped_m, accepted_m = expected(ml1m.parse_movie_line, movies)
    rows = len(beam_lines(ratings)) + len(beam_lines(movies))
    assert stats["rows_read"] == rows
    assert stats["accepted_rows"] == accepted_r + accepted_m
    assert stats["interactions_read"] == accepted_r
    assert stats["item_table_rows"] == accepted_m
    assert stats["rejected_by_reason"] == dict(rejected_r + rejected_m)
    assert stats["skipped_by_reason"] == dict(skipped_r + skipped_m)
    assert stats["accepted_rows"] + stats["rejected_rows"] + stats["skipped_rows"] == rows
    quarantined = []
    quarantine = os.path.join(out, features.QUARANTINE_DIR)
    for name in os.listdir(quarantine):
        with open(os.path.join(quarantine, name), encoding="utf-8") as f:
            quarantined += [json.loads(line) for line in f]
    assert Counter(r["reason"] for r in quarantined) == rejected_r + rejected_m
    assert all(len(r["raw"]) <= MAX_RAW_CHARS + len("...[truncated]") for r in quarantined)


def _check_source(results: Dict, expectations: Sequence[Tuple[Counter, Counter, int]]) -> None:
    rejected = sum((e[0] for e in expectations), Counter())
    skipped = sum((e[1] for e in expectations), Counter())
    accepted = sum(e[2] for e in expectations)
    assert Counter(r.reason for r in results["rejected"]) == rejected
    assert Counter(r.reason for r in results["skipped"]) == skipped
    assert results["accepted_rows"] == [accepted]
    assert results["rows_read"] == accepted + sum(rejected.values()) + sum(skipped.values())


def test_hostile_kuairand_files_through_beam(tmp_path):
    header = ",".join(kuairand.LOG_HEADER).encode()
    logs = hostile_file([_kuairand_row(str(u), str(u % 7), str(u)) for u in range(20)], seed=3)
    items = hostile_file([_video_row(str(i), str(i % 3)) for i in range(7)], seed=4)
    (tmp_path / "log_standard_pure.csv").write_bytes(header + b"\n" + logs)
    item_header = ",".join(kuairand.ITEM_HEADER).encode()
    (tmp_path / "video_features_basic_pure.csv").write_bytes(item_header + b"\n" + items)
    results = run_source(SourceConfig(name="kuairand", input=str(tmp_path)))
    parse_logs = PARSERS["kuairand_logs"].parse
    parse_items = PARSERS["kuairand_items"].parse
    _check_source(results, [expected(parse_logs, logs), expected(parse_items, items)])


def test_hostile_sequence_file_and_attributes_through_beam(tmp_path):
    lines = hostile_file([b"u%d i1 i2 i%d" % (u, u) for u in range(20)], seed=5)
    (tmp_path / "Beauty.txt").write_bytes(lines)
    attributes = b'{"i1": ["a", 3], "i2": [], "i1": ["b"], "": ["x"], "i3": [true], "i4": {}}'
    (tmp_path / "Beauty_item2attributes.json").write_bytes(attributes)
    results = run_source(SourceConfig(name="sequences", input=str(tmp_path / "Beauty.txt")))
    entry_results = [
        row_outcome(r) if row_outcome(r) == "accepted" else r[0].reason
        for r in (sequences.parse_attribute_entry("f", e) for e in attribute_entries(attributes))
    ]
    assert entry_results == [
        "accepted",
        "no_category",
        "duplicate_id",
        "empty_id",
        "bad_value",
        "bad_value",
    ]
    json_expectation = (
        Counter(["duplicate_id", "empty_id", "bad_value", "bad_value"]),
        Counter(["no_category"]),
        1,
    )
    _check_source(results, [expected(sequences.parse_sequence_line, lines), json_expectation])


def test_hostile_csv_gzip_and_parquet_through_beam(tmp_path):
    plain = hostile_file([b"u%d,i%d,%d,c" % (u, u % 5, u) for u in range(20)], seed=6)
    (tmp_path / "a.csv").write_bytes(b"user_id,item_id,timestamp,category\n" + plain)
    zipped = hostile_file([b"v%d,i%d,%d" % (u, u % 5, u) for u in range(10)], seed=7)
    (tmp_path / "b.csv.gz").write_bytes(gzip.compress(zipped))
    table = pa.table(
        {
            "user_id": ["p1", "p2", "", None, "p\x005", "p6", "p7", "p 8"],
            "item_id": ["i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8"],
            "timestamp": ["1", "2", "3", "4", "5", "9" * 30, "x", "8"],
            "category": ["c", "a\nb", None, "", "c", "c", "c", "c"],
        }
    )
    pq.write_table(table, str(tmp_path / "c.parquet"))
    results = run_source(SourceConfig(name="csv", input=str(tmp_path)))
    records = Counter(
        row_outcome(r) if row_outcome(r) == "accepted" else r[0].reason
        for r in (tabular.parse_parquet_record("f", record) for record in table.to_pylist())
    )
    assert records == Counter(
        accepted=1, invalid_category=1, empty_id=2, invalid_id=2, non_integer_timestamp=2
    )
    accepted = records.pop("accepted")
    parse = tabular.parse_csv_line
    _check_source(
        results, [expected(parse, plain), expected(parse, zipped), (records, Counter(), accepted)]
    )


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("a.csv.gz", b"not gzip at all", "unreadable file"),
        ("a.csv.gz", gzip.compress(b"u,i,1\n", mtime=0)[:5], "truncated gzip"),
        ("a.csv.gz", gzip.compress(b"u,i,1\n" * 1000, mtime=0)[:-9], "truncated gzip"),
        ("a.parquet", b"PAR1 garbage PAR1", "not a readable Parquet file"),
    ],
    ids=["not-gzip", "gzip-header-only", "gzip-cut-short", "bad-parquet"],
)
def test_unreadable_or_truncated_file_is_an_input_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message) as caught:
        check_input(SourceConfig(name="csv", input=str(tmp_path)))
    assert str(tmp_path / name) in str(caught.value)


def test_multi_member_gzip_is_complete(tmp_path):
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(b"u1,i1,1\n") + gzip.compress(b"u2,i2,2\n"))
    check_input(SourceConfig(name="csv", input=str(tmp_path)))  # no InputError
