"""Machine translation of guard training text, with Apertium (Debian's `apertium` and its language pairs): the
harmful and safe requests the guards learn from are English, and a guard trained on English harm and multilingual
benign text learns that other languages are safe. Apertium is rule-based and runs offline, some 70 KB of text a
second a pair; its output is rough (words it does not know stay English, and a chain through Spanish compounds
the errors), as machine-translated training data is.
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
from herd.cache import cached, writable_cache_dir

# herd's language codes to the Apertium modes that take English there, one after the other where Debian has no
# English pair (French, Italian and Portuguese through Spanish), and the packages that hold each mode's data
CHAINS = {"es": ("eng-spa",), "ca": ("eng-cat",), "fr": ("eng-spa", "es-fr"), "it": ("eng-spa", "spa-ita"),
          "pt": ("eng-spa", "es-pt")}
PACKAGES = {"eng-spa": "apertium-eng-spa", "eng-cat": "apertium-eng-cat", "es-fr": "apertium-fr-es",
            "spa-ita": "apertium-spa-ita", "es-pt": "apertium-es-pt"}
APERTIUM_DATA = Path("/usr/share/apertium")


def _apertium(lines: list[str], mode: str) -> list[str]:
    if shutil.which("apertium") is None:
        raise FileNotFoundError(f"apertium is not installed: apt-get install apertium {' '.join(PACKAGES.values())} "
                                "(scripts/setup.sh does)")
    run = subprocess.run(["apertium", "-u", mode], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         encoding="utf-8")
    out = run.stdout.split("\n")[:len(lines)]
    if run.returncode or len(out) != len(lines):
        raise RuntimeError(f"apertium {mode} failed ({run.stderr.strip()[:200] or 'lines lost'}): is the "
                           f"{PACKAGES[mode]} package installed?")
    # -u drops the marks of unknown words; what is left of the spacing around them is noise
    return [" ".join(line.split()) for line in out]


@functools.lru_cache(maxsize=8)
def _translate(texts: tuple[str, ...], chain: tuple[str, ...]) -> tuple[str, ...]:
    lines = [" ".join(t.split()) for t in texts]  # one line per text: line i of Apertium's output is text i
    data = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for mode in chain
                  for p in (APERTIUM_DATA / PACKAGES[mode]).glob("*") if p.is_file())
    key = hashlib.sha256(json.dumps([chain, data, lines]).encode()).hexdigest()[:24]
    name = f"{'+'.join(chain)}-{key}.json"
    path = cached("translations", name)
    if path is not None:
        return tuple(json.loads(path.read_text(encoding="utf-8")))
    for mode in chain:
        lines = _apertium(lines, mode)
    with atomic_output(writable_cache_dir("translations") / name) as tmp:
        tmp.write_text(json.dumps(lines, ensure_ascii=False), encoding="utf-8")
    return tuple(lines)


def translate(texts: list[str], lang: str) -> list[str]:
    """`texts` (English) in `lang` (a key of CHAINS), in order."""
    if lang not in CHAINS:
        raise ValueError(f"no translation to {lang!r}: one of {', '.join(CHAINS)}")
    return list(_translate(tuple(texts), CHAINS[lang]))
