"""Fixtures for the checkpoint tests (helpers live in ckpt_helpers, a name no other test directory uses)."""
from __future__ import annotations

import pytest
from ckpt_helpers import hf_model


@pytest.fixture
def make_hf(tmp_path):
    """Write a tiny random LlamaForCausalLM with save_pretrained; returns (model, directory)."""
    count = 0

    def make(max_shard_size="5GB", **kw):
        nonlocal count
        count += 1
        model = hf_model(**kw)
        directory = tmp_path / f"hf{count}"
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        return model, directory

    return make
