"""The Evaluator scores the candidate and the pushed model the same way.

A model compared with its own pushed export must score exactly as the export does,
whichever way the pushed model is reached: its model directory (same data) or, when
it was trained on other data, its SavedModel. The old scoring queried the pushed
SavedModel with alpha 0 and 50 history items while the candidate got its
validation-selected merge and alpha through ``evaluate_model``: the same model then
scored differently against itself (checked below), which can bless a worse model or
refuse a better one.
"""

import json
import os
import shutil

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import EvaluatorSection
from pipeline.evaluator import evaluate_and_bless, exported_recall

M = 10
SECTION = EvaluatorSection(m=M, tolerance=0.0, alpha=float("inf"), merge="quota")
OPTIONS = {"index": "brute-force", "alpha": SECTION.alpha, "merge": SECTION.merge}


@pytest.fixture(scope="module")
def pushed(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fair")
    model_dir, base = str(root / "model"), str(root / "serving" / "dnc")
    train = ["train", f"--data={tiny_data}", f"--output={model_dir}", "--variant=dnc"]
    train += ["--epochs=2", "--steps-per-epoch=30", "--batch-size=32", "--max-len=10"]
    train += ["--dim=16", "--blocks=1", "--eval-users=30", f"--eval-m={M}"]
    assert main(["--log-level=WARNING"] + train) == 0
    from serving.export import export_model

    version_dir = export_model(model_dir, tiny_data, base, **OPTIONS)
    return {"model_dir": model_dir, "version_dir": version_dir, "root": root}


def _old_biased_recall(version_dir, data_dir, m):
    """The pushed model as the old Evaluator scored it: alpha 0, 50 history items."""
    import tensorflow as tf

    from preprocessing import features
    from serving.export import load_exported
    from trainer import data

    module = load_exported(version_dir)
    items = data.load_items(data_dir)
    held_out = data.evaluation_data(data_dir, features.VALIDATION, max_len=50)
    ids = np.concatenate([[features.PADDING_ITEM_ID], items.item_ids]).astype(object)
    out = module.signatures["retrieve"](
        history=tf.constant(ids[held_out.histories].astype(bytes)),
        alpha=tf.constant(0.0),
        num_results=tf.constant(m, tf.int32),
    )
    targets = ids[held_out.targets].astype(bytes)
    return float((out["item_ids"].numpy() == targets[:, None]).any(axis=1).mean())


def test_same_data_both_model_directories_score_alike(pushed, tiny_data):
    # The candidate is a copy of the pushed model (another directory, the same weights).
    candidate = os.path.join(pushed["root"], "candidate")
    shutil.copytree(pushed["model_dir"], candidate)
    report = evaluate_and_bless(
        tiny_data, {"dnc": candidate}, "best", pushed["version_dir"], SECTION, OPTIONS
    )
    baseline = report["baseline"]
    assert baseline["scored_by"] == "model_dir"
    assert baseline[f"recall@{M}"] == report["variants"]["dnc"][f"recall@{M}"]
    assert baseline["candidate"][f"recall@{M}"] == baseline[f"recall@{M}"]
    assert report["blessing"]["blessed"], report["blessing"]["reason"]


def test_other_data_both_saved_models_score_alike(pushed, tiny_data):
    # The pushed model "was trained on other data": only its SavedModel can answer.
    version_dir = os.path.join(pushed["root"], "elsewhere", "1")
    shutil.copytree(pushed["version_dir"], version_dir)
    from serving.export import METADATA_DIR, METADATA_FILE

    path = os.path.join(version_dir, METADATA_DIR, METADATA_FILE)
    with open(path) as f:
        meta = json.load(f)
    meta["data_fingerprint"] = "other data"
    with open(path, "w") as f:
        json.dump(meta, f)
    report = evaluate_and_bless(
        tiny_data, {"dnc": pushed["model_dir"]}, "dnc", version_dir, SECTION, OPTIONS
    )
    baseline = report["baseline"]
    assert baseline["scored_by"] == "saved_model"
    fair = baseline[f"recall@{M}"]
    assert baseline["candidate"][f"recall@{M}"] == fair  # the same model, scored alike
    assert fair == exported_recall(pushed["version_dir"], tiny_data, M)
    assert report["blessing"]["blessed"], report["blessing"]["reason"]
    # The old scoring gave the same model two different numbers.
    old_baseline = _old_biased_recall(version_dir, tiny_data, M)
    old_candidate = report["variants"]["dnc"][f"recall@{M}"]
    assert old_baseline != old_candidate
