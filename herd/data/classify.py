"""Model-based classifiers, as Llama 3 built them: an LLM labels a sample, a fast classifier learns the
labels, and that classifier runs over the whole corpus.

The fast classifier is a linear model over hashed word and bigram features (fastText-like): the hashing
needs no vocabulary, so a saved model is only its weights plus a few settings, stored as .npz with a JSON
header and read back without pickle.
"""
from __future__ import annotations

import json
import re
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from herd.bounds import FRACTION, require
from herd.data.document import Document, Dropped, StageResult
from herd.data.filters.language import MIN_SCORE, identified

FORMAT = "herd-hashed-linear/1"
DOMAINS = ("general", "math_reasoning", "code", "multilingual")
QUALITY_LABELS = ("low", "high")
TASKS = ("quality", "domain")

Judge = Callable[[list[dict]], str]  # chat messages in, the reply's text out

# --- labelling with an LLM judge ---------------------------------------------------------------------

_QUALITY_PROMPT = """Rate the following web document as training data for a language model, on a scale from 0 to 3:
0 = spam, boilerplate, gibberish or adult content
1 = low quality: ads, navigation, fragments, little information
2 = decent: coherent, informative text
3 = excellent: well written and educational, like a good textbook or reference

Document:
\"\"\"
{text}
\"\"\"

Answer with the number only."""

_DOMAIN_PROMPT = """Which category fits the following document best?
code: source code, or documentation about programming
math_reasoning: mathematics, logic, or step-by-step reasoning
general: general knowledge, prose, news, anything else
multilingual: mostly not in English

Document:
\"\"\"
{text}
\"\"\"

Answer with one word: code, math_reasoning, general or multilingual."""

_SYSTEM = "You are a careful annotator of training data. You answer with the label only."


def judge_messages(task: str, text: str, max_chars: int = 2000) -> list[dict]:
    prompt = {"quality": _QUALITY_PROMPT, "domain": _DOMAIN_PROMPT}[task]
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": prompt.format(text=text[:max_chars])}]


_SCORE = re.compile(r"(?<![\d.])([0-3])(?!\d|\.\d)")  # a lone digit: "2", "2.", "2/3", not "0.5" or "10"
_SCORE_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3}
_DOMAIN_WORDS = [("math_reasoning", r"math|reasoning|logic"), ("code", r"code|programming|source"),
                 ("multilingual", r"multilingual|non-english|not in english|foreign"), ("general", r"general")]


def parse_quality(reply: str) -> int | None:
    """The first score 0-3 in a reply ("2", "1. The document", "Score: 2/3", "two"), or None if it holds none."""
    reply = reply.lower()
    m = _SCORE.search(reply)
    word = re.search(r"\b(" + "|".join(_SCORE_WORDS) + r")\b", reply)
    if m and (not word or m.start() < word.start()):
        return int(m.group(1))
    return _SCORE_WORDS[word.group(1)] if word else None


def parse_domain(reply: str) -> str | None:
    """The one domain a reply names ("Code.", "math reasoning", "**general**"); None for none or several,
    since a reply listing the choices back is no answer."""
    reply = reply.lower()
    hits = {domain for domain, pattern in _DOMAIN_WORDS if re.search(pattern, reply)}
    return hits.pop() if len(hits) == 1 else None


TASK_CHOICES = {"quality": ("0", "1", "2", "3"), "domain": DOMAINS}


def model_judge(llm, task: str) -> Judge:
    """A judge from any `herd.load` model: of the task's answers, the one the model finds likeliest."""
    choices = TASK_CHOICES[task]

    def judge(messages: list[dict]) -> str:
        scores = llm.choose(messages, choices)
        return max(scores, key=scores.get)

    return judge


def label_texts(texts: Sequence[str], judge: Judge, task: str, progress: bool = True) -> list[str | None]:
    """The judge's label for each text (None where its reply could not be parsed).

    Quality scores become "high" (2-3) or "low" (0-1): the classifier then predicts P(high), which a
    threshold turns into keep or drop.
    """
    labels: list[str | None] = []
    for text in tqdm(texts, desc=f"judging ({task})", unit="doc", disable=not progress):
        reply = judge(judge_messages(task, text))
        if task == "quality":
            score = parse_quality(reply)
            labels.append(None if score is None else QUALITY_LABELS[score >= 2])
        else:
            labels.append(parse_domain(reply))
    return labels


# --- the fast classifier ------------------------------------------------------------------------------


