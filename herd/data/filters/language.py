"""Language identification with py3langid (the langid.py model, normalised probabilities)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from herd.bounds import FRACTION, require
from herd.data.document import Document
from herd.data.filters.base import DocStage, evolve

_SAMPLE_CHARS = 10_000  # a page's first 10k characters decide as well as all of it, at a fraction of the cost
# Below this a guess is noise: code, formulas and JSON get guesses like zxx at 0.03 or la at 0.14.
MIN_SCORE = 0.65
# Codes that name no natural language: "no linguistic content" and "undetermined".
NO_LANGUAGE = frozenset({"zxx", "und"})


@lru_cache(maxsize=1)
def _identifier():
    # Loaded once per process, not held by the stage, so the stage pickles small.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str) -> tuple[str, float]:
    lang, prob = _identifier().classify(" ".join(text[:_SAMPLE_CHARS].split()))
    return lang, float(prob)


@dataclass
class LanguageFilter(DocStage):
    """Records doc.lang and doc.scores["lang"] for every document; drops only when `languages` is given
    and the document is in none of them with at least `min_score` confidence."""

    name: str = "language"
    languages: list[str] | None = None
    min_score: float = MIN_SCORE

    def __post_init__(self):
        require(self, FRACTION, "min_score")

    def process(self, doc: Document) -> Document | str:
        lang, prob = identify(doc.text)
        out = evolve(doc, lang=lang)
        out.scores["lang"] = prob
        if self.languages is not None:
            if lang not in self.languages:
                return f"language:{lang}"
            if prob < self.min_score:
                return "language:low_score"
        return out


def identified(doc: Document, min_score: float = MIN_SCORE) -> str | None:
    """The natural language `doc` was identified as with at least `min_score` confidence, else None. A language
    recorded without a confidence (set by hand, not by this stage) is taken as given."""
    if not doc.lang or doc.lang in NO_LANGUAGE or doc.scores.get("lang", 1.0) < min_score:
        return None
    return doc.lang
