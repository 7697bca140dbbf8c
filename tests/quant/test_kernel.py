"""herd's compiled kernel against the same arithmetic in PyTorch, and both against the float32 matmul."""
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from herd.quant import kernel
from herd.quant.blocks import (MAX_INTEGER_TOKENS, BlockLinear, BlockWeight, integer_matmul, matmul, quantize_int4,
                               quantize_int8)
from herd.quant.gguf import block_weight


def test_the_kernel_is_built_where_the_cpu_can_run_it():
    # scripts/setup.sh builds it; without it decoding silently falls back to the slow PyTorch path.
    assert kernel.ops() is not None or not kernel._supported()


def _build_with(compiler: str, tmp_path, damaged: bool = False):
    """`python -m herd.quant.kernel` (as scripts/setup.sh runs it) or, in a cache holding a damaged library, the
    first use (kernel.ops()), with a compiler of the test's."""
    import subprocess
    import sys

    fake = tmp_path / "cxx"
    fake.write_text("#!/bin/sh\n" + compiler)
    fake.chmod(0o755)
    env = {**os.environ, "HERD_CACHE": str(tmp_path / "cache"), "CXX": str(fake)}
    if damaged:
        lib = subprocess.run([sys.executable, "-c", "from herd.quant import kernel; print(kernel.library_path())"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
        Path(lib).parent.mkdir(parents=True, exist_ok=True)
        Path(lib).write_bytes(b"junk")
    command = ["-c", "from herd.quant import kernel; print(kernel.ops() is not None)"] if damaged else \
        ["-m", "herd.quant.kernel"]
    return subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not kernel._supported(), reason="this CPU cannot run herd's kernel")
def test_a_failed_build_says_why_leaves_nothing_behind_and_lets_setup_go_on(tmp_path):
    # setup.sh runs under `set -e`: the traceback's exit 1 had stopped it before the safety packages were installed,
    # though the kernel is optional; the compiler's message was lost and its partial output left in the cache.
    done = _build_with('for a; do out=$a; done; echo partial > "$out"\n'
                       'echo "blockmm.cpp:1:10: fatal error: omp.h: No such file or directory" >&2\n'
                       'echo "compilation terminated." >&2; exit 1', tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "cxx failed: blockmm.cpp:1:10: fatal error: omp.h: No such file or directory" in done.stderr
    assert "the PyTorch path is used" in done.stderr
    assert [p.name for p in (tmp_path / "cache" / "kernels").iterdir()] == []


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
def test_a_damaged_library_in_the_cache_is_built_again(tmp_path):
    # It had been loaded, failed, and left the machine on the PyTorch path for good, process after process.
    built = kernel.library_path()
    done = _build_with(f'for a; do out=$a; done; cp {built} "$out"', tmp_path, damaged=True)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    (library,) = (tmp_path / "cache" / "kernels").iterdir()
    assert library.read_bytes() == built.read_bytes()


def weights(bits, group, n=96, k=256, seed=0):
    """bits 4 or 8: herd's int4 / int8 (float32 scales); "Q4_1" or "Q5_1": GGUF's blocks (float16 scales and mins,
    which the kernel's panels keep in two bytes; Q5_1's 5-bit codes held as int8)."""
    torch.manual_seed(seed)
    w = torch.randn(n, k) * torch.rand(n, 1)  # rows of different scales
    if bits in ("Q4_1", "Q5_1"):
        w = w + torch.rand(n, 1)  # off-centre rows: the mins matter
        return w, block_weight(bits, quants.quantize(w.numpy(), Q[bits]))
    return w, quantize_int4(w, group) if bits == 4 else quantize_int8(w, group if group < k else None)


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 16), (8, 32), (8, 256), ("Q4_1", 32),
                                        ("Q5_1", 32)])
