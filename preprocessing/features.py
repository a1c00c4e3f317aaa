"""The one feature module: feature keys, vocabulary names, OOV settings and file names.

The preprocessing_fn, the trainer and the serving code import these constants;
no other module spells a feature key or vocabulary name as a string literal.
"""

from __future__ import annotations

# --- Raw features of one (user, split) record, fed to the TFT preprocessing_fn.
USER_ID = "user_id"  # tf.string scalar
ITEM_IDS = "item_ids"  # tf.string VarLen: the visible sequence, oldest first
ITEM_CLUSTERS = "item_clusters"  # tf.int64 VarLen: cluster id of each item (parallel)
TIMESTAMPS = "timestamps"  # tf.int64 VarLen (parallel to ITEM_IDS)
SPLIT = "split"  # tf.string scalar: one of SPLITS

# --- Transformed features written to TFRecords and read by the trainer.
USER_INDEX = "user_index"  # int64 scalar
ITEM_INDICES = "item_indices"  # int64 VarLen
CLUSTER_INDICES = "cluster_indices"  # int64 VarLen
SEQUENCE_LENGTH = "sequence_length"  # int64 scalar

# --- Splits (paper protocol: last = test, penultimate = validation, rest = train).
# Each split's record holds the sequence visible to that split: for train the
# training items; for validation the training items + the validation target
# (last element); for test everything up to and including the test target.
TRAIN = "train"
VALIDATION = "validation"
TEST = "test"
SPLITS = (TRAIN, VALIDATION, TEST)

# --- Vocabularies (TFT asset names).
USER_VOCAB = "user_vocab"
# One token per item, "item_id<TAB>cluster_id": the line number is the item
# index and the second column the cluster, so a single analyzer output carries
# both mappings and serving applies exactly the same ones.
ITEM_CLUSTER_VOCAB = "item_cluster_vocab"
CLUSTER_VOCAB = "cluster_vocab"
VOCAB_DELIMITER = "\t"

# --- Out-of-vocabulary handling. Unknown users/items map to OOV_INDEX (-1) and
# are masked by consumers; unknown items get cluster OOV_INDEX too.
OOV_INDEX = -1
PADDING_ITEM_ID = ""  # serving pads histories with the empty string

# --- Files in the preprocessing output directory.
STATS_FILE = "stats.json"
ITEMS_FILE = "items.tsv"
ITEMS_HEADER = ("item_id", "item_index", "cluster_id")
CLUSTERS_FILE = "clusters.json"
QUARANTINE_DIR = "quarantine"
TRANSFORM_DIR = "transform"  # tft.TFTransformOutput directory
RECORDS_DIR = "records"  # records/<split>-*.tfrecord.gz
RECORD_SUFFIX = ".tfrecord.gz"


def records_pattern(split: str) -> str:
    """Returns the glob, relative to the output directory, of one split's records."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return f"{RECORDS_DIR}/{split}-*{RECORD_SUFFIX}"
