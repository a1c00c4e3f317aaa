"""Runs the preprocessing pipeline and publishes its output directory atomically.

Everything is written to a staging directory beside ``--output``; only after the
Beam run succeeded and the outputs were checked is it renamed into place, so a
reader never sees a half-written output directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any, Dict, List

import apache_beam as beam
import tensorflow_transform as tft

from preprocessing import beam_pipeline, errors, features, fileio
from preprocessing.config import PreprocessConfig
from preprocessing.sources import check_input

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreprocessResult:
    """What a finished preprocessing run produced.

    Attributes:
        output: the published output directory.
        stats: the content of ``stats.json``.
    """

    output: str
    stats: Dict[str, Any]


def run_preprocess(config: PreprocessConfig) -> PreprocessResult:
    """Runs the Beam pipeline for ``config`` and publishes ``config.output``.

    Raises:
        InputError: the input is missing or empty (nothing is written).
        EmptyDataError: no usable data is left after validation, the min-count
            filters or the split (nothing is written).
        OutputError: the output cannot be written (checked before the pipeline
            runs; also raised for a write or publish failure during the run).
        IncompleteOutputError: the runner wrote fewer records than there are users
            (nothing is published).
    """
    check_input(config.source)
    output = fileio.check_output_parent(config.output)
    staging = fileio.staging_path(output)
    fileio.check_output_dir(staging)
    start = time.monotonic()
    log.info("preprocessing %s -> %s (staging %s)", config.source.name, output, staging)
    try:
        with fileio.output_errors(output, staging):
            try:
                with beam.Pipeline(options=beam_pipeline.pipeline_options(config)) as p:
                    beam_pipeline.build_pipeline(p, config, staging)
            except Exception as error:
                empty = errors.find_empty_data_error(error)
                if empty is not None:
                    raise empty from None
                raise
            stats = _finalize(staging, config, time.monotonic() - start)
            fileio.publish_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PreprocessResult(output=output, stats=stats)


def _finalize(staging: str, config: PreprocessConfig, elapsed: float) -> Dict[str, Any]:
    shutil.rmtree(os.path.join(staging, "tmp"), ignore_errors=True)
    part = os.path.join(staging, beam_pipeline.STATS_PART)
    with open(part, encoding="utf-8") as f:
        stats = json.load(f)
    os.remove(part)
    items = write_items_table(staging)
    if len(items) != stats["items"]:
        raise RuntimeError(
            f"items.tsv has {len(items)} items but the pipeline counted {stats['items']}"
        )
    check_records(staging, stats["users"])
    stats.update(
        source=config.source.name,
        input=config.source.input,
        elapsed_seconds=round(elapsed, 2),
        interactions_per_second=round(stats["interactions_read"] / max(elapsed, 1e-9), 1),
    )
    with open(os.path.join(staging, features.STATS_FILE), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
        f.write("\n")
    return stats


def count_records(output_dir: str, split: str) -> int:
    """Records of one split over all its shards (read back from the written files)."""
    import tensorflow as tf

    from preprocessing.output_digest import split_records

    _, dataset = split_records(output_dir, split)
    return int(dataset.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


def check_records(output_dir: str, users: int) -> Dict[str, int]:
    """Every split holds one record per kept user, read back from the files.

    The pipeline's counts and its record writes are separate branches of the graph,
    so a runner that loses elements on one of them (Beam 2.59's portable runner did
    at 20M interactions) would otherwise publish a short output whose statistics
    look complete.

    Returns:
        Records per split.

    Raises:
        IncompleteOutputError: a split holds a different number of records.
    """
    counts = {split: count_records(output_dir, split) for split in features.SPLITS}
    short = {split: n for split, n in counts.items() if n != users}
    if short:
        found = ", ".join(f"{split} {n:,}" for split, n in short.items())
        raise errors.IncompleteOutputError(
            f"the runner wrote {found} records for {users:,} users (one record per user "
            "and split expected); the output was not published"
        )
    return counts


def write_items_table(output_dir: str) -> List[List[str]]:
    """Writes ``items.tsv`` from the TFT item vocabulary; returns its rows.

    The rows are read back from the transform graph's own asset, so the table
    and the serving-time mapping cannot disagree.
    """
    tf_transform_output = tft.TFTransformOutput(os.path.join(output_dir, features.TRANSFORM_DIR))
    vocab = tf_transform_output.vocabulary_file_by_name(features.ITEM_CLUSTER_VOCAB)
    rows = []
    with open(vocab, encoding="utf-8") as f:
        for index, line in enumerate(f):
            item_id, cluster = line.rstrip("\n").split(features.VOCAB_DELIMITER)
            rows.append([item_id, str(index), cluster])
    with open(os.path.join(output_dir, features.ITEMS_FILE), "w", encoding="utf-8") as f:
        f.write("\t".join(features.ITEMS_HEADER) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")
    return rows


def format_summary(result: PreprocessResult) -> str:
    """A short human summary of a run."""
    s = result.stats
    lines = [
        f"preprocessed {s['source']} in {s['elapsed_seconds']:.1f}s -> {result.output}",
        f"  rows read {s['rows_read']:,}: accepted {s['accepted_rows']:,} "
        f"({s['interactions_read']:,} interactions)  skipped {s['skipped_rows']:,}  "
        f"rejected {s['rejected_rows']:,}",
        f"  users {s['users']:,}  items {s['items']:,}  interactions {s['interactions']:,}  "
        f"(users too short to split: {s['users_too_short']:,})",
        f"  filter {s['filter']['mode']}: {s['filter']['rounds']} rounds, "
        f"stable={s['filter']['stable']}",
        f"  {s['clusters']} clusters ({s['clustering']}):",
    ]
    for name, size in zip(s["cluster_names"], s["cluster_sizes"], strict=True):
        lines.append(f"    {name:>12s}  {size:,} items")
    if s["rejected_rows"]:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["rejected_by_reason"].items()))
        lines.append(f"  quarantined rows: {reasons} (see {features.QUARANTINE_DIR}/)")
    return "\n".join(lines)
