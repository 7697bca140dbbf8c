"""herd as a package installs it: every file the code reads at run time is in the wheel."""
import fnmatch
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_file_herd_reads_beside_its_code_is_package_data():
    """The chat page had been left out of the wheel: an installed `herd serve` answered / with a 500."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    tracked = subprocess.run(["git", "ls-files", "herd"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = [(package.replace(".", "/"), pattern) for package, globs in data.items() for pattern in globs]
    missing = [path for path in tracked if not path.endswith(".py") and not any(
        fnmatch.fnmatch(path, f"{package}/{pattern}") for package, pattern in patterns)]
    assert missing == []



def test_a_missing_module_names_the_extra_that_installs_it():
    """`herd serve` without the serve extra had said only "No module named 'uvicorn'"."""
    from herd.cli import extra_providing

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, distribution in (("uvicorn", "uvicorn"), ("fastapi.responses", "fastapi"), ("yaml", "pyyaml"),
                                 ("sklearn", "scikit-learn"), ("zstandard", "zstandard")):
        extra = extra_providing(module)
        assert any(r.lower().startswith(distribution) for r in extras[extra]), (module, extra)
    assert extra_providing("torch") is None and extra_providing("no_such_module") is None
