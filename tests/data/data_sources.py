"""The Debian packages' texts the data tests are built from (setup.sh installs them); a module name no other test
directory uses, so that a test's import of it finds this one."""
from pathlib import Path

PY_HTML = Path("/usr/share/doc/python3.11/html")
DEBREF = Path("/usr/share/debian-reference")
FORTUNES = Path("/usr/share/games/fortunes")
GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
