"""Meta's own Llama Guard prompt builders, loaded from their installed source files without importing their
packages (whose dependencies herd does not need): llama-stack's `llama_guard` shield and llama-recipes'
(llama-cookbook's) `prompt_format_utils`."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from unittest import mock

import pytest


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (scripts/setup.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def _load(path: Path, name: str, stubs: dict | None = None) -> types.ModuleType:
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    with mock.patch.dict(sys.modules, stubs or {}):
        module_spec.loader.exec_module(module)
    return module


def llama_stack_shield():
    """llama-stack's LlamaGuardShield class; its imports of llama-stack's API types are stubbed, since
    building a prompt uses none of them."""
    path = _package_file("llama_stack", "providers/inline/safety/llama_guard/llama_guard.py")
    names = ["llama_stack", "llama_stack.apis", "llama_stack.apis.common", "llama_stack.apis.common.content_types",
             "llama_stack.apis.inference", "llama_stack.apis.safety", "llama_stack.apis.shields",
             "llama_stack.distribution", "llama_stack.distribution.datatypes", "llama_stack.models",
             "llama_stack.models.llama", "llama_stack.models.llama.datatypes", "llama_stack.models.llama.sku_types",
             "llama_stack.providers", "llama_stack.providers.datatypes", "llama_stack.providers.utils",
             "llama_stack.providers.utils.inference", "llama_stack.providers.utils.inference.prompt_adapter",
             "llama_stack.providers.inline", "llama_stack.providers.inline.safety",
             "llama_stack.providers.inline.safety.llama_guard", "llama_stack.providers.inline.safety.llama_guard.config"]
    stubs = {n: mock.MagicMock() for n in names}
    stubs["llama_stack.apis.safety"].Safety = type("Safety", (), {})  # base classes must be classes
    stubs["llama_stack.providers.datatypes"].ShieldsProtocolPrivate = type("ShieldsProtocolPrivate", (), {})
    # its own name, so that its relative import of .config finds the stub
    module = _load(path, "llama_stack.providers.inline.safety.llama_guard.llama_guard", stubs)
    module.interleaved_content_as_str = lambda content: content
    return module


def llama_recipes_prompt_utils():
    return _load(_package_file("llama_cookbook", "inference/prompt_format_utils.py"), "_herd_ref_prompt_format_utils")