@dataclass
class HashedLinearClassifier:
    classes: list[str]
    coef: np.ndarray  # (n_classes, n_features); binary models keep one row, for classes[1]
    intercept: np.ndarray
    n_features: int = 1 << 20
    ngrams: int = 2
    max_chars: int = 20_000  # long documents are judged by their start, at training and at use alike
    info: dict = field(default_factory=dict)  # task, training sizes, held-out accuracy

    @staticmethod
    def vectorizer(n_features: int, ngrams: int):
        from sklearn.feature_extraction.text import HashingVectorizer

        # punctuation tokens kept: braces, operators and semicolons are much of what marks code and math
        return HashingVectorizer(n_features=n_features, ngram_range=(1, ngrams), alternate_sign=False,
                                 token_pattern=r"(?u)\b\w+\b|[^\w\s]", norm="l2", dtype=np.float32)

    def features(self, texts: Sequence[str]):
        return self.vectorizer(self.n_features, self.ngrams).transform([t[:self.max_chars] for t in texts])

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[str], alpha: float = 1e-5, seed: int = 0,
            n_features: int = 1 << 20, ngrams: int = 2, info: dict | None = None) -> HashedLinearClassifier:
        from sklearn.linear_model import SGDClassifier

        if len(set(labels)) < 2:
            raise ValueError(f"need at least two distinct labels to train on, got {sorted(set(labels))}")
        model = cls(classes=[], coef=np.zeros(0), intercept=np.zeros(0), n_features=n_features, ngrams=ngrams,
                    info=dict(info or {}))
        # logistic loss by SGD: on a million hashed features it fits in a fraction of what lbfgs needs
        lr = SGDClassifier(loss="log_loss", alpha=alpha, max_iter=100, tol=1e-4, random_state=seed)
        lr.fit(model.features(texts), list(labels))
        model.classes = [str(c) for c in lr.classes_]
        model.coef = lr.coef_.astype(np.float32)
        model.intercept = lr.intercept_.astype(np.float32)
        return model

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(n_texts, n_classes) probabilities, columns in `classes` order (softmax over the one-vs-rest
        scores when there are more than two classes)."""
        logits = np.asarray(self.features(texts) @ self.coef.T, dtype=np.float64) + self.intercept
        if len(self.classes) == 2:
            p = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            return np.stack([1.0 - p, p], axis=1)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(texts).argmax(axis=1)]

    def save(self, path: str | Path) -> Path:
        header = {"format": FORMAT, "classes": self.classes, "n_features": self.n_features, "ngrams": self.ngrams,
                  "max_chars": self.max_chars, "info": self.info}
        return write_npz(path, header, coef=self.coef, intercept=self.intercept)

    @classmethod
    def load(cls, path: str | Path) -> HashedLinearClassifier:
        header, arrays = read_npz(path, FORMAT, ("coef", "intercept"), "classifier")
        return cls(classes=header["classes"], coef=arrays["coef"], intercept=arrays["intercept"], n_features=header["n_features"],
                   ngrams=header["ngrams"], max_chars=header["max_chars"], info=header["info"])


def write_npz(path: str | Path, header: dict, **arrays) -> Path:
    """Arrays and a JSON header in one .npz, written atomically; read back without pickle by read_npz."""
    from herd.atomic import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, header=np.array(json.dumps(header)), **arrays)
    return path


class _Bomb(ValueError):
    pass


def _not_a_bomb(path: Path, what: str) -> None:
    """Refuse an archive whose arrays would expand past 1 GiB at over 64 times its size: a 1.5 MB file had expanded
    to 1.5 GiB in memory (30 MB would have passed this machine's). A classifier of herd's own with many hashed
    features (64 MiB of mostly zeros, 70 KB written) stays under it."""
    if not zipfile.is_zipfile(path):
        return  # numpy says what it is instead
    with zipfile.ZipFile(path) as archive:
        expanded = sum(member.file_size for member in archive.infolist())
    if expanded > max(1 << 30, 64 * path.stat().st_size):
        raise _Bomb(f"{path}: not a herd {what} (its arrays would expand from {path.stat().st_size:,} bytes to "
                    f"{expanded:,}); write it again")


def read_npz(path: str | Path, fmt: str, keys: Sequence[str], what: str) -> tuple[dict, dict]:
    """(header, {key: array}) of a file write_npz wrote in format `fmt`; clear errors for a missing or foreign file."""
    try:
        _not_a_bomb(Path(path), what)
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            arrays = {k: z[k] for k in keys}
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except _Bomb:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError):  # a file cut short, or another kind of file
        raise ValueError(f"{path}: not a herd {what} (not a whole .npz archive: cut short, or another kind of "
                         "file); write it again") from None
    except (ValueError, KeyError, OSError) as e:
        # numpy's advice for a file that is no .npz at all is to unpickle it, which is not ours to pass on
        reason = "not an .npz archive" if "pickle" in str(e) else e
        raise ValueError(f"{path}: not a herd {what} ({reason})") from None
    if header.get("format") != fmt:
        raise ValueError(f"{path}: unsupported {what} format {header.get('format')!r}")
    return header, arrays


@lru_cache(maxsize=8)
def _load_cached(path: str, inode: int, mtime_ns: int, size: int) -> HashedLinearClassifier:
    return HashedLinearClassifier.load(path)


def _model(path: str) -> HashedLinearClassifier:
    # once per process and version of the file, so a model retrained into the same path is read again (a save
    # renames a new file into place: a new inode, whatever the clock's resolution); the stage itself stays a small
    # picklable config
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"classifier not found: {path}") from None
    return _load_cached(path, st.st_ino, st.st_mtime_ns, st.st_size)


def _checked_model(path: str) -> HashedLinearClassifier:
    """The classifier a stage names, read when the stage is made: a missing or damaged file is a configuration
    error before any worker starts, not one in every worker."""
    try:
        return _model(str(path))
    except OSError as e:  # not found or unreadable (a damaged file is read_npz's ValueError already)
        raise ValueError(f"path: {e}") from None


@dataclass(frozen=True)
class TrainResult:
    model: HashedLinearClassifier
    accuracy: float  # on the held-out part
    n_train: int
    n_test: int


def train(texts: Sequence[str], labels: Sequence[str | None], task: str, holdout: float = 0.2,
          seed: int = 0) -> TrainResult:
    """Fit on a seeded split of the labelled texts (unparsed labels skipped) and measure held-out accuracy. The split
    is stratified: each label gives `holdout` of its texts, and keeps one at least to train on (a split of the
    whole had held out both texts of a label of two, and training then had one label)."""
    pairs = [(t, lab) for t, lab in zip(texts, labels) if lab is not None]
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    if len(pairs) >= 10:
        for label in sorted({lab for _, lab in pairs}):
            members = [i for i, (_, lab) in enumerate(pairs) if lab == label]
            held.update(int(i) for i in rng.permutation(members)[:min(int(len(members) * holdout), len(members) - 1)])
    test = [pairs[i] for i in sorted(held)]
    train_pairs = [p for i, p in enumerate(pairs) if i not in held]
    n_test = len(test)
    model = HashedLinearClassifier.fit([t for t, _ in train_pairs], [lab for _, lab in train_pairs], seed=seed,
                                       info={"task": task})
    accuracy = float(np.mean([p == lab for p, (_, lab) in zip(model.predict([t for t, _ in test]), test)])) \
        if test else float("nan")
    model.info.update({"n_train": len(train_pairs), "n_test": n_test, "heldout_accuracy": accuracy,
                       "label_counts": {c: sum(lab == c for _, lab in pairs) for c in sorted({p[1] for p in pairs})}})
    return TrainResult(model, accuracy, len(train_pairs), n_test)


# --- the stages ---------------------------------------------------------------------------------------


@dataclass
class QualityClassifier:
    """Scores every document P(high quality) into doc.scores["quality"]; drops those below `threshold`."""

    path: str
    threshold: float = 0.5
    positive: str = "high"
    name: str = "quality_classifier"

    def __post_init__(self):
        require(self, FRACTION, "threshold")
        classes = _checked_model(self.path).classes
        if self.positive not in classes:
            raise ValueError(f"positive {self.positive!r} is not one of the classifier's classes "
                             f"({', '.join(classes)})")

    def __call__(self, docs: list[Document]) -> StageResult:
        model = _model(str(self.path))
        column = model.classes.index(self.positive)
        probs = model.predict_proba([d.text for d in docs])[:, column]
        kept, dropped = [], []
        for doc, p in zip(docs, probs):
            doc = replace(doc, scores={**doc.scores, "quality": round(float(p), 6)})
            if p >= self.threshold:
                kept.append(doc)
            else:
                dropped.append(Dropped(doc.id, self.name, "low_quality", doc.url))
        return StageResult(kept, dropped)


@dataclass
class DomainClassifier:
    """Labels every document with a domain (doc.meta["domain"], probabilities in doc.scores) for the mix.

    A document the language stage identified as a natural language other than English, with at least
    `min_lang_score` confidence (the language stage's own gate), is "multilingual" whatever its topic: that is
    what the multilingual share of the Llama 3 mix measures. A weak guess (code, formulas and JSON get ones like
    zxx at 0.03) leaves the domain to the classifier.
    """

    path: str
    non_english_is_multilingual: bool = True
    min_lang_score: float = MIN_SCORE
    name: str = "domain_classifier"
    sets_domain = True  # tells the pipeline the data mix has labels to work with

    def __post_init__(self):
        require(self, FRACTION, "min_lang_score")
        _checked_model(self.path)

    @property
    def domains(self) -> list[str]:
        """Every domain this stage can label a document with."""
        extra = ["multilingual"] if self.non_english_is_multilingual else []
        return sorted({*_model(str(self.path)).classes, *extra})

    def __call__(self, docs: list[Document]) -> StageResult:
        model = _model(str(self.path))
        probs = model.predict_proba([d.text for d in docs])
        labelled = []
        for doc, row in zip(docs, probs):
            domain = model.classes[int(row.argmax())]
            lang = identified(doc, self.min_lang_score)
            if self.non_english_is_multilingual and lang and not lang.startswith("en"):
                domain = "multilingual"
            scores = {**doc.scores, **{f"domain_{c}": round(float(p), 6) for c, p in zip(model.classes, row)}}
            labelled.append(replace(doc, scores=scores, meta={**doc.meta, "domain": domain}))
        return StageResult(labelled, [])
