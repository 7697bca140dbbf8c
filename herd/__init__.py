"""herd: the Llama 3 system, end to end.

The public surface is imported on first use, so that `import herd` stays light for the data tools' workers.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["LLM", "ChatFormat", "load", "load_tokenizer"]

try:
    __version__ = version("herd")
except PackageNotFoundError:  # a checkout on the path, not installed
    __version__ = "0+unknown"


def __getattr__(name):
    if name in ("LLM", "load"):
        import herd.llm

        return getattr(herd.llm, name)
    if name in ("ChatFormat", "load_tokenizer"):
        import herd.tokenizer

        return getattr(herd.tokenizer, name)
    # a subpackage (herd.generate.EngineConfig, herd.quant.schemes.Scheme) before anything else has loaded it
    return submodule(__name__, name)


def submodule(package: str, name: str):
    """`package.name`, imported on first use (a package's __getattr__); AttributeError where there is none."""
    import importlib

    try:
        return importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{package}.{name}":  # a module that is here, missing something of its own
            raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
