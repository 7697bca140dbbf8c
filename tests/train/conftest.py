"""Byte-level token shards of real English text (Debian's fortunes), shared by the training tests."""
from pathlib import Path

import pytest
from train_helpers import fortunes, write_shards


@pytest.fixture(scope="session")
def byte_shards(tmp_path_factory) -> Path:
    texts = fortunes(600)
    assert len(texts) == 600  # the real text is installed (scripts/test-fixtures.sh)
    return write_shards(tmp_path_factory.mktemp("shards"), texts)
