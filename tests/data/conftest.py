"""A corpus of real text from Debian packages (scripts/test-fixtures.sh installs them), with planted cases.

Real documents: Python's HTML manual (read through herd's HTML reader), the French Debian Reference,
English/German/Spanish/Italian fortunes, GCIDE dictionary entries. Planted into them, each labelled:
exact and near duplicates, URL variants, boilerplate lines, spam, adult content, PII. `planted_corpus`
is session-scoped and also writes the corpus as JSONL shards for end-to-end pipeline tests.
"""
from __future__ import annotations

import codecs
import gzip
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import lxml.html
import pytest

from herd.data.document import Document
from herd.data.readers import read
from herd.data.filters.base import word_list
from herd.data.filters.nsfw import terms

from data_sources import DEBREF, FORTUNES, GCIDE, PY_HTML

FORTUNE_FILES = {
    "en": ["fortunes", "literature", "science", "wisdom", "people", "work", "education", "politics"],
    "de": ["de/zitate", "de/sprichworte", "de/wusstensie", "de/unfug", "de/letzteworte"],
    "es": ["es/sabiduria.fortunes", "es/filosofia.fortunes", "es/libertad.fortunes", "es/ciencia.fortunes"],
    "it": ["it/italia", "it/definizioni", "it/formiche", "it/leggi", "it/luttazzi"],
}
OFFENSIVE_FILES = ["off/es/off/varios.fortunes", "off/es/off/camioneros.fortunes", "off/it/film-o", "off/it/formiche-o"]

BOILERPLATE = [
    "Subscribe to our newsletter for weekly updates",
    "Home | About | Blog | Contact | Privacy Policy",
    "© 2024 Example Media Group. All rights reserved.",
    "This website uses cookies to improve your experience.",
    "Skip to main content",
]
# Fragments that look numeric but are not PII; each is planted into PII docs and must survive masking.
PII_NEGATIVES = ["Python 3.11.2", "version 1.2.3", "on 2024-01-15", "on 15.01.2024", "since 01/15/2024",
                 "1,234,567 rows", "pi is 3.14159", "order 12345", "at 12:30:45", "slice a[1::2]",
                 "from 1999-2005", "ISBN 978-3-16-148410-0", "released 10.1.2", "0.5 percent"]
PII_ITEMS = {
    "email": ["jane.doe@example.org", "b.smith+news@mail.example.co.uk", "root@host-1.example.net"],
    "phone": ["+1-202-555-0143", "+44 20 7946 0958", "+33 1 23 45 67 89", "+49 (0)30 1234567",
              "(202) 555-0143", "202-555-0143", "202.555.0143", "06 12 34 56 78", "030 1234567"],
    "ip": ["192.168.1.17", "10.0.0.254", "2001:db8::8a2e:370:7334", "fe80::1ff:fe23:4567:890a"],
}


@dataclass
class PlantedCorpus:
    files: list[Path]  # JSONL shards holding `docs`, in order
    docs: list[Document]  # the corpus in input order; planted copies come after their originals
    html_dir: Path  # the Python manual pages the clean HTML docs were read from
    clean_html: set[str]  # real manual pages, untouched apart from boilerplate lines
    clean: set[str]  # every real document nothing harmful was planted into
    lang: dict[str, str]  # id -> language of the fortune / Debian Reference docs
    exact_dups: dict[str, str]  # copy id -> original id
    near_dups: dict[str, str]
    url_dups: dict[str, str]
    boilerplate: list[str]
    boilerplate_docs: set[str]
    twice_line: str  # a real line planted into exactly two documents: line dedup must keep it
    twice_docs: set[str]
    spam: dict[str, str]  # id -> kind
    nsfw: dict[str, str]  # id -> "word_density" | "domain", as in the drop reason
    offensive: set[str]  # docs of concentrated offensive fortunes (fortunes-*-off)
    pii: dict[str, list[str]]  # id -> planted strings
    pii_negatives: list[str] = field(default_factory=lambda: list(PII_NEGATIVES))

    def by_id(self) -> dict[str, Document]:
        return {d.id: d for d in self.docs}