@pytest.mark.parametrize("tokens", [1, 3, 5, MAX_INTEGER_TOKENS, 40])
def test_kernel_matches_pytorch(bits, group, tokens):
    _, w = weights(bits, group)
    x = torch.randn(tokens, 256) * 3
    exact = x @ w.dequantize().T
    scale = exact.abs().max()
    # equal up to the rounding of code * scale + min (the compiler fuses it into one multiply-add)
    assert torch.allclose(kernel.ops().dequantize(w), w.dequantize(), rtol=1e-6, atol=1e-6)
    if tokens <= MAX_INTEGER_TOKENS:
        assert (kernel.ops().matmul_rows(x, w, 0) - exact).abs().max() < 1e-5 * scale
    # The same int8 codes of the activations and integer sums: equal up to float32 summation order.
    for levels in (1, 2):
        assert (kernel.ops().matmul_rows(x, w, levels) - integer_matmul(x, w, levels)).abs().max() < 1e-5 * scale
    # Prompts' two levels: as good as float activations, a hundred times closer than one level.
    error = [((kernel.ops().matmul_rows(x, w, levels) - exact).norm() / exact.norm()).item() for levels in (1, 2)]
    assert error[1] < 1e-4 and error[1] < error[0] / 100, error


@pytest.mark.parametrize("bits", [4, 8])
def test_int8_activation_blocks_stay_close_to_float(bits):
    w_float, w = weights(bits, 32)
    x = torch.randn(2, 256)
    x[:, 0] = 100  # an outlier costs precision only to its own block of 32
    exact = x @ w.dequantize().T
    assert ((integer_matmul(x, w) - exact).norm() / exact.norm()) < 0.03


@pytest.mark.parametrize("group", [16, 32])
def test_worst_case_products_do_not_saturate(group):
    # Codes and activations all at the top of their ranges: 16-bit pair sums would clip if the signs were wrong.
    k = 64
    w8 = BlockWeight(torch.full((4, k), -127, dtype=torch.int8), torch.ones(4, k // group), None, 8, group)
    x = torch.full((12, k), -5.0)  # one token and a tile's worth
    assert torch.allclose(integer_matmul(x, w8), x @ w8.dequantize().T)
    if kernel.ops() is not None:
        for rows, levels in ((x[:1], 1), (x, 1), (x, 2)):
            assert torch.allclose(kernel.ops().matmul_rows(rows, w8, levels),
                                  rows @ w8.dequantize().T)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_gguf_blocks_are_read_exactly(kind):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 128)) * rng.uniform(0.01, 1, (8, 1))).astype(np.float32)
    raw = quants.quantize(w, Q[kind])
    assert np.array_equal(block_weight(kind, raw).dequantize().numpy(), quants.dequantize(raw, Q[kind]))


# Where each k-quant keeps its f16 scales (d, and dmin where it has one) in a super-block: the rest may be any bytes.
F16_SCALES = {"Q4_K": slice(0, 4), "Q5_K": slice(0, 4), "Q6_K": slice(-2, None), "Q3_K": slice(-2, None),
              "Q2_K": slice(-4, None)}


