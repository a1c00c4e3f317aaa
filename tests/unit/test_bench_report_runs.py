"""bench/report_runs.py: an earlier report's rows kept, relabelled and replaced in place."""

import pytest

from bench.report_runs import merge_runs


def test_included_rows_keep_their_order_and_a_fresh_run_replaces_its_row_in_place():
    included = {"a": {"v": 1}, "b": {"v": 2}, "c": {"v": 3}}
    merged = merge_runs(included, ["b=>b, retuned"], {"b, retuned": {"v": 20}, "d": {"v": 4}})
    assert list(merged) == ["a", "b, retuned", "c", "d"]
    assert [r["v"] for r in merged.values()] == [1, 20, 3, 4]
    assert included["b"] == {"v": 2}  # the earlier report is not changed


def test_a_label_with_equals_signs_renames_and_a_bad_rename_names_the_problem():
    merged = merge_runs({"x, d=50": {}}, ["x, d=50=>x, d=100"], {})
    assert list(merged) == ["x, d=100"]
    with pytest.raises(ValueError, match="OLD=>NEW"):
        merge_runs({"x": {}}, ["x=y"], {})
    with pytest.raises(ValueError, match="no included run named 'z'"):
        merge_runs({"x": {}}, ["z=>y"], {})
