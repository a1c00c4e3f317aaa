"""`dnc preprocess` end to end on small real Beam runs."""

import csv
import json
import os

import pytest
import tensorflow as tf
import tensorflow_transform as tft

from pipeline.cli import main
from preprocessing import features

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures")
ML1M = os.path.join(FIXTURES, "ml1m")


def _items_table(out):
    with open(os.path.join(out, features.ITEMS_FILE), encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        assert tuple(next(reader)) == features.ITEMS_HEADER
        return [(item, int(index), int(cluster)) for item, index, cluster in reader]


def _records(out, split):
    """Parsed records of one split, keyed by raw user id, items mapped back to raw ids."""
    output = tft.TFTransformOutput(os.path.join(out, features.TRANSFORM_DIR))
    spec = output.transformed_feature_spec()
    index_to_item = {index: item for item, index, _ in _items_table(out)}
    with open(output.vocabulary_file_by_name(features.USER_VOCAB), encoding="utf-8") as f:
        users = [line.rstrip("\n") for line in f]
    pattern = os.path.join(out, features.records_pattern(split))
    result = {}
    for serialized in tf.data.TFRecordDataset(tf.io.gfile.glob(pattern), compression_type="GZIP"):
        ex = tf.io.parse_single_example(serialized, spec)
        items = tf.sparse.to_dense(ex[features.ITEM_INDICES]).numpy().tolist()
        clusters = tf.sparse.to_dense(ex[features.CLUSTER_INDICES]).numpy().tolist()
        user = users[int(ex[features.USER_INDEX])]
        result[user] = ([index_to_item[i] for i in items], clusters)
    return result


def _reference_sequences(path):
    """An independent reading of ratings.dat: valid rows, sorted by (time, item id)."""
    by_user = {}
    with open(path, "rb") as f:
        for raw in f:
            try:
                user, item, _, ts = raw.decode("utf-8").strip().split("::")
                ts = int(ts)
            except ValueError:
                continue
            if user and item:
                by_user.setdefault(user, []).append((ts, item))
    return {u: [i for _, i in sorted(events)] for u, events in by_user.items()}


@pytest.fixture(scope="module")
def ml1m_output(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ml1m") / "out")
    code = main(
        [
            "--log-level=WARNING",
            "preprocess",
            "--source=ml1m",
            f"--input={ML1M}",
            f"--output={out}",
            "--clustering=kmeans",
            "--num-clusters=10",
        ]
    )
    assert code == 0
    return out


def test_ml1m_every_item_has_exactly_one_of_k_clusters(ml1m_output):
    rows = _items_table(ml1m_output)
    item_ids = [item for item, _, _ in rows]
    assert len(item_ids) == len(set(item_ids)) == 40
    assert sorted(index for _, index, _ in rows) == list(range(40))
    assert {cluster for _, _, cluster in rows} == set(range(10))
    with open(os.path.join(ml1m_output, features.STATS_FILE)) as f:
        stats = json.load(f)
    assert stats["clusters"] == 10 and stats["items"] == 40
    assert sum(stats["cluster_sizes"]) == 40
    with open(os.path.join(ml1m_output, features.CLUSTERS_FILE)) as f:
        clusters = json.load(f)
    assert sum(c["size"] for c in clusters["clusters"]) == 40


def test_ml1m_splits_follow_the_protocol_by_hand(ml1m_output):
    train = _records(ml1m_output, features.TRAIN)
    validation = _records(ml1m_output, features.VALIDATION)
    test = _records(ml1m_output, features.TEST)
    # User 1 rated 5 @100, 3 and 12 @760 (tie: "12" < "3"), 20 @900, 8 @1000.
    assert train["1"][0] == ["5", "12", "3"]
    assert validation["1"][0] == ["5", "12", "3", "20"]
    assert test["1"][0] == ["5", "12", "3", "20", "8"]
    # User 2: 10 @100, 11 @200, 9 @300 -> one training item.
    assert (train["2"][0], validation["2"][0][-1], test["2"][0][-1]) == (["10"], "11", "9")
    # User 3 has two ratings: too short to split, dropped.
    assert "3" not in train and "3" not in test


def test_ml1m_records_match_an_independent_reading(ml1m_output):
    reference = _reference_sequences(os.path.join(ML1M, "ratings.dat"))
    test = _records(ml1m_output, features.TEST)
    validation = _records(ml1m_output, features.VALIDATION)
    train = _records(ml1m_output, features.TRAIN)
    kept = {u: s for u, s in reference.items() if len(s) >= 3}
    assert set(test) == set(validation) == set(train) == set(kept)
    cluster_of = {item: cluster for item, _, cluster in _items_table(ml1m_output)}
    for user, seq in kept.items():
        assert test[user][0] == seq
        assert validation[user][0] == seq[:-1]
        assert train[user][0] == seq[:-2]
        assert test[user][1] == [cluster_of[i] for i in seq]


def test_ml1m_stats_and_quarantine(ml1m_output):
    with open(os.path.join(ml1m_output, features.STATS_FILE)) as f:
        stats = json.load(f)
    for key in ("users", "items", "interactions", "clusters", "rejected_rows"):
        assert key in stats
    assert stats["rejected_rows"] == 4
    assert stats["rejected_by_reason"] == {
        "bad_encoding": 1,
        "empty_id": 1,
        "non_integer_timestamp": 1,
        "wrong_field_count": 1,
    }
    # Every raw row is accounted for: 244 rating lines + 40 movie lines.
    assert stats["rows_read"] == 284
    assert stats["rows_read"] == (
        stats["interactions_read"] + stats["item_table_rows"] + 4 + stats["skipped_rows"]
    )
    assert stats["users_too_short"] == 1
    assert stats["users"] == 29 and stats["interactions"] == 238
    quarantine = os.path.join(ml1m_output, features.QUARANTINE_DIR)
    rows = []
    for name in os.listdir(quarantine):
        with open(os.path.join(quarantine, name), encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    assert sorted(r["reason"] for r in rows) == sorted(stats["rejected_by_reason"])
    assert all(r["raw"] and r["detail"] and r["source"].endswith("ratings.dat") for r in rows)


def test_missing_input_exits_2_naming_the_path(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    code = main(["preprocess", "--source=ml1m", f"--input={missing}", f"--output={tmp_path}/o"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and missing in err[0]
    assert not os.path.exists(tmp_path / "o")


def test_empty_input_exits_2(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code = main(["preprocess", "--source=csv", f"--input={empty}", f"--output={tmp_path}/o"])
    assert code == 2
    assert str(empty) in capsys.readouterr().err


def _fingerprint(out):
    """Content of an output directory that must not depend on the runner."""
    with open(os.path.join(out, features.STATS_FILE)) as f:
        stats = json.load(f)
    for volatile in ("elapsed_seconds", "interactions_per_second"):
        stats.pop(volatile)
    records = {}
    for split in features.SPLITS:
        records[split] = sorted(
            r.numpy()
            for r in tf.data.TFRecordDataset(
                tf.io.gfile.glob(os.path.join(out, features.records_pattern(split))),
                compression_type="GZIP",
            )
        )
    with open(os.path.join(out, features.CLUSTERS_FILE)) as f:
        clusters = json.load(f)
    return stats, _items_table(out), clusters, records


def test_multi_processing_run_gives_the_same_outputs(tmp_path):
    common = [
        "--log-level=WARNING",
        "preprocess",
        "--source=synthetic",
        "--synthetic-users=300",
        "--synthetic-items=200",
        "--synthetic-categories=5",
        "--num-clusters=5",
    ]
    assert main(common + [f"--output={tmp_path}/inproc"]) == 0
    multi = [
        f"--output={tmp_path}/multi",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
    ]
    assert main(common + multi) == 0
    assert _fingerprint(f"{tmp_path}/inproc") == _fingerprint(f"{tmp_path}/multi")


def _reference_filter(sequences, min_item, min_user, rounds):
    """Independent k-core style filtering: items first, then users, ``rounds`` times."""
    import collections

    for _ in range(rounds):
        counts = collections.Counter(i for seq in sequences.values() for i in seq)
        sequences = {
            u: kept
            for u, seq in sequences.items()
            if len(kept := [i for i in seq if counts[i] >= min_item]) >= min_user
        }
    return sequences


@pytest.mark.parametrize("mode,rounds", [("once", 1), ("until_stable", 20)])
def test_min_count_filters_match_a_reference(tmp_path, mode, rounds):
    out = str(tmp_path / "out")
    args = ["--log-level=WARNING", "preprocess", "--source=ml1m", f"--input={ML1M}"]
    args += [f"--output={out}", "--num-clusters=3", "--min-item-interactions=5"]
    args += ["--min-user-interactions=5", f"--filter-mode={mode}"]
    assert main(args) == 0
    expected = _reference_filter(
        _reference_sequences(os.path.join(ML1M, "ratings.dat")), 5, 5, rounds
    )
    got = _records(out, features.TEST)
    assert {u: seq for u, (seq, _) in got.items()} == expected
    with open(os.path.join(out, features.STATS_FILE)) as f:
        stats = json.load(f)
    assert stats["filter"]["mode"] == mode and stats["filter"]["rounds"] == rounds
    if mode == "until_stable":
        assert stats["filter"]["stable"]
        assert expected == _reference_filter(expected, 5, 5, 1)  # a fixpoint


def test_a_split_short_of_records_is_an_incomplete_output(tiny_data, tmp_path):
    """``check_records`` reads the written files back: a record lost by the runner
    (Beam 2.59's portable runner lost a block of users at 20M interactions) is caught
    before publishing instead of leaving a short split behind complete statistics."""
    import glob
    import shutil

    from preprocessing.errors import IncompleteOutputError
    from preprocessing.run import check_records

    with open(os.path.join(tiny_data, features.STATS_FILE)) as f:
        users = json.load(f)["users"]
    assert check_records(tiny_data, users) == {split: users for split in features.SPLITS}
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_data, copy)
    (path,) = glob.glob(os.path.join(copy, features.records_pattern(features.VALIDATION)))
    kept = [r.numpy() for r in tf.data.TFRecordDataset(path, compression_type="GZIP")][1:]
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for record in kept:
            writer.write(record)
    with pytest.raises(IncompleteOutputError, match=f"validation {users - 1:,} records"):
        check_records(copy, users)
