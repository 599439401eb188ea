"""Shared fixtures: the tiny offline model zoo, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo root; parts are sub-folders named as in ``align.zoo.PARTS``."""
    from align.zoo import build_zoo

    root = tmp_path_factory.mktemp("zoo")
    build_zoo(root)
    return root
