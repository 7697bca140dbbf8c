"""Real English text for the example pretraining run, from Debian packages already on the machine
(scripts/test-fixtures.sh): English fortunes (20 to a document) and 30,000 GCIDE dictionary entries (50 to a document),
as JSONL. Python's HTML manual is read by `herd data run` itself.

    python scripts/train-corpus.py out/corpus.jsonl
"""
import gzip
import json
import sys
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
ENGLISH = ["fortunes", "literature", "science", "wisdom", "people", "work", "education", "politics", "humorists",
           "law", "love", "men-women", "miscellaneous", "platitudes", "songs-poems", "computers", "art", "goedel"]


def chunks(items, n):
    return ["\n\n".join(items[i:i + n]) for i in range(0, len(items), n)]


def main(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for name in ENGLISH:
            path = FORTUNES / name
            if not path.is_file():
                continue
            quotes = [q.strip() for q in path.read_text(errors="replace").split("\n%\n") if q.strip()]
            for i, text in enumerate(chunks(quotes, 20)):
                fh.write(json.dumps({"id": f"fortune-{name}-{i}", "text": text}) + "\n")
        with gzip.open(GCIDE, "rt", encoding="utf-8", errors="replace") as gz:
            entries = [e.strip() for e in gz.read().split("\n\n") if e.strip()]
        for i, text in enumerate(chunks(entries[100:30100], 50)):  # the first entries are the licence
            fh.write(json.dumps({"id": f"gcide-{i}", "text": text}) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
