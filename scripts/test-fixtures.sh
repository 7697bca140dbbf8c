#!/usr/bin/env bash
# Real text nobody here wrote, from Debian's packages, for the data-pipeline tests (idempotent).
set -euo pipefail

# Data pipeline (tests/data): Python's HTML manual, the French Debian Reference, fortunes in
# en/de/es/it plus the Spanish/Italian offensive ones (Debian has no fortunes-fr or fortunes-off any more),
# and the GCIDE dictionary; for the HTML extractor, documentation from other HTML generators, held out from
# its development: git-doc (AsciiDoc), bash-doc (Texinfo, man2html), python-sympy-doc (Sphinx, math images).
DATA_PKGS=(python3-doc debian-reference-fr fortunes fortunes-de fortunes-es fortunes-es-off fortunes-it fortunes-it-off dict-gcide
           git-doc bash-doc python-sympy-doc)
missing=()
for pkg in "${DATA_PKGS[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
