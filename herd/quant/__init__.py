"""Quantization schemes (a stored weight format plus the matmul that uses it), applied to a built model from
outside by swapping its linear layers: schemes.py lists them, blocks.py holds the kernel's block format, load.py
builds a checkpoint under a scheme, store.py writes and reads `herd quantize` outputs.

Nothing is imported here, so that `herd --help` stays free of torch.
"""



def __getattr__(name):
    # herd.quant.schemes.Scheme without importing it first, as the README writes it
    import importlib

    try:
        return importlib.import_module(f"herd.quant.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"herd.quant.{name}":  # a module that is here, missing something of its own
            raise
        raise AttributeError(f"module 'herd.quant' has no attribute {name!r}") from None
