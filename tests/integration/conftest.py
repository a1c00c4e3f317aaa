"""Small preprocessed data sets shared by the integration tests."""

import pytest

from pipeline.cli import main
from tests.integration.tiny_model import save_templates


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A preprocessed synthetic set: 300 users, 200 items, K=5 (about 10 s)."""
    out = str(tmp_path_factory.mktemp("tiny") / "data")
    code = main(
        [
            "--log-level=WARNING",
            "preprocess",
            "--source=synthetic",
            "--synthetic-users=300",
            "--synthetic-items=200",
            "--synthetic-categories=5",
            "--synthetic-mean-length=20",
            "--num-clusters=5",
            f"--output={out}",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="session")
def templates(tmp_path_factory):
    """Saved versions 1 and 2 of the tiny serving model (``tiny_model.TinyModel``)."""
    return save_templates(str(tmp_path_factory.mktemp("templates")))
