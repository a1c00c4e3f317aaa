"""``dnc export``'s index plans: each cluster's index searches ``leaves_fraction`` of its
leaves, the one index over all items ``global_leaves_fraction`` of its own."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from serving.export import ExportConfig, _plans
from serving.index_kinds import GLOBAL_LEAVES_FRACTION, LEAVES_FRACTION

# 1M items in 4 clusters of 250K, as a catalogue at issue 14's scale.
ITEMS = SimpleNamespace(
    item_cluster=np.concatenate([[-1], np.repeat(np.arange(4), 250_000)]),
    num_clusters=4,
    num_items=1_000_000,
)


def _config(**kw):
    return ExportConfig(model_dir="m", data_dir="d", output="o", **kw)


def test_cluster_and_global_plans_search_their_own_share_of_the_leaves():
    config = _config(leaves_fraction=0.3, global_leaves_fraction=0.04)
    k = config.max_num_results + config.max_history + config.max_exclude
    for plan in _plans(ITEMS, True, config):
        assert plan["size"] == 250_000 and plan["k"] == k
        assert plan["num_leaves"] == 500 and plan["num_leaves_to_search"] == 150
    (plan,) = _plans(ITEMS, False, config)
    assert plan["size"] == 1_000_000 and plan["num_leaves"] == 1000
    assert plan["num_leaves_to_search"] == 40


def test_the_defaults_search_fewer_leaves_of_the_global_tree():
    config = _config()
    assert (config.leaves_fraction, config.global_leaves_fraction) == (
        LEAVES_FRACTION,
        GLOBAL_LEAVES_FRACTION,
    )
    (plan,) = _plans(ITEMS, False, config)
    assert plan["num_leaves_to_search"] == math.ceil(GLOBAL_LEAVES_FRACTION * 1000)
    assert plan["num_leaves_to_search"] < _plans(ITEMS, True, config)[0]["num_leaves_to_search"]


@pytest.mark.parametrize("name", ["leaves_fraction", "global_leaves_fraction"])
@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_fractions_outside_zero_one_are_rejected(name, value):
    with pytest.raises(ValueError, match=f"{name} must be in"):
        _config(**{name: value})
