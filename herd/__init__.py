"""herd: the Llama 3 system, end to end."""
from herd.llm import LLM, load


def load_tokenizer(path=None):
    """The real Llama 3 tokenizer, or the tokenizer at `path` (tokenizer.model, tokenizer.json or its folder)."""
    from herd.tokenizer import load_tokenizer as _load

    return _load(path)


def __getattr__(name):
    # The chat format is imported on first use so that `import herd` stays light for the data tools.
    if name == "ChatFormat":
        from herd.tokenizer import ChatFormat

        return ChatFormat
    raise AttributeError(f"module 'herd' has no attribute {name!r}")


__all__ = ["LLM", "ChatFormat", "load", "load_tokenizer"]
