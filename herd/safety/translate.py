"""Machine translation of guard training text, with Apertium (Debian's `apertium` and its language pairs): the
harmful and safe requests the guards learn from are English, and a guard trained on English harm and multilingual
benign text learns that other languages are safe. Apertium is rule-based and runs offline, some 70 KB of text a
second; its output is rough (words it does not know stay English), as machine-translated training data is.
Translations are kept in herd's cache, keyed by the texts and the installed language data.
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from herd.atomic import atomic_output
from herd.cache import cache_dir

# herd's language codes to Apertium's English-to-X pairs (Debian packages apertium-eng-spa, apertium-eng-cat)
PAIRS = {"es": "eng-spa", "ca": "eng-cat"}
APERTIUM_DATA = Path("/usr/share/apertium")


def _apertium(lines: list[str], pair: str) -> list[str]:
    if shutil.which("apertium") is None:
        raise FileNotFoundError("apertium is not installed: apt-get install apertium apertium-eng-spa "
                                "apertium-eng-cat (scripts/setup.sh does)")
    run = subprocess.run(["apertium", "-u", pair], input="\n".join(lines) + "\n", capture_output=True, text=True)
    out = run.stdout.split("\n")[:len(lines)]
    if run.returncode or len(out) != len(lines):
        raise RuntimeError(f"apertium {pair} failed ({run.stderr.strip()[:200] or 'lines lost'}): is the "
                           f"apertium-{pair} package installed?")
    # -u drops the marks of unknown words; what is left of the spacing around them is noise
    return [" ".join(line.split()) for line in out]


@functools.lru_cache(maxsize=8)
def _translate(texts: tuple[str, ...], pair: str) -> tuple[str, ...]:
    lines = [" ".join(t.split()) for t in texts]  # one line per text: line i of Apertium's output is text i
    data = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (APERTIUM_DATA / f"apertium-{pair}").glob("*")
                  if p.is_file())
    key = hashlib.sha256(json.dumps([pair, data, lines]).encode()).hexdigest()[:24]
    path = cache_dir("translations") / f"{pair}-{key}.json"
    if path.is_file():
        return tuple(json.loads(path.read_text()))
    out = _apertium(lines, pair)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(out, ensure_ascii=False))
    return tuple(out)


def translate(texts: list[str], lang: str) -> list[str]:
    """`texts` (English) in `lang` (a key of PAIRS), in order."""
    if lang not in PAIRS:
        raise ValueError(f"no translation to {lang!r}: one of {', '.join(PAIRS)}")
    return list(_translate(tuple(texts), PAIRS[lang]))