def k_quant_blocks(kind: str, rows: int = 6, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Valid random super-blocks of `kind` for a rows x cols weight, as GGUF stores them [rows, bytes]."""
    import gguf

    rng = np.random.default_rng(seed)
    size, nbytes = gguf.GGML_QUANT_SIZES[Q[kind]]
    raw = rng.integers(0, 256, (rows * cols // size, nbytes), dtype=np.uint8)
    f16 = raw[:, F16_SCALES[kind]]
    raw[:, F16_SCALES[kind]] = rng.uniform(0.001, 0.1, f16.size // 2).astype(np.float16).view(np.uint8).reshape(
        f16.shape)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_super_blocks_are_read_exactly(kind):
    raw = k_quant_blocks(kind)
    assert np.array_equal(block_weight(kind, raw).dequantize().numpy(), quants.dequantize(raw, Q[kind]))


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K"])
def test_other_gguf_types_round_to_int8_blocks_of_32(kind):
    raw = k_quant_blocks(kind, seed=1)
    rows = len(raw)
    reference = quants.dequantize(raw, Q[kind]).reshape(rows, -1, 32)
    w = block_weight(kind, raw)
    assert (w.bits, w.group) == (8, 32)
    error = np.abs(w.dequantize().numpy().reshape(rows, -1, 32) - reference)
    largest = np.abs(reference).max(-1, keepdims=True)
    assert (error <= largest / 254 * (1 + 1e-5)).all()  # half a step of 127 per block's largest weight
    assert error.max() > 0  # rounded, not read: these blocks do not fit one scale per 32


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 16), (8, 32), (8, 256), ("Q4_1", 32), ("Q5_1", 32)])
@pytest.mark.parametrize("levels", [1, 2])
def test_a_tokens_numbers_do_not_depend_on_what_shares_its_call(bits, group, levels):
    # A prompt chunked after a prefix-cache hit, a token checked beside its draft, a sequence in a batch: each token
    # must get exactly its numbers alone; and a layer's panels packed once, the same as panels packed as they go.
    _, w = weights(bits, group, n=37)  # rows not a multiple of the kernel's row groups
    x = torch.randn(40, 256) * 3
    together = kernel.ops().matmul_rows(x, w, levels)
    assert torch.equal(kernel.ops().matmul_rows(x, kernel.ops().pack(w), levels), together)
    for i in range(len(x)):
        assert torch.equal(kernel.ops().matmul_rows(x[i:i + 1], w, levels)[0], together[i])
    for size in (3, 8, 9):
        assert torch.equal(torch.cat([kernel.ops().matmul_rows(part, w, levels) for part in x.split(size)]), together)


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 16), (8, 32), (8, 256), ("Q4_1", 32), ("Q5_1", 32)])
def test_panels_hold_the_rows_exactly(bits, group):
    # A layer keeps only its panels once it has run: everything that reads rows must get them back bit for bit.
    _, w = weights(bits, group, n=37)  # a last, partial panel
    panels = kernel.ops().pack(w)
    codes, scales, mins = kernel.ops().unpack(panels)
    assert torch.equal(codes, w.codes) and torch.equal(scales, w.scales)
    assert (mins is None) == (w.mins is None) and (mins is None or torch.equal(mins, w.mins))
    assert torch.equal(kernel.ops().dequantize(panels), kernel.ops().dequantize(w))
    x = torch.randn(5, 256)
    assert torch.equal(kernel.ops().matmul_rows(x, panels, 0), kernel.ops().matmul_rows(x, w, 0))


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
def test_a_layer_that_ran_keeps_only_its_panels_and_gives_its_rows_back():
    _, w = weights("Q4_1", 32, n=37)
    layer = BlockLinear(BlockWeight(w.codes.clone(), w.scales.clone(), w.mins.clone(), 4, 32))
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    x = torch.randn(3, 256)
    first = layer(x)
    assert [name for name, _ in layer.named_buffers()] == ["packed"]  # the rows are gone
    after = layer.state_dict()  # the rows, unpacked for it; the layer stays packed
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [name for name, _ in layer.named_buffers()] == ["packed"]
    assert torch.equal(layer.weight_blocks.dequantize(), w.dequantize())
    layer.to(torch.device("cpu"))  # a move applies to the rows
    assert torch.equal(layer.codes, w.codes) and "packed" not in dict(layer.named_buffers())
    assert torch.equal(layer(x), first)


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
def test_a_layer_repacks_its_panels_when_its_weights_change():
    _, w1 = weights(4, 32, seed=1)
    _, w2 = weights(4, 32, seed=2)
    x = torch.randn(2, 256)
    layer = BlockLinear(BlockWeight(w1.codes.clone(), w1.scales.clone(), w1.mins.clone(), 4, 32))  # its own buffers
    first = layer(x)
    assert torch.equal(first, matmul(x, w1))
    layer.load_state_dict(BlockLinear(w2).state_dict())  # copied into the same buffers
    assert torch.equal(layer(x), matmul(x, w2))
    with torch.no_grad():
        layer.codes.copy_(w1.codes), layer.scales.copy_(w1.scales), layer.mins.copy_(w1.mins)
    assert torch.equal(layer(x), first)


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
def test_attention_of_a_step_equals_sdpa_and_does_not_depend_on_the_chunking():
    # Three sequences in one step: a prompt chunk after 19 cached tokens, one decoding token, a fresh prompt; keys in
    # scattered slots of the cache, four query heads over two key heads.
    torch.manual_seed(0)
    heads, kv_heads, dim, slots = 4, 2, 64, 256
    k_cache, v_cache = torch.randn(kv_heads, slots, dim), torch.randn(kv_heads, slots, dim)
    order = torch.randperm(slots)
    lengths = [(19, 7), (30, 1), (0, 12)]  # (cached, new) per sequence
    key_slots = [order[40 * i:40 * i + cached + new] for i, (cached, new) in enumerate(lengths)]
    parts = [(None, cached, new) for cached, new in lengths]
    q = torch.randn(sum(new for _, new in lengths), heads, dim)
    out = kernel.ops().attention(q, kernel.Sequences.of(parts, key_slots), k_cache, v_cache)
    row = 0
    for (cached, new), own in zip(lengths, key_slots):
        k, v = k_cache[:, own].repeat_interleave(2, 0), v_cache[:, own].repeat_interleave(2, 0)
        causal = torch.arange(cached + new)[None, :] <= torch.arange(cached, cached + new)[:, None]
        expected = torch.nn.functional.scaled_dot_product_attention(q[row:row + new].transpose(0, 1), k, v,
                                                                    attn_mask=causal)
        assert torch.allclose(out[row:row + new].transpose(0, 1), expected, atol=1e-5)
        row += new
    # The first sequence's chunk cut in two steps: each token gets exactly its numbers.
    first = kernel.ops().attention(q[:3].contiguous(), kernel.Sequences.of([(None, 19, 3)], key_slots[:1]), k_cache,
                                   v_cache)
    rest = kernel.ops().attention(q[3:7].contiguous(), kernel.Sequences.of([(None, 22, 4)], key_slots[:1]), k_cache,
                                  v_cache)
    assert torch.equal(torch.cat([first, rest]), out[:7])


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
@pytest.mark.parametrize("heads", [9, 4, 3])
def test_a_query_heads_attention_does_not_depend_on_the_heads_sharing_its_keys(heads):
    # The query heads of one key-value head are scored a few at a time, each key read once for them: every head must
    # get the numbers it gets alone, with a copy of the keys and values of its own. Enough tokens that the kernel's
    # threads take a token's heads together (with few, it spreads single heads over the threads).
    torch.manual_seed(2)
    k16, v16 = torch.randn(1, 96, 64).half(), torch.randn(1, 96, 64).half()
    key_slots = [torch.randperm(96)[:70], torch.randperm(96)[:13]]
    seqs = kernel.Sequences.of([(None, 30, 40), (None, 12, 1)], key_slots)
    q = torch.randn(41, heads, 64)
    shared = kernel.ops().attention(q, seqs, k16, v16)
    own = [t.expand(heads, -1, -1).contiguous() for t in (k16, v16)]
    alone = kernel.ops().attention(q, seqs, *own)
    assert torch.equal(shared, alone)


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
@pytest.mark.parametrize("head_dim", [64, 24])  # the vector loops, and the plain ones of small test heads
def test_attention_over_a_float16_cache_is_attention_over_its_values(head_dim):
    # The engine keeps keys and values in float16 where the kernel attends: the kernel widens each exactly, so the
    # result is that of the same values held in float32.
    torch.manual_seed(1)
    k16, v16 = torch.randn(2, 64, head_dim).half(), torch.randn(2, 64, head_dim).half()
    key_slots = [torch.randperm(64)[:21], torch.randperm(64)[:9]]
    seqs = kernel.Sequences.of([(None, 17, 4), (None, 8, 1)], key_slots)
    q = torch.randn(5, 4, head_dim)
    out = kernel.ops().attention(q, seqs, k16, v16)
    assert torch.equal(out, kernel.ops().attention(q, seqs, k16.float(), v16.float()))


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
def test_the_avx2_build_computes_what_this_machines_build_does(tmp_path, monkeypatch):
    # The brief's machines have AVX2 without VNNI: that build (the integer products in three instructions instead
    # of one) must give the same numbers, bit for bit, as the build for the machine at hand.
    monkeypatch.setenv("HERD_CACHE", str(tmp_path))
    monkeypatch.setenv("HERD_KERNEL_MARCH", "haswell")
    avx2, native = kernel._Kernel(kernel.build()), kernel.ops()
    assert not avx2.vnni
    x = torch.randn(21, 256) * 3
    for bits, group in [(4, 32), (4, 64), (8, 16), (8, 32), ("Q4_1", 32), ("Q5_1", 32)]:
        _, w = weights(bits, group, n=37)
        for levels in (0, 1, 2):  # from the rows, and from each build's own panels
            assert torch.equal(avx2.matmul_rows(x, w, levels), native.matmul_rows(x, w, levels))
            assert torch.equal(avx2.matmul_rows(x, avx2.pack(w), levels), native.matmul_rows(x, native.pack(w), levels))
    # 512-bit builds add a 4-bit block's two levels of prompt sums (254 * first + second) in float32, exact only
    # below 2^24; the AVX2 build adds them as integers. Codes at their largest come closest: weights 15 but one per
    # block, activations 127 with second levels of every size, 16 tokens (AMX's tile, where the CPU has it).
    w = torch.ones(37, 256)
    w[:, ::32] = 0
    w = block_weight("Q4_1", quants.quantize(w.numpy(), Q["Q4_1"]))
    try:
        for amx in (True, False) if native.amx else (False,):
            native.use_amx(amx)
            for sign in (1, -1):
                x = sign * (3 - torch.rand(16, 256) * 0.02)
                assert torch.equal(avx2.matmul_rows(x, avx2.pack(w), 2), native.matmul_rows(x, native.pack(w), 2))
    finally:
        native.use_amx(True)


@pytest.mark.skipif(kernel.ops() is None or not kernel.ops().amx, reason="no AMX tile unit on this machine")
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 16), (8, 32), (8, 256), ("Q4_1", 32), ("Q5_1", 32)])
def test_the_tile_unit_computes_what_the_vector_units_do(bits, group):
    # Calls of many tokens take AMX where the CPU has it: the same integer sums, scaled in the same order, so the
    # same numbers bit for bit, whatever tiles of 16 tokens the call leaves partly filled.
    # Widths of an even and an odd number of blocks (the two sets of tiles alternate block by block).
    ops = kernel.ops()
    try:
        for k in [k for k in (256, 288) if k % (group if isinstance(group, int) else 32) == 0]:
            _, w = weights(bits, group, n=37, k=k)
            packed = ops.pack(w)
            x = torch.randn(50, k) * 3
            for tokens in (10, 16, 17, 33, 50):
                for levels in (1, 2):
                    assert ops.use_amx(True)
                    tiles = ops.matmul_rows(x[:tokens], packed, levels)
                    assert not ops.use_amx(False)
                    assert torch.equal(tiles, ops.matmul_rows(x[:tokens], packed, levels)), (k, tokens, levels)
    finally:
        ops.use_amx(True)


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
def test_a_child_forked_after_the_kernel_ran_computes_instead_of_hanging():
    # GNU OpenMP cannot restart its threads in a forked child: before, a multiprocessing worker forked from a process
    # that had generated waited forever in its first matmul.
    _, w = weights(4, 32)
    x = torch.randn(16, 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = kernel.ops().matmul_rows(x, w, 1)  # the parent's threads start
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 only with the same numbers
            os._exit(0 if torch.equal(kernel.ops().matmul_rows(x, w, 1), expected) else 3)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "the forked child hung or miscomputed"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(kernel.ops() is None, reason="herd's kernel is not built on this machine")
def test_fp8_codes_widen_and_activations_round_as_pytorch_converts_them():
    """FP8 layers on the kernel: every e4m3 code (subnormals included; not e4m3fn's NaN, which is never stored)
    widens to the float PyTorch gives it, and a token's activations round to e4m3 with its scale exactly as
    fp8.to_fp8 rounds them, ties and subnormals included (through an identity weight, each output is one product)."""
    from herd.quant.fp8 import E4M3, to_fp8

    ops = kernel.ops()
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F].view(E4M3).repeat(16).view(-1, 16)
    assert torch.equal(ops.fp8_dequantize(codes), codes.float())
    scales = torch.rand(len(codes))
    assert torch.equal(ops.fp8_dequantize(codes, scales), codes.float() * scales[:, None])
    identity, k = torch.eye(256).to(E4M3), 256
    torch.manual_seed(0)
    for trial in range(40):
        x = torch.randn(5, k) * torch.logspace(-8, 4, k)[torch.randperm(k)]
        x[0] = torch.randint(-200, 200, (k,)).float() * 2**-10 + 2**-11  # halfway between e4m3 values
        x[0, 0] = 2**-3  # its scale 2^-3 / 448: the rest land among e4m3's subnormals and small normals
        xq, xs = to_fp8(x)
        assert torch.equal(ops.fp8_matmul(x, identity, torch.ones(k)), xq.float() * xs)
