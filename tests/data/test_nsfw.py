"""NSFW recall and false positives as a function of density: terms planted by a seeded generator into real
clean text in each language the pipeline keeps, and real clean texts that merely mention sensitive topics
(GCIDE's medical, anatomical, biological and legal senses). The planted terms are surface forms (inflected,
capitalised, accented) split into a tuning half and a held-out half; the tests measure the held-out half."""
from __future__ import annotations

import gzip
import random
import re

import pytest

from herd.data.document import Document
from herd.data.filters import NSFWFilter
from herd.data.filters.nsfw import explicit_weight, terms
from herd.data.planted import plant_terms

from data_sources import GCIDE

# Written apart from the filter's lists: words as they occur in text, not as the lists spell them.
SURFACE = {
    "en": ["fuck", "fucking", "Fucked", "motherfuckers", "shit", "bullshit", "cunt", "porn", "pornographic",
           "blowjob", "dildos", "masturbating", "orgasms", "gangbang", "slut", "whores", "pussy", "cock", "dick",
           "tits", "asshole", "wanker", "jizz", "cumshots", "sex", "nude", "anal", "Horny"],
    "de": ["ficken", "gefickt", "Fotze", "Scheiße", "Arschloch", "Hure", "Nutte", "Schlampe", "wichsen", "Wichser",
           "Porno", "Titten", "bumsen", "Schwanz", "Muschi", "geil", "Pimmel", "Hurensohn"],
    "fr": ["putain", "pute", "salope", "connard", "enculé", "niquer", "branler", "partouze", "enfoiré", "nichons",
           "fellation", "bite", "chatte", "couilles", "baiser", "cul", "merde", "foutre"],
    "es": ["puta", "putas", "coño", "joder", "jodido", "follar", "polla", "mamada", "verga", "pendejo", "cabrón",
           "chingada", "tetas", "cojones", "gilipollas", "culo", "pene", "mierda"],
    "it": ["cazzo", "figa", "pompino", "scopare", "scopata", "troia", "puttana", "vaffanculo", "stronzo", "minchia",
           "coglione", "inculato", "zoccola", "tette", "culo", "merda", "sega", "fica"],
}
SENSITIVE_SENSE = re.compile(r"\((Med|Anat|Physiol|Law|Biol|Zool|Surg)\.\)")


def split_terms(lang: str) -> tuple[list[str], list[str]]:
    """The tuning half and the held-out half of a language's surface forms (fixed by seed)."""
    forms = sorted(SURFACE[lang])
    random.Random(f"split-{lang}").shuffle(forms)
    return forms[: len(forms) // 2], forms[len(forms) // 2 :]


def hosts(planted_corpus) -> dict[str, list[Document]]:
    """Clean real documents of each language: fortunes, the French Debian Reference, the Python manual."""
    by_lang: dict[str, list[Document]] = {lang: [] for lang in SURFACE}
    for d in planted_corpus.docs:
        if d.id in planted_corpus.clean:
            lang = "en" if d.id.startswith("py-") else planted_corpus.lang.get(d.id)
            if lang in by_lang:
                by_lang[lang].append(d)
    return by_lang


def sensitive_definitions(n_docs: int = 150) -> list[Document]:
    """GCIDE senses from medicine, anatomy, physiology, biology, zoology, surgery and law, ~150 words a document."""
    with gzip.open(GCIDE, "rt", encoding="utf-8", errors="replace") as fh:
        text = fh.read(6_000_000)
    senses = [" ".join(s.split()) for s in text.split("\n\n") if SENSITIVE_SENSE.search(s)]
    docs, cur = [], []
    for s in senses:
        cur.append(s)
        if sum(len(x.split()) for x in cur) >= 150:
            docs.append(Document(f"gcide-sensitive-{len(docs)}", "\n".join(cur)))
            cur = []
    return docs[:n_docs]


def recall_at(planted_corpus, density: float, forms_of, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    stage, out = NSFWFilter(), {}
    for lang, docs in hosts(planted_corpus).items():
        forms = forms_of(lang)
        planted = [Document(d.id, plant_terms(d.text, forms, density, rng)) for d in docs[:40]]
        out[lang] = len(stage(planted).dropped) / len(planted)
    return out


@pytest.mark.parametrize("density", [0.03, 0.05])
def test_recall_on_held_out_terms_at_three_percent_and_up(planted_corpus, density):
    by_lang = recall_at(planted_corpus, density, lambda lang: split_terms(lang)[1], seed=int(density * 1000))
    print(f"held-out recall at {density:.0%}: {by_lang}")
    assert all(len(docs) >= 15 for docs in hosts(planted_corpus).values())
    assert all(r >= 0.9 for r in by_lang.values()), by_lang


def test_low_density_is_kept(planted_corpus):
    # one swear word in a few hundred is a rude text, not adult content
    by_lang = recall_at(planted_corpus, 0.004, lambda lang: split_terms(lang)[1], seed=4)
    assert all(r <= 0.1 for r in by_lang.values()), by_lang


def test_clean_texts_that_mention_sensitive_topics_are_kept(planted_corpus):
    sensitive = sensitive_definitions()
    lexicon = terms()
    mentioning = [d for d in sensitive if explicit_weight(d.text, lexicon)[0] > 0]
    clean = [d for docs in hosts(planted_corpus).values() for d in docs] + sensitive
    dropped = NSFWFilter()(clean).dropped
    print(f"nsfw: {len(dropped)}/{len(clean)} clean documents dropped; {len(mentioning)}/{len(sensitive)} "
          "sensitive-topic documents hold a listed word")
    assert len(sensitive) >= 100 and len(mentioning) >= 5  # the clean set does test the lists
    assert len(dropped) / len(clean) <= 0.01, [(x.id, x.reason) for x in dropped]


def test_forms_are_folded_and_stems_match_inflections():
    lexicon = terms()
    for word in ("FUCKING", "Scheiße", "scheisse", "enculés", "Cabrón", "Motherfuckers!", "«putain»"):
        assert explicit_weight(word, lexicon)[0] == 1.0, word
    for word in ("analysis", "putative", "pollard", "assert", "title", "Wankel", "Pollack", "scoperta"):
        assert explicit_weight(word, lexicon)[0] == 0.0, word
    assert explicit_weight("penis", lexicon)[0] == 0.5  # anatomy: counts, but half
    assert explicit_weight("coño", lexicon)[0] == 0.5  # without its tilde it is also a cone
