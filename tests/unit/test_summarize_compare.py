"""The results table's gap in standard errors matches the spread of sampled test splits."""

import numpy as np
import pytest

from bench.summarize_compare import gap_in_standard_errors


def test_the_gap_is_in_units_of_the_sampled_spread():
    rng = np.random.default_rng(0)
    users, p, q = 1090, 0.11, 0.10
    # Recall on one test split: each user's held-out item is a hit or not.
    a = rng.binomial(users, p, 20_000) / users
    b = rng.binomial(users, q, 20_000) / users
    spread = np.std(a - b)
    z = gap_in_standard_errors(p, q, users)
    assert z == pytest.approx((p - q) / spread, rel=0.03)


def test_no_users_is_an_error():
    with pytest.raises(ValueError, match="users"):
        gap_in_standard_errors(0.1, 0.1, 0)
