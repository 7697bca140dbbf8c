"""Loading streams: building a model from an N-byte checkpoint raises peak memory by about N, not 2N."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from herd.checkpoint import Checkpoint, expected_shapes, save_checkpoint
from herd.model.config import ModelConfig

# ~118 MB of float32 weights: large enough that a second copy would stand out over allocator noise.
CONFIG = ModelConfig(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=16384, ffn_hidden_dim=1536)

MEASURE = textwrap.dedent("""
    import re, sys
    import torch
    from herd.checkpoint import build_model, load_checkpoint

    def peak_rss():
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    def current_rss():
        return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    build_model(load_checkpoint(sys.argv[2]))  # a tiny warm-up: imports and first-use allocations
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
    before = current_rss()
    model = build_model(load_checkpoint(sys.argv[1], dtype=torch.float32))
    total = sum(float(p.sum()) for p in model.parameters())  # touch every weight: mapped pages count once read
    print(peak_rss() - before, sum(p.numel() * p.element_size() for p in model.parameters()))
""")


def write(state, config, path, fmt, kw):
    return save_checkpoint(Checkpoint(config, state), path, fmt, **kw)


@pytest.mark.parametrize("fmt, kw", [("hf", {}), ("gguf", {"gguf_type": "Q8_0"}), ("meta", {})])
def test_peak_memory_stays_near_the_model_size(tmp_path, fmt, kw):
    generator = torch.Generator().manual_seed(0)
    name = "m.gguf" if fmt == "gguf" else fmt
    tiny = CONFIG.replace(n_layers=1, vocab_size=64)
    warm = write({k: torch.randn(s, generator=generator) for k, s in expected_shapes(tiny).items()}, tiny,
                 tmp_path / "warm" / name, fmt, kw)
    out = write({k: torch.randn(s, generator=generator) for k, s in expected_shapes(CONFIG).items()}, CONFIG,
                tmp_path / name, fmt, kw)
    result = subprocess.run([sys.executable, "-c", MEASURE, str(out), str(warm)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    growth, model_bytes = map(int, result.stdout.split())
    assert model_bytes > 100e6
    assert growth < 1.3 * model_bytes, f"peak grew by {growth / 1e6:.0f} MB for a {model_bytes / 1e6:.0f} MB model"
