"""A checkpoint's rotary scaling settings, damaged, are one CheckpointError naming the file and the setting: they had
been a bare KeyError ('low_freq_factor'), a TypeError, or a model whose every logit was NaN."""
from __future__ import annotations

import json

import pytest

from herd.checkpoint import CheckpointError, convert, load_checkpoint

SCALED = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize(("rope_scaling", "words"), [
    ({"rope_type": "llama3", "factor": -1}, "rope scaling lacks 'low_freq_factor'"),
    ("abc", "config.json's rope_scaling is a JSON str, not an object"),
    (SCALED | {"factor": -1}, "factor must be above 0, got -1.0"),
    (SCALED | {"high_freq_factor": 1.0}, "high_freq_factor (1.0) must exceed its low_freq_factor (1.0)"),
    (SCALED | {"original_max_position_embeddings": -1}, "original_max_position must be at least 1, got -1"),
])
def test_damaged_rope_scaling_in_config_json(make_hf, rope_scaling, words):
    _, hf = make_hf(rope=None)  # rope_parameters says "default": only rope_scaling asks for scaling
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config | {"rope_scaling": rope_scaling}))
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(hf)
    assert str(hf) in str(refused.value) and words in str(refused.value), refused.value


@pytest.mark.parametrize(("rope_scaling", "words"), [
    ("abc", "rope_scaling is a JSON str, not an object"),
    ({"high_freq_factor": 0.5}, "high_freq_factor (0.5) must exceed its low_freq_factor (1.0)"),
])
def test_damaged_rope_scaling_in_params_json(make_hf, tmp_path, rope_scaling, words):
    meta = convert(make_hf()[1], tmp_path / "meta", "meta")
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps(params | {"use_scaled_rope": True, "rope_scaling": rope_scaling}))
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(meta)
    assert "params.json" in str(refused.value) and words in str(refused.value), refused.value
