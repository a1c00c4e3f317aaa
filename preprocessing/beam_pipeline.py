"""The preprocessing Beam pipeline: raw rows -> clustered, split, transformed records.

Graph (every step runs on any Beam runner; DirectRunner by default):

    source -> (quarantine, skipped counts)
           -> per-user events -> order (+ optional de-dup)
           -> min-count filter rounds (unrolled; ``until_stable`` or ``once``)
           -> leave-one-out split (short users counted and dropped)
           -> guard: ``EmptyDataError`` if nothing is left (before any clustering)
           -> clustering fit on train sequences only (one worker, a side input)
           -> raw records (one per user per split) -> TFT analyze (full
              sequences) + transform (all splits) -> TFRecords
           -> stats / clusters JSON parts

``staging`` receives everything; ``outputs.py`` finalises it into the output
directory. Counts travel as PCollections (not runner metrics) so they are exact
on every runner.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import apache_beam as beam
import tensorflow_transform.beam as tft_beam
from apache_beam.options.pipeline_options import PipelineOptions
from tensorflow_transform import coders as tft_coders

from preprocessing import clustering, features, sequences, transform
from preprocessing.config import PreprocessConfig
from preprocessing.errors import EmptyDataError
from preprocessing.sources import read_source

STATS_PART = "_stats_part.json"


def _count(pcoll: beam.PCollection, label: str) -> beam.PCollection:
    return pcoll | label >> beam.combiners.Count.Globally()


def _count_by(pcoll: beam.PCollection, key, label: str) -> beam.PCollection:
    return (
        pcoll
        | f"{label}Key" >> beam.Map(key)
        | f"{label}PerKey" >> beam.combiners.Count.PerElement()
        | f"{label}Dict" >> beam.combiners.ToDict()
    )


def compact_for_clustering(seq: sequences.SplitSequence) -> sequences.SplitSequence:
    """``seq`` as the single-worker clustering step holds it: the least memory.

    The timestamps are dropped (the clustering never reads them) and every item id
    is interned, so each distinct id is one string object however many sequences
    hold it. At 20M interactions this keeps about 2 GB out of the one list that
    collects every user's sequence.
    """
    return seq._replace(items=tuple(sys.intern(item) for item in seq.items), timestamps=())


class _CollectFn(beam.CombineFn):
    """Gathers small elements into one list sorted by a key (for single-worker steps).

    Args:
        sort_key: key of the output order.
        compact: applied to each element as it is added.
    """

    def __init__(self, sort_key=None, compact=None):
        self._sort_key = sort_key
        self._compact = compact

    def create_accumulator(self) -> list:
        return []

    def add_input(self, acc: list, element) -> list:
        acc.append(self._compact(element) if self._compact else element)
        return acc

    def merge_accumulators(self, accumulators) -> list:
        return [x for acc in accumulators for x in acc]

    def extract_output(self, acc: list) -> list:
        return sorted(acc, key=self._sort_key)


class _RowCategoriesFn(beam.CombineFn):
    """Item -> most common category carried on the interaction rows themselves."""

    def create_accumulator(self) -> Dict[str, collections.Counter]:
        return collections.defaultdict(collections.Counter)

    def add_input(self, acc, element):
        for _, item, category in element[1]:
            if category:
                acc[item][category] += 1
        return acc

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            for item, counter in acc.items():
                merged[item].update(counter)
        return merged

    def extract_output(self, acc) -> Dict[str, str]:
        # Most common category; ties go to the smallest name (deterministic).
        return {item: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for item, c in acc.items()}


def _item_categories(
    row_categories: Mapping[str, str], table_rows: Iterable[Tuple[str, str]]
) -> Dict[str, str]:
    """Item -> category: the item side table wins over categories on the rows."""
    return {**row_categories, **dict(table_rows)}


def _fit_clusters(
    split_users: List[sequences.SplitSequence],
    categories: Mapping[str, str],
    config: PreprocessConfig,
) -> clustering.ClusterAssignment:
    train = [seq.train for seq in split_users]
    train_items = {item for seq in train for item in seq}
    all_items = sorted({item for seq in split_users for item in seq.items})
    contexts: Dict[str, List[str]] = collections.defaultdict(list)
    for seq in split_users:
        for target in (seq.validation_target, seq.test_target):
            if target not in train_items:
                contexts[target].extend(seq.train[-config.clustering.window :])
    return clustering.fit_clusters(train, all_items, categories, contexts, config.clustering)


def _train_item_counts(split_users: List[sequences.SplitSequence]) -> Dict[str, int]:
    return dict(collections.Counter(item for seq in split_users for item in seq.train))


def _split_index(record: Mapping[str, Any], num_partitions: int) -> int:
    split = record[features.SPLIT]
    if isinstance(split, bytes):
        split = split.decode()
    return features.SPLITS.index(split)


def _rejected_json(row) -> str:
    return json.dumps(row._asdict(), ensure_ascii=False, sort_keys=True)


def check_not_empty(config: PreprocessConfig, counts: Mapping[str, Any]) -> int:
    """Raises ``EmptyDataError`` naming the cause if no user is left to split.

    Args:
        config: the run's settings (the filter settings are named in the message).
        counts: ``rows_read``, ``interactions_read``, ``rejected_rows``,
            ``skipped_by_reason``, ``users_before_filter``, ``items_before_filter``,
            ``users_after_filter`` and ``users`` (after the split).

    Returns:
        The number of users (> 0).
    """
    if counts["users"] > 0:
        return counts["users"]
    where = config.source.input or config.source.name
    if counts["interactions_read"] == 0:
        skipped = sum(counts["skipped_by_reason"].values())
        raise EmptyDataError(
            f"no valid interactions in {where}: {counts['rows_read']} rows read, "
            f"{counts['rejected_rows']} rejected, {skipped} skipped by policy "
            f"{dict(sorted(counts['skipped_by_reason'].items()))}"
        )
    settings = (
        f"min_item_interactions={config.min_item_interactions}, "
        f"min_user_interactions={config.min_user_interactions}, "
        f"filter_mode={config.filter_mode}"
    )
    if counts["users_after_filter"] == 0:
        raise EmptyDataError(
            f"no users left after the min-count filters ({settings}): "
            f"{counts['users_before_filter']} users and {counts['items_before_filter']} items "
            "before filtering; lower the minimum counts"
        )
    raise EmptyDataError(
        f"no user has the {sequences.MIN_SPLIT_LENGTH} interactions the leave-one-out split "
        f"needs: all {counts['users_after_filter']} users are too short ({settings})"
    )


def _filter_rounds(
    user_events: beam.PCollection, config: PreprocessConfig
) -> Tuple[beam.PCollection, int]:
    """Applies the min-count filters; returns the filtered users and the rounds added."""
    if config.min_item_interactions <= 1 and config.min_user_interactions <= 1:
        return user_events, 0
    rounds = 1 if config.filter_mode == "once" else config.max_filter_rounds
    for r in range(rounds):
        counts = user_events | f"ItemCounts{r}" >> beam.CombineGlobally(sequences.ItemCountsFn())
        user_events = user_events | f"Filter{r}" >> beam.FlatMap(
            sequences.filter_user,
            item_counts=beam.pvalue.AsSingleton(counts),
            min_item_interactions=config.min_item_interactions,
            min_user_interactions=config.min_user_interactions,
        )
    return user_events, rounds


def build_pipeline(p: beam.Pipeline, config: PreprocessConfig, staging: str) -> None:
    """Adds the whole preprocessing graph to ``p``, writing under ``staging``."""
    source = read_source(p, config.source)
    quarantine = os.path.join(staging, features.QUARANTINE_DIR, "rejected")
    _ = (
        source.rejected
        | "RejectedJson" >> beam.Map(_rejected_json)
        | "WriteQuarantine" >> beam.io.WriteToText(quarantine, file_name_suffix=".jsonl")
    )

    user_events = (
        source.interactions
        | "KeyByUser" >> beam.Map(lambda r: (r.user_id, (r.timestamp, r.item_id, r.category)))
        | "GroupByUser" >> beam.GroupByKey()
        | "Order"
        >> beam.MapTuple(
            lambda user, events: (user, sequences.order_events(events, config.dedup_consecutive))
        )
    )
    filtered, rounds = _filter_rounds(user_events, config)
    split = filtered | "Split" >> beam.FlatMap(sequences.split_user).with_outputs(
        "too_short", main="users"
    )
    users = split.users
    counts = _counts(source, user_events, filtered, users)
    # A side input of FitClusters, so an empty result fails here, before any clustering.
    guard = (
        p
        | "GuardSeed" >> beam.Create([None])
        | "CheckNotEmpty"
        >> beam.Map(
            lambda _, **kw: check_not_empty(config, kw),
            **{name: beam.pvalue.AsSingleton(counts[name]) for name in _GUARD_COUNTS},
        )
    )

    collected = users | "CollectUsers" >> beam.CombineGlobally(
        _CollectFn(sort_key=lambda s: s.user_id, compact=compact_for_clustering)
    )
    table_rows = source.item_categories | "CategoryPairs" >> beam.Map(tuple)
    categories = (
        filtered
        | "RowCategories" >> beam.CombineGlobally(_RowCategoriesFn())
        | "ItemCategories" >> beam.Map(_item_categories, table_rows=beam.pvalue.AsList(table_rows))
    )
    assignment = collected | "FitClusters" >> beam.Map(
        lambda split_users, categories, users_checked: _fit_clusters(
            split_users, categories, config
        ),
        categories=beam.pvalue.AsSingleton(categories),
        users_checked=beam.pvalue.AsSingleton(guard),
    )
    item_to_cluster = assignment | "ItemToCluster" >> beam.Map(lambda a: a.item_to_cluster)
    raw_records = users | "Records" >> beam.FlatMap(
        lambda seq, mapping: (r for _, r in sequences.split_records(seq, mapping)),
        mapping=beam.pvalue.AsSingleton(item_to_cluster),
    )

    with tft_beam.Context(temp_dir=os.path.join(staging, "tmp")):
        raw_metadata = transform.raw_metadata()
        full_sequences = raw_records | "TestRecords" >> beam.Filter(
            lambda r: r[features.SPLIT] == features.TEST
        )
        transform_fn = (full_sequences, raw_metadata) | "Analyze" >> tft_beam.AnalyzeDataset(
            transform.preprocessing_fn
        )
        transformed, transformed_metadata = (
            (raw_records, raw_metadata),
            transform_fn,
        ) | "Transform" >> tft_beam.TransformDataset()
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(
            os.path.join(staging, features.TRANSFORM_DIR)
        )
    coder = tft_coders.ExampleProtoCoder(transformed_metadata.schema)
    parts = transformed | "BySplit" >> beam.Partition(_split_index, len(features.SPLITS))
    for split_name, part in zip(features.SPLITS, parts, strict=True):
        prefix = os.path.join(staging, features.RECORDS_DIR, split_name)
        _ = part | f"Write{split_name}" >> beam.io.WriteToTFRecord(
            prefix,
            coder=coder,
            file_name_suffix=features.RECORD_SUFFIX,
            num_shards=config.num_shards,
        )

    train_counts = collected | "TrainItemCounts" >> beam.Map(_train_item_counts)
    _ = (
        assignment
        | "ClustersJson"
        >> beam.Map(
            lambda a, counts: json.dumps(a.to_json(counts), indent=2, sort_keys=True),
            counts=beam.pvalue.AsSingleton(train_counts),
        )
        | "WriteClusters"
        >> beam.io.WriteToText(
            os.path.join(staging, features.CLUSTERS_FILE), shard_name_template=""
        )
    )
    _write_stats(p, config, staging, counts, filtered, users, split.too_short, assignment, rounds)


_GUARD_COUNTS = (
    "rows_read",
    "interactions_read",
    "rejected_rows",
    "skipped_by_reason",
    "users_before_filter",
    "items_before_filter",
    "users_after_filter",
    "users",
)


def _counts(source, user_events, filtered, users) -> Dict[str, beam.PCollection]:
    """Single-element count PCollections shared by the guard and the stats."""
    return {
        "rows_read": source.rows_read,
        "accepted_rows": source.accepted_rows,
        "interactions_read": _count(source.interactions, "CountRead"),
        "item_table_rows": _count(source.item_categories, "CountItemRows"),
        "rejected_rows": _count(source.rejected, "CountRejected"),
        "rejected_by_reason": _count_by(source.rejected, lambda r: r.reason, "RejectReasons"),
        "skipped_by_reason": _count_by(source.skipped, lambda r: r.reason, "SkipReasons"),
        "users_before_filter": _count(user_events, "CountUsersBeforeFilter"),
        "items_before_filter": user_events
        | "ItemsBeforeFilter" >> beam.CombineGlobally(sequences.ItemCountsFn())
        | "CountItemsBeforeFilter" >> beam.Map(len),
        "users_after_filter": _count(filtered, "CountUsersAfterFilter"),
        "users": _count(users, "CountUsers"),
    }


def _write_stats(p, config, staging, counts, filtered, users, too_short, assignment, rounds):
    final_counts = filtered | "FinalItemCounts" >> beam.CombineGlobally(sequences.ItemCountsFn())
    min_length = (
        filtered
        | "UserLengths" >> beam.Map(lambda kv: len(kv[1]))
        | "MinLength" >> beam.CombineGlobally(lambda xs: min(xs, default=0))
    )
    stat_names = (
        "rows_read",
        "accepted_rows",
        "interactions_read",
        "item_table_rows",
        "rejected_rows",
        "rejected_by_reason",
        "skipped_by_reason",
        "users",
    )
    parts = {
        **{name: counts[name] for name in stat_names},
        "interactions": users
        | "Lengths" >> beam.Map(lambda s: len(s.items))
        | "SumLengths" >> beam.CombineGlobally(sum),
        "users_too_short": _count(too_short, "CountShort"),
        "final_item_counts": final_counts,
        "min_user_length": min_length,
        "assignment": assignment,
    }
    _ = (
        p
        | "StatsSeed" >> beam.Create([None])
        | "AssembleStats"
        >> beam.Map(
            lambda _, **kw: json.dumps(_assemble_stats(config, rounds, **kw), sort_keys=True),
            **{name: beam.pvalue.AsSingleton(pc) for name, pc in parts.items()},
        )
        | "WriteStats"
        >> beam.io.WriteToText(os.path.join(staging, STATS_PART), shard_name_template="")
    )


def _assemble_stats(config: PreprocessConfig, rounds: int, **kw) -> Dict[str, Any]:
    assignment = kw.pop("assignment")
    final_counts = kw.pop("final_item_counts")
    min_user_length = kw.pop("min_user_length")
    stable = sequences.filter_is_stable(
        final_counts,
        [min_user_length] if final_counts else [],
        config.min_item_interactions,
        config.min_user_interactions,
    )
    skipped = sum(kw["skipped_by_reason"].values())
    if kw["accepted_rows"] + kw["rejected_rows"] + skipped != kw["rows_read"]:
        raise RuntimeError(
            f"row accounting is broken: {kw['accepted_rows']} accepted + "
            f"{kw['rejected_rows']} rejected + {skipped} skipped != {kw['rows_read']} rows read"
        )
    sizes = collections.Counter(assignment.item_to_cluster.values())
    return {
        **kw,
        "items": len(assignment.item_to_cluster),
        "clusters": assignment.num_clusters,
        "cluster_sizes": [sizes.get(k, 0) for k in range(assignment.num_clusters)],
        "cluster_names": list(assignment.names),
        "clustering": config.clustering.method,
        "skipped_rows": skipped,
        "filter": {
            "mode": config.filter_mode,
            "min_item_interactions": config.min_item_interactions,
            "min_user_interactions": config.min_user_interactions,
            "rounds": rounds,
            "stable": stable,
        },
    }


def pipeline_options(config: PreprocessConfig) -> PipelineOptions:
    """Beam options from the pass-through arguments (DirectRunner unless told otherwise)."""
    return PipelineOptions(list(config.beam_args))