def _fortunes(rel: str) -> list[str]:
    data = (FORTUNES / rel).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    if "/es/off/" in rel:  # Debian ships the Spanish offensive fortunes ROT13-encoded
        text = codecs.decode(text, "rot13")
    # one paragraph per fortune, as a web page would have it, not the 70-column terminal layout
    return [" ".join(f.split()) for f in re.split(r"\n%\n", text) if len(f.split()) >= 4]


def _fortune_docs(files: list[str], prefix: str, rng: random.Random, per_doc: int, n_docs: int) -> list[Document]:
    pool = [f for rel in files if (FORTUNES / rel).exists() for f in _fortunes(rel)]
    rng.shuffle(pool)
    docs = []
    for i in range(min(n_docs, len(pool) // per_doc)):
        text = "\n\n".join(pool[i * per_doc : (i + 1) * per_doc])
        docs.append(Document(f"{prefix}-{i:03d}", text, f"fortunes:{prefix}:{i}", f"https://fortunes.example.org/{prefix}/{i}"))
    return docs


def _gcide_docs(n: int) -> list[Document]:
    with gzip.open(GCIDE, "rt", encoding="utf-8", errors="replace") as fh:
        lines = [fh.readline() for _ in range(2000 + 40 * n)][2000:]
    entries = "".join(lines).split("\n\n")
    per = max(len(entries) // n, 1)
    return [Document(f"gcide-{i:03d}", "\n\n".join(entries[i * per : (i + 1) * per]).strip(), f"gcide:{i}")
            for i in range(n)]


def _is_prose(page: Path) -> bool:
    """15+ real paragraphs outside tables: not a table of contents, index or table of constants."""
    tree = lxml.html.fromstring(page.read_bytes())
    return sum(len(p.text_content().split()) >= 12 for p in tree.xpath("//p[not(ancestor::table)]")) >= 15


def _manual_pages(limit: int) -> list[Path]:
    pages = [p for sub in ("library", "tutorial", "howto", "reference", "faq")
             for p in sorted((PY_HTML / sub).glob("*.html")) if p.stat().st_size < 120_000]
    step = max(len(pages) // (2 * limit), 1)  # about half the pages are prose
    return [p for p in pages[::step] if _is_prose(p)][:limit]


def _french_docs(n: int) -> list[Document]:
    docs: list[Document] = []
    for page in sorted(DEBREF.glob("ch0*.fr.html"))[:2]:
        for d in read(page):
            paras = [p for p in d.text.split("\n") if len(p.split()) > 12]
            for i in range(0, len(paras) - 8, 8):
                docs.append(Document(f"fr-{len(docs):03d}", "\n".join(paras[i : i + 8]), f"{page}:{i}",
                                     f"https://debian-reference.example.org/fr/{len(docs)}"))
    return docs[:n]


def _change_words(text: str, rng: random.Random, k: int) -> str:
    toks = text.split(" ")
    for i in rng.sample(range(len(toks)), k):
        toks[i] = rng.choice(["alpha", "bravo", "charlie", "delta", "echo"])
    return " ".join(toks)


def _url_variant(url: str, i: int) -> str:
    scheme, rest = url.split("://", 1)
    host, _, path = rest.partition("/")
    variants = [
        f"{scheme.upper()}://{host.upper()}/{path}/",
        f"{scheme}://{host}:443/{path}#section-{i}",
        f"{scheme}://{host}/{path}?utm_source=news&utm_medium=email",
        f"{scheme}://{host}/{path}/?utm_campaign=x#top",
    ]
    return variants[i % len(variants)]


def _insert_lines(text: str, lines: list[str], rng: random.Random) -> str:
    paras = text.split("\n")
    for line in lines:
        paras.insert(rng.choice([0, len(paras)]), line)
    return "\n".join(paras)


def _spam(rng: random.Random, vocab: list[str]) -> dict[str, str]:
    stuffed = " ".join(rng.choice(["cheap", "best", "buy", "online", "discount", "pills"]) for _ in range(300))
    soup = " ".join("".join(rng.choice("#$%&*@!~^|<>{}[]") for _ in range(rng.randint(2, 8))) for _ in range(200))
    lorem = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore "
             "et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut "
             "aliquip ex ea commodo consequat. The product of the week is here and the offer is good. ") * 3
    words_only = " ".join(rng.choice(vocab) for _ in range(250))
    repeated = "\n".join(["Click here to win a free prize now!"] * 40 + ["Offers end soon and the best deals are here."] * 20)
    hashtags = " ".join(f"#{rng.choice(vocab)} #deal #sale" for _ in range(80))
    ellipses = "\n".join(f"{' '.join(rng.choice(vocab) for _ in range(6))} and the rest..." for _ in range(40))
    return {"stuffing": stuffed, "symbols": soup, "lorem": lorem, "word_salad_no_stopwords": words_only,
            "repeated_lines": repeated, "hashtags": hashtags, "ellipses": ellipses,
            "short": "Click here! Best deals."}


def build_corpus(root: Path) -> PlantedCorpus:
    rng = random.Random(1234)
    pages = _manual_pages(90)
    html = [d for p in pages for d in read(p) if isinstance(d, Document)]
    for d in html:
        d.id = f"py-{Path(d.source).parent.name}-{Path(d.source).stem}"
    fortunes = {lang: _fortune_docs(files, f"fortune-{lang}", rng, per_doc=10, n_docs=25)
                for lang, files in FORTUNE_FILES.items()}
    french = _french_docs(20)
    gcide = _gcide_docs(8)
    base = html + [d for docs in fortunes.values() for d in docs] + french + gcide
    rng.shuffle(base)
    lang = {d.id: d.id.split("-")[1] for docs in fortunes.values() for d in docs} | {d.id: "fr" for d in french}

    # boilerplate into a third of the real documents; a real line into exactly two
    boiler_docs = set()
    for d in rng.sample(base, len(base) // 3):
        d.text = _insert_lines(d.text, rng.sample(BOILERPLATE, 3), rng)
        boiler_docs.add(d.id)
    twice_line = "Shared by two pages only: the tables below list every module option in detail."
    twice = rng.sample([d for d in base if d.id.startswith("py-")], 2)
    for d in twice:
        d.text = _insert_lines(d.text, [twice_line], rng)

    planted: list[Document] = []
    long_docs = [d for d in base if len(d.text.split()) > 400 and d not in twice]
    originals = rng.sample(long_docs, 30)
    exact, near, url_dups = {}, {}, {}
    for i, d in enumerate(originals[:10]):
        # verbatim, re-spaced, or re-cased: all one normalised text
        text = [d.text, "  " + d.text.replace("\n", "\n\n") + "\n", d.text.upper()][i % 3]
        planted.append(Document(f"exact-{i:02d}", text, "planted", None))
        exact[f"exact-{i:02d}"] = d.id
    for i, d in enumerate(originals[10:30]):
        text = _change_words(d.text, rng, 3)
        if i % 2:
            text += "\nThis page was last edited by the maintainers of the archive."
        planted.append(Document(f"near-{i:02d}", text, "planted", None))
        near[f"near-{i:02d}"] = d.id
    with_url = [d for d in base if d.url and d.url.startswith("https://") and d not in originals]
    donors = rng.sample(fortunes["en"], 8)
    for i, (orig, donor) in enumerate(zip(rng.sample(with_url, 8), donors)):
        # different text, same page address: only URL dedup can see it
        text = _change_words(donor.text, rng, 20) + "\nRevised edition of the page."
        planted.append(Document(f"urldup-{i:02d}", text, "planted", _url_variant(orig.url, i)))
        url_dups[f"urldup-{i:02d}"] = orig.id

    vocab = sorted({w.strip(".,;:!?\"'()").lower() for d in gcide for w in d.text.split()} - word_list("stopwords/en.txt"))
    vocab = [w for w in vocab if w.isalpha() and len(w) > 3]
    spam = {}
    for kind, text in _spam(rng, vocab).items():
        planted.append(Document(f"spam-{kind}", text, "planted", f"https://spam.example.com/{kind}"))
        spam[f"spam-{kind}"] = kind

    nsfw = {}
    bad = sorted(w for w, weight in terms(("en",)).exact.items() if weight == 1.0)
    for i, d in enumerate(rng.sample(fortunes["en"], 6)):
        toks = d.text.split(" ")
        for j in rng.sample(range(len(toks)), max(len(toks) // 12, 4)):
            toks[j] = rng.choice(bad)
        planted.append(Document(f"nsfw-words-{i}", " ".join(toks), "planted", f"https://blog.example.net/post/{i}"))
        nsfw[f"nsfw-words-{i}"] = "word_density"
    hosts = ["www.pornhub.com", "de.xhamster.com", "xvideos.com", "m.onlyfans.com", "XNXX.COM"]
    # harmless text on a blocklisted host: only the domain rule can catch these
    harmless = _fortune_docs(FORTUNE_FILES["en"], "adult-host", rng, per_doc=10, n_docs=len(hosts))
    for i, (host, d) in enumerate(zip(hosts, harmless)):
        planted.append(Document(f"nsfw-domain-{i}", d.text, "planted", f"https://{host}/view/{i}"))
        nsfw[f"nsfw-domain-{i}"] = "domain"
    offensive = _fortune_docs(OFFENSIVE_FILES, "offensive", rng, per_doc=6, n_docs=12)
    planted.extend(offensive)

    pii: dict[str, list[str]] = {}
    pii_hosts = [d for d in base if d.id.startswith("py-") and d not in originals and d not in twice][:12]
    items = [(kind, s) for kind, xs in PII_ITEMS.items() for s in xs]
    for i, d in enumerate(pii_hosts):
        chosen = [items[(2 * i + k) % len(items)] for k in range(3)]
        sentences = [f"For help contact {s} during office hours." if kind == "email"
                     else f"You can reach the desk at {s} any weekday." if kind == "phone"
                     else f"The server at {s} answers these requests." for kind, s in chosen]
        negatives = rng.sample(PII_NEGATIVES, 4)
        sentences.append("The notes mention " + ", ".join(negatives) + " for reference.")
        d.text = _insert_lines(d.text, sentences, rng)
        pii[d.id] = [s for _, s in chosen]

    tail = planted[:]
    rng.shuffle(tail)
    docs = base + tail
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(4):
        path = root / f"corpus-{k:02d}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for d in docs[k * len(docs) // 4 : (k + 1) * len(docs) // 4]:
                fh.write(json.dumps({"id": d.id, "text": d.text, "url": d.url}, ensure_ascii=False) + "\n")
        files.append(path)
    harmful = set(spam) | set(nsfw) | {d.id for d in offensive}
    clean = {d.id for d in base} - harmful
    return PlantedCorpus(
        files=files, docs=docs, html_dir=PY_HTML, clean_html={d.id for d in html} - set(pii),
        clean=clean, lang=lang, exact_dups=exact, near_dups=near, url_dups=url_dups,
        boilerplate=BOILERPLATE, boilerplate_docs=boiler_docs, twice_line=twice_line,
        twice_docs={d.id for d in twice}, spam=spam, nsfw=nsfw, offensive={d.id for d in offensive}, pii=pii,
    )


@pytest.fixture(scope="session")
def planted_corpus(tmp_path_factory) -> PlantedCorpus:
    missing = [p for p in (PY_HTML, DEBREF, FORTUNES / "de", FORTUNES / "off" / "es", GCIDE) if not p.exists()]
    if missing:
        pytest.fail(f"test text not installed ({', '.join(map(str, missing))}): run scripts/test-fixtures.sh")
    return build_corpus(tmp_path_factory.mktemp("planted_corpus"))
