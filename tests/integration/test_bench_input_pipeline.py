"""bench/input_pipeline.py compares like with like: the pipeline before section 23 and the
one ``dnc train`` uses now give batches of the same kind over the same targets."""

import collections

import pytest

from bench.input_pipeline import _pipelines, markdown
from trainer import data, sequence_data
from trainer.config import make_train_config


@pytest.mark.parametrize("variant", ["dnc", "sasrec"])
def test_both_pipelines_yield_the_same_batches_and_targets(tiny_data, variant):
    config = make_train_config(tiny_data, "", variant, batch_size=1)
    split = data.load_train_split(tiny_data)
    sources = _pipelines(config, data.load_items(tiny_data), split)
    steps = sequence_data.count_training_windows(tiny_data, config.model.max_len)  # one epoch
    seen = {}
    for name, dataset in sources.items():
        batches = list(dataset.take(steps))
        first = batches[0]
        seen[name] = (
            {k: (tuple(v.shape), v.dtype) for k, v in first.items()},
            collections.Counter(
                t for b in batches for t in b[data.TARGET].numpy()[b[data.MASK].numpy() > 0]
            ),
        )
    (spec_old, targets_old), (spec_new, targets_new) = seen.values()
    assert spec_old == spec_new
    assert targets_old == targets_new  # one epoch each: every training target once
    assert sum(targets_new.values()) == data.count_training_samples(tiny_data)


def test_the_table_names_each_row_and_share():
    row = {
        "data": "runs/beauty",
        "variant": "dnc",
        "seconds_per_step": {"per-epoch cut": 0.2, "cut once": 0.16, "cached": 0.15},
        "seconds_per_batch_alone": {"per-epoch cut": 0.017, "cut once": 0.0003},
        "speedup_cut_once_over_per_epoch_cut": 1.25,
        "input_share_per_epoch_cut": 0.25,
        "input_share_cut_once": 0.062,
    }
    text = markdown(
        {
            "rows": [row],
            "settings": {"rounds": 5, "steps": 40},
            "machine": {"load_average_start": [1.0, 1.0, 1.0], "load_average_end": [2, 2, 2]},
        }
    )
    want = "| beauty | `dnc` | 0.2000 | 0.1600 | 0.1500 | 1.25x | 25% / 6% | 0.0170 / 0.0003 |"
    assert want in text
