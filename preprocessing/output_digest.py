"""A runner-independent digest of what ``dnc preprocess`` writes.

Two runs of the same preprocessing on different Beam runners (the DirectRunner, the
portable runner, Flink, Dataflow) must write the same data, but not the same bytes
in the same places: which shard a record lands in, the order of quarantined rows
and the run's own timing are the runner's choice. ``output_digest`` reduces an
output directory to what must agree, with every record set hashed as a multiset so
that the digest of a 20M-interaction output stays small::

    assert output_digest(direct_dir) == output_digest(portable_dir)
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Dict, Iterable, List, Tuple

import tensorflow as tf

from preprocessing import features

# Facts of a run, not of its result: they differ between any two runs.
RUN_STATS = ("elapsed_seconds", "interactions_per_second")


def _read(path: str, mode: str = "r"):
    with open(path, mode) as f:
        return f.read()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def multiset_digest(items: Iterable[bytes]) -> Dict[str, object]:
    """Count and order-independent SHA-256 of a multiset of byte strings."""
    digests: List[bytes] = sorted(hashlib.sha256(item).digest() for item in items)
    return {"count": len(digests), "sha256": _sha256(b"".join(digests))}


def split_records(output: str, split: str) -> Tuple[List[str], tf.data.TFRecordDataset]:
    """The shard files of one split of a preprocessing output and their records."""
    files = sorted(tf.io.gfile.glob(os.path.join(output, features.records_pattern(split))))
    return files, tf.data.TFRecordDataset(files, compression_type="GZIP")


def _records(output: str, split: str) -> Dict[str, object]:
    """A split's serialized examples over all its shards, as a multiset."""
    files, dataset = split_records(output, split)
    return {"shards": len(files), **multiset_digest(r.numpy() for r in dataset)}


def _quarantine(output: str) -> Dict[str, object]:
    lines: List[bytes] = []
    for path in glob.glob(os.path.join(output, features.QUARANTINE_DIR, "*.jsonl")):
        lines.extend(_read(path, "rb").splitlines())
    return multiset_digest(lines)


def output_digest(output: str) -> Dict[str, object]:
    """What two runners must agree on in one ``dnc preprocess`` output directory.

    Args:
        output: a published ``dnc preprocess`` output directory.

    Returns:
        JSON-serialisable: ``stats`` (without the run's timing), ``items`` and
        ``clusters`` (hashes of the files), ``quarantine`` (the quarantined rows as a
        multiset), ``assets`` (hash of each TFT vocabulary asset), ``schema`` (hash of
        the transformed schema) and ``records/SPLIT`` (shard count and the split's
        serialized examples as a multiset).

    Raises:
        ValueError: ``output`` holds no ``stats.json`` (not a preprocessing output).
    """
    stats_path = os.path.join(output, features.STATS_FILE)
    if not os.path.isfile(stats_path):
        raise ValueError(f"{output!r} is not a dnc preprocess output: no {features.STATS_FILE}")
    stats = json.loads(_read(stats_path))
    for key in RUN_STATS:
        stats.pop(key, None)
    transform = os.path.join(output, features.TRANSFORM_DIR)
    assets = {
        os.path.relpath(p, transform): _sha256(_read(p, "rb"))
        for p in sorted(glob.glob(os.path.join(transform, "transform_fn", "assets", "*")))
    }
    schema = os.path.join(transform, "transformed_metadata", "schema.pbtxt")
    return {
        "stats": stats,
        "items": _sha256(_read(os.path.join(output, features.ITEMS_FILE), "rb")),
        "clusters": _sha256(_read(os.path.join(output, features.CLUSTERS_FILE), "rb")),
        "quarantine": _quarantine(output),
        "assets": assets,
        "schema": _sha256(_read(schema, "rb")),
        **{f"records/{split}": _records(output, split) for split in features.SPLITS},
    }
