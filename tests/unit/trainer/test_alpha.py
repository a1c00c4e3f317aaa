"""The merge's alpha: one check behind the CLI, the evaluation, the merges and the export."""

import argparse
import math

import numpy as np
import pytest

from trainer import merge_selection, quotas, score_merge
from trainer.alpha import alpha_from_json, alpha_label, alpha_to_json, check_alpha
from trainer.cli import parse_alpha

BAD = [-1.0, float("nan"), "x", None]


@pytest.mark.parametrize("value, want", [(0, 0.0), (1.5, 1.5), ("inf", math.inf), ("2", 2.0)])
def test_valid_alphas(value, want):
    assert check_alpha(value) == want
    assert parse_alpha(str(value)) == want
    assert alpha_from_json(alpha_to_json(want)) == want
    assert alpha_label(want) == ("inf" if math.isinf(want) else f"{want:g}")


@pytest.mark.parametrize("value", BAD)
def test_every_caller_rejects_the_same_values_with_one_message(value):
    message = "alpha must be a number >= 0 or inf"
    with pytest.raises(ValueError, match=message):
        check_alpha(value)
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_alpha(str(value))
    if value is None or isinstance(value, str):
        return
    p = np.full((1, 2), 0.5)
    with pytest.raises(ValueError, match=message):
        quotas.compute_quotas(p, 2, value, np.ones((1, 2), np.int64))
    with pytest.raises(ValueError, match=message):
        score_merge.joint_scores(np.zeros((1, 2, 1)), np.zeros((1, 2)), p, value)
    with pytest.raises(ValueError, match=message):
        merge_selection.selection_grids("score", value)
