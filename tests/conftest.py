"""Shared pytest fixtures. Importing dnc_env first selects tf-keras for every test."""

import os

import pytest

import dnc_env  # noqa: F401

SHARED_DATA = os.path.abspath(
    os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "shared", "data")
)


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test with a message when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    return SHARED_DATA
