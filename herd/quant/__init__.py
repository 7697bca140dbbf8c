"""Quantization schemes (a stored weight format plus the matmul that uses it), applied to a built model from
outside by swapping its linear layers: schemes.py lists them, blocks.py holds the kernel's block format, load.py
builds a checkpoint under a scheme, store.py writes and reads `herd quantize` outputs.

Nothing is imported here, so that `herd --help` stays free of torch.
"""


def __getattr__(name):
    # herd.quant.schemes.Scheme without importing it first, as the README writes it
    from herd import submodule

    return submodule(__name__, name)
