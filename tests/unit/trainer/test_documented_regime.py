"""The README's knob table is the regime ``dnc train`` uses with no flags.

Every row of the table whose cells name values (one value, or ``V for a/b, W for c``) is
parsed and compared with ``trainer.config.regime`` for every variant and both presets, so
the documentation cannot drift from the defaults (or the defaults from the documentation).
"""

import fnmatch
import json
import os
import re

import pytest

from trainer import knobs
from trainer.config import PRESETS, VARIANTS, TrainConfig, make_train_config
from trainer.sizing import (
    LARGE_DATA_INTERACTIONS,
    LARGE_DATA_LEARNING_RATE,
    LARGE_DATA_LR_DECAY,
    LARGE_DATA_PATIENCE,
    SMALL_DATA_DIM,
    SMALL_DATA_INTERACTIONS,
    SPARSE_DIM,
    SPARSE_DROPOUT,
    SPARSE_MEAN_LENGTH,
    SPARSE_PATIENCE,
)

README = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, os.pardir, "README.md")
# Rows whose cells are words rather than values ("none (one pass)", "shared").
WORDED = {"steps_per_epoch", "share_item_embeddings"}


def _table_rows():
    """(knob, {preset: cell}) for each row of the ``dnc train`` knob table."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index("| knob | `default` regime | `paper` regime |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("| `--"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        flag = re.match(r"`(--[a-z-]+)", cells[0]).group(1)
        knob = next(k for k in knobs.knobs() if flag in k.flags)
        rows.append((knob, dict(zip(PRESETS, cells[1:], strict=True))))
    return rows


def _parse(knob, text):
    text = text.strip("`")
    if knob.kind == "bool":
        return {"True": True, "False": False}[text]
    return knob.parse(text)


def _documented(knob, cell):
    """variant -> documented value of one cell."""
    parts = re.findall(r"`?([^`,]+?)`? for ((?:`[^`]+`/?)+)", cell)
    if not parts:
        value = _parse(knob, cell)
        return {v: value for v in VARIANTS}
    out = {}
    for value, names in parts:
        for pattern in re.findall(r"`([^`]+)`", names):
            for variant in fnmatch.filter(VARIANTS, pattern):
                out[variant] = _parse(knob, value)
    return out


ROWS = [row for row in _table_rows() if row[0].name not in WORDED]


def test_the_table_covers_every_knob():
    documented = {k.name for k, _ in _table_rows()}
    assert documented == {k.name for k in knobs.knobs()}


@pytest.mark.parametrize("knob,cells", ROWS, ids=[k.name for k, _ in ROWS])
def test_no_flags_gives_the_documented_value(knob, cells):
    for preset, cell in cells.items():
        documented = _documented(knob, cell)
        assert set(documented) == set(VARIANTS), (knob.name, preset, cell)
        for variant, value in documented.items():
            config = make_train_config("d", "o", variant, preset)
            got = getattr(config.model if knob.model else config, knob.name)
            assert got == value, (knob.name, preset, variant)


def test_dnc_default_regime_is_the_in_cluster_softmax_with_the_implied_intent():
    config = make_train_config("d", "o", "dnc")
    assert (config.loss, config.softmax_scope, config.intent_encoder) == (
        "softmax",
        "auto",
        "implied",
    )
    assert config.training == "all-positions" and config.model.prompt_position == "output"
    assert make_train_config("d", "o", "sasrec").loss == "sampled-softmax"


def _data(tmp_path, interactions, users=1):
    stats = {"interactions": interactions, "users": users}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    return str(tmp_path)


def test_dnc_embeddings_are_narrower_on_small_data(tmp_path):
    small = _data(tmp_path, SMALL_DATA_INTERACTIONS - 1)
    assert make_train_config(small, "o", "dnc").model.embedding_dim == SMALL_DATA_DIM
    assert make_train_config("d", "o", "dnc").model.embedding_dim == 100  # no stats: the regime
    explicit = make_train_config(small, "o", "dnc", model_overrides={"embedding_dim": 64})
    assert explicit.model.embedding_dim == 64
    assert make_train_config(small, "o", "dnc", "paper").model.embedding_dim == 50
    assert make_train_config(small, "o", "sasrec").model.embedding_dim == 50


def test_dnc_embeddings_keep_the_regime_on_larger_data(tmp_path):
    large = _data(tmp_path, SMALL_DATA_INTERACTIONS)
    config = make_train_config(large, "o", "dnc")
    assert config.model.embedding_dim == 100
    assert (config.learning_rate, config.lr_decay) == (1e-3, 1.0)


def test_dnc_and_the_sasrec_variants_learn_faster_with_a_decay_on_large_data(tmp_path):
    large = _data(tmp_path, LARGE_DATA_INTERACTIONS)
    for variant, width in (("dnc", 100), ("sasrec", 50), ("sasrec-mixed", 50)):
        config = make_train_config(large, "o", variant)
        assert config.learning_rate == LARGE_DATA_LEARNING_RATE
        assert config.lr_decay == LARGE_DATA_LR_DECAY < 1.0
        assert config.patience == LARGE_DATA_PATIENCE < TrainConfig.patience
        assert config.model.embedding_dim == width  # the large-data rule keeps the width
    explicit = make_train_config(large, "o", "dnc", learning_rate=5e-4)
    assert (explicit.learning_rate, explicit.lr_decay) == (5e-4, LARGE_DATA_LR_DECAY)
    assert make_train_config(large, "o", "dnc", lr_decay=1.0).lr_decay == 1.0
    assert make_train_config(large, "o", "dnc", patience=5).patience == 5
    for other in (
        make_train_config(large, "o", "mind"),
        make_train_config(large, "o", "dnc", "paper"),
        make_train_config(large, "o", "sasrec", "paper"),
    ):
        assert (other.learning_rate, other.lr_decay) == (1e-3, 1.0)
        assert other.patience == TrainConfig.patience


def test_sparse_data_gets_more_dropout_and_narrower_embeddings(tmp_path):
    users = 10_000  # 200K interactions at the threshold: neither small nor large data
    sparse = _data(tmp_path / "sparse", SPARSE_MEAN_LENGTH * users - 1, users)
    for variant in ("dnc", "sasrec", "sasrec-mixed"):
        config = make_train_config(sparse, "o", variant)
        assert (config.model.dropout, config.model.embedding_dim) == (SPARSE_DROPOUT, SPARSE_DIM)
        assert config.patience == SPARSE_PATIENCE > TrainConfig.patience
    assert make_train_config(sparse, "o", "dnc", patience=2).patience == 2
    explicit = make_train_config(sparse, "o", "dnc", model_overrides={"dropout": 0.1})
    assert (explicit.model.dropout, explicit.model.embedding_dim) == (0.1, SPARSE_DIM)
    dense = _data(tmp_path / "dense", SPARSE_MEAN_LENGTH * users, users)
    for config in (
        make_train_config(sparse, "o", "dnc", "paper"),
        make_train_config(sparse, "o", "mind"),
        make_train_config(sparse, "o", "sasrec-mixed", "paper"),
        make_train_config(dense, "o", "dnc"),
        make_train_config(dense, "o", "sasrec"),
    ):
        assert config.model.dropout == 0.2
        assert config.patience == TrainConfig.patience
    assert make_train_config(dense, "o", "dnc").model.embedding_dim == 100


def test_large_sparse_data_keeps_the_large_data_patience(tmp_path):
    users = LARGE_DATA_INTERACTIONS // SPARSE_MEAN_LENGTH + 1  # below 20 a user, yet large
    large_sparse = _data(tmp_path, LARGE_DATA_INTERACTIONS, users)
    config = make_train_config(large_sparse, "o", "dnc")
    assert config.model.dropout == SPARSE_DROPOUT
    assert config.patience == LARGE_DATA_PATIENCE


def test_stats_without_a_user_count_is_an_error(tmp_path):
    (tmp_path / "stats.json").write_text(json.dumps({"interactions": 3}))
    with pytest.raises(ValueError, match="users"):
        make_train_config(str(tmp_path), "o", "dnc")


def test_stats_without_an_interaction_count_is_an_error(tmp_path):
    (tmp_path / "stats.json").write_text(json.dumps({"users": 3}))
    with pytest.raises(ValueError, match="interactions"):
        make_train_config(str(tmp_path), "o", "dnc")


def test_the_readme_states_the_data_sized_rules():
    with open(README, encoding="utf-8") as f:
        text = " ".join(f.read().split())  # line breaks of the Markdown are spaces
    assert f"{SMALL_DATA_DIM} wide when the preprocessing output" in text
    assert f"fewer than {SMALL_DATA_INTERACTIONS:,} interactions" in text
    assert f"from {LARGE_DATA_INTERACTIONS:,} interactions on" in text
    assert f"starts at {LARGE_DATA_LEARNING_RATE:g}" in text
    assert f"`--lr-decay {LARGE_DATA_LR_DECAY:g}`" in text
    assert f"`--patience {LARGE_DATA_PATIENCE}`" in text
    assert f"fewer than {SPARSE_MEAN_LENGTH} interactions on average" in text
    sparse = f"the dropout is {SPARSE_DROPOUT:g} instead of 0.2 and the embeddings are {SPARSE_DIM}"
    assert sparse in text
    assert f"early stopping waits {SPARSE_PATIENCE} epochs instead of 3" in text
