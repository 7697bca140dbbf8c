"""Fixtures tests in several directories share: the default model as transformers reads it, the independent
reference for herd's own loading. transformers expands the GGUF to float in about 20 s, so once a session."""
import pytest
import torch

from herd.llm import default_model_path


@pytest.fixture(scope="session")
def smollm2_transformers():
    """transformers' tokenizer for the default model, from its GGUF."""
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def smollm2_transformers_model():
    """transformers' model for the default model, from its GGUF, in float32 (read-only: tests share it)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
