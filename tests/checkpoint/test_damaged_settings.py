"""A checkpoint's settings, damaged, are one CheckpointError naming the file and the setting: rotary scaling's had
been a bare KeyError ('low_freq_factor'), a TypeError, or a model whose every logit was NaN; a tensor's dtype had
loaded integers as weights."""
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


def test_a_weight_stored_as_integers_is_refused(make_hf):
    """safetensors' header names each tensor's dtype: one changed to I32 had loaded, and the model answered."""
    _, hf = make_hf()
    path = hf / "model.safetensors"
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    name = "model.layers.0.mlp.up_proj.weight"
    header[name]["dtype"] = "I32"  # F32 and I32 have the same width: the file stays whole
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    path.write_bytes(bytes(data[:8]) + text + bytes(data[8 + size:]))
    with pytest.raises(CheckpointError, match=f"tensor {name} is stored as I32, not as floating point"):
        load_checkpoint(hf)
