"""bench/serving.py: the merge it exports is the one ``dnc export`` would build."""

import pytest

from bench.serving import export_merge, parse_args
from bench.serving_report import merge_sentence


def test_the_paper_quota_merge_is_the_default():
    args = parse_args([])
    assert export_merge(args) == {"merge": "quota", "prompt_weight": 1.0, "global_index": False}
    assert "quota merge" in merge_sentence(vars(args))


def test_the_score_merge_at_weight_zero_searches_one_global_index():
    args = parse_args(["--merge", "score", "--prompt-weight", "0"])
    assert export_merge(args) == {"merge": "score", "prompt_weight": 0.0, "global_index": True}
    assert "one global index" in merge_sentence(vars(args))
    weighted = export_merge(parse_args(["--merge", "score", "--prompt-weight", "0.25"]))
    assert weighted["global_index"] is False


@pytest.mark.parametrize(
    "argv",
    [["--prompt-weight", "0"], ["--merge", "score", "--prompt-weight", "1.5"]],
)
def test_a_prompt_weight_that_cannot_apply_is_refused(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_reports_from_before_the_merge_option_read_as_quota():
    assert "quota merge" in merge_sentence({})
