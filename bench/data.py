"""herd's data pipeline against datatrove 0.10.1: the same Debian-derived corpus, the same cores, one run.

    .venv/bin/python bench/data.py [--docs 3000] [--workers N] [--work DIR]

Per stage (one core, in this process): each herd stage over the whole corpus beside datatrove's equivalent
step. Full pipeline (N workers): `herd data run`'s default pipeline over the JSONL corpus plus a WARC of
real HTML pages (herd's extractor), tokenization into shards included, beside datatrove's equivalent chain
of LocalPipelineExecutor runs (WarcReader + Trafilatura for the WARC).

    .venv/bin/python bench/data.py --extraction   # herd's HTML extractor beside trafilatura, per package
    .venv/bin/python bench/data.py --curves       # docs/data_minhash_scurve.png, docs/data_nsfw_density.png
 Throughput is documents/s and MB/s per
core. Where datatrove has no equivalent the row says so:
- language ID: datatrove's LanguageFilter needs fastText and a model download, so its chain uses
  py3langid (herd's model) through datatrove's LambdaFilter instead;
- URL de-duplication has no datatrove step; line de-duplication is compared with SentenceDedup, the
  nearest one; datatrove's chain writes JSONL, herd's also tokenizes with the Llama 3 tokenizer.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PY_HTML = Path("/usr/share/doc/python3.11/html")
DEBREF = Path("/usr/share/debian-reference")
BOILERPLATE = ["Subscribe to our newsletter for weekly updates", "Home | About | Blog | Contact | Privacy Policy",
               "This website uses cookies to improve your experience.", "Skip to main content"]


# --- the corpus ------------------------------------------------------------------------------------------


def _chunks(text: str, size: int = 3000) -> list[str]:
    out, cur = [], []
    for para in text.split("\n"):
        cur.append(para)
        if sum(len(p) for p in cur) > size:
            out.append("\n".join(cur))
            cur = []
    if cur and sum(len(p) for p in cur) > 200:
        out.append("\n".join(cur))
    return out


def build_corpus(root: Path, n_docs: int, n_files: int) -> list[Path]:
    """Real pages (Python's manual, the Debian Reference in its languages) cut into documents, with planted
    exact and near copies and boilerplate lines, written as `n_files` JSONL files (cached)."""
    files = [root / f"corpus-{i:02d}.jsonl" for i in range(n_files)]
    stamp = root / "corpus.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"docs": n_docs, "files": n_files, "version": 2}:
        return files
    from herd.data.readers import html_document

    rng = random.Random(0)
    pages = sorted(PY_HTML.rglob("*.html")) + sorted(DEBREF.glob("*.html"))
    if not pages:
        sys.exit(f"no Debian text found ({PY_HTML}, {DEBREF}): run scripts/test-fixtures.sh")
    docs = []
    for page in pages:
        doc = html_document(page.read_bytes(), page.stem, str(page))
        for i, text in enumerate(_chunks(doc.text) if doc else []):
            docs.append({"id": f"{page.parent.name}/{page.name}#{i}", "text": text,
                         "url": f"https://docs.example.org/{page.parent.name}/{page.stem}/{i}.html"})
        if len(docs) >= n_docs:
            break
    docs = docs[:n_docs]
    for d in rng.sample(docs, len(docs) // 5):
        d["text"] = "\n".join(rng.sample(BOILERPLATE, 2) + [d["text"]])
    planted = []
    for i, d in enumerate(rng.sample(docs, len(docs) // 20)):
        planted.append({"id": f"exact-{i}", "text": d["text"], "url": f"https://mirror.example.org/{i}"})
    for i, d in enumerate(rng.sample(docs, len(docs) // 20)):
        words = d["text"].split(" ")
        for j in rng.sample(range(len(words)), min(3, len(words))):
            words[j] = "changed"
        planted.append({"id": f"near-{i}", "text": " ".join(words), "url": f"https://copy.example.org/{i}"})
    docs = docs[: n_docs - len(planted)] + planted
    rng.shuffle(docs)
    root.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files):
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs[i::n_files])
    stamp.write_text(json.dumps({"docs": n_docs, "files": n_files, "version": 2}))
    return files


def build_warc(root: Path, n_pages: int) -> Path:
    """Real HTML pages (Python's manual, git's manual) as the HTTP responses of a gzipped WARC, so both full
    pipelines run their HTML extraction (herd's own extractor, datatrove's Trafilatura step) in the timing."""
    import io

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = root / "warc" / "pages.warc.gz"
    stamp = root / "warc" / "pages.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"pages": n_pages}:
        return path
    pages = (sorted((PY_HTML / "library").glob("*.html")) + sorted(Path("/usr/share/doc/git-doc").glob("*.html")))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for page in pages[:n_pages]:
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            url = f"https://docs.example.org/{page.parent.name}/{page.name}"
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(page.read_bytes()),
                                                          http_headers=http))
    stamp.write_text(json.dumps({"pages": n_pages}))
    return path


def load(files: list[Path]) -> list[dict]:
    return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines()]


# --- herd ------------------------------------------------------------------------------------------------


def herd_stage_times(records: list[dict], batch: int = 1000) -> dict[str, float]:
    """Seconds each default stage takes over the whole corpus on one core."""
    from herd.data.config import default_config
    from herd.data.document import Document
    from herd.data.pipeline import is_dedup

    docs = [Document(r["id"], r["text"], url=r.get("url")) for r in records]
    times = {}
    for spec in default_config().stages:
        stage = spec.build()
        batches = [docs[i:i + batch] for i in range(0, len(docs), batch)]
        start = time.perf_counter()
        if is_dedup(stage):
            plan = stage.plan(k for b in batches for k in stage.keys(b))
            results = [stage.apply(b, plan) for b in batches]
        else:
            results = [stage(b) for b in batches]
        times[stage.name] = time.perf_counter() - start
        print(f"  herd {stage.name}: {times[stage.name]:.1f}s", file=sys.stderr)
        assert sum(len(r.kept) + len(r.dropped) for r in results) == len(docs)
    return times


def herd_full(files: list[Path], out: Path, workers: int) -> float:
    from herd.data import pipeline
    from herd.data.config import default_config
    from herd.data.executors import LocalExecutor

    shutil.rmtree(out, ignore_errors=True)
    executor = LocalExecutor(workers, progress=False)
    start = time.perf_counter()
    try:
        pipeline.run(files, out, default_config(), executor)
    finally:
        executor.close()
    return time.perf_counter() - start


# --- datatrove -------------------------------------------------------------------------------------------


def _py3langid_filter():
    from datatrove.pipeline.filters import LambdaFilter

    def english(doc) -> bool:
        from herd.data.filters.language import identify

        lang, score = identify(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = lang, score
        return True  # label only, as herd's default language stage

    return LambdaFilter(english)


def datatrove_filters():
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter, URLFilter)
    from datatrove.pipeline.formatters import PIIFormatter

    return {"language": _py3langid_filter(), "gopher_repetition": GopherRepetitionFilter(),
            "gopher_quality": GopherQualityFilter(), "c4_quality": C4QualityFilter(),
            "fineweb_quality": FineWebQualityFilter(), "nsfw": URLFilter(), "pii": PIIFormatter()}


def _dedup_chains(src: Path, tmp: Path, tasks: int, chained: bool):
    """datatrove's multi-step de-duplications, each as the list of (pipeline, tasks) runs it needs; chained,
    each reads what the previous one wrote, otherwise all read `src`."""
    from datatrove.pipeline.dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups,
                                          MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature, SentenceDedupFilter, SentenceDedupSignature,
                                          SentenceFindDedups)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.dedup.sentence_dedup import SentDedupConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    mh = MinhashConfig()
    exact = ExactDedupConfig(content_getter=_text)
    lines = SentDedupConfig(split_sentences=False)  # spans of lines, the nearest to line de-duplication
    after_exact, after_minhash = (tmp / "exact", tmp / "minhash") if chained else (src, src)
    return {
        "exact_dedup": [
            ([JsonlReader(str(src)), ExactDedupSignature(str(tmp / "ex-sig"), exact)], tasks),
            ([ExactFindDedups(str(tmp / "ex-sig"), str(tmp / "ex-dups"), exact)], 1),
            ([JsonlReader(str(src)), ExactDedupFilter(str(tmp / "ex-dups"), exact), JsonlWriter(str(tmp / "exact"))],
             tasks)],
        "minhash_dedup": [
            ([JsonlReader(str(after_exact)), MinhashDedupSignature(str(tmp / "mh-sig"), mh)], tasks),
            ([MinhashDedupBuckets(str(tmp / "mh-sig"), str(tmp / "mh-buckets"), config=mh)], mh.num_buckets),
            ([MinhashDedupCluster(str(tmp / "mh-buckets"), str(tmp / "mh-ids"), config=mh)], 1),
            ([JsonlReader(str(after_exact)), MinhashDedupFilter(str(tmp / "mh-ids")),
              JsonlWriter(str(tmp / "minhash"))], tasks)],
        "line_dedup": [
            ([JsonlReader(str(after_minhash)), SentenceDedupSignature(str(tmp / "sd-sig"), config=lines)], tasks),
            ([SentenceFindDedups(str(tmp / "sd-sig"), str(tmp / "sd-dups"), config=lines)], 1),
            ([JsonlReader(str(after_minhash)), SentenceDedupFilter(str(tmp / "sd-dups"), config=lines),
              JsonlWriter(str(tmp / "final"))], tasks)],
    }


def _text(doc) -> bytes:
    return doc.text.encode("utf-8")


@contextlib.contextmanager
def _stderr_to(path: Path):
    """datatrove logs every task of every step to stderr, from its worker processes too: send it to a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    fd, saved = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), os.dup(2)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(fd)
        os.close(saved)


def _run_chain(chain, workers: int, logs: Path) -> None:
    from datatrove.executor import LocalPipelineExecutor

    with _stderr_to(logs / "stderr.log"):
        for i, (steps, tasks) in enumerate(chain):
            LocalPipelineExecutor(steps, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logs / f"{i}"),
                                  skip_completed=False).run()


def datatrove_stage_times(records: list[dict], src: Path, tmp: Path) -> dict[str, float]:
    from datatrove.data import Document as DTDocument

    docs = [DTDocument(text=r["text"], id=r["id"], metadata={"url": r.get("url")}) for r in records]
    times = {}
    for name, step in datatrove_filters().items():
        start = time.perf_counter()
        with _stderr_to(tmp / "logs" / "filters.log"):
            for _ in step.run(iter(docs)):
                pass
        times[name] = time.perf_counter() - start
        print(f"  datatrove {name}: {times[name]:.1f}s", file=sys.stderr)
    for name, chain in _dedup_chains(src, tmp, 1, chained=False).items():
        start = time.perf_counter()
        _run_chain(chain, 1, tmp / "logs" / name)
        times[name] = time.perf_counter() - start
    return times


def datatrove_full(src: Path, warc: Path, tmp: Path, workers: int) -> float:
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    # the WARC's pages extracted by datatrove's Trafilatura step, then read beside the JSONL documents
    extract = [([WarcReader(str(warc.parent), glob_pattern="*.warc.gz"), Trafilatura(),
                 JsonlWriter(str(tmp / "extracted"))], 1)]
    _run_chain(extract, workers, tmp / "logs" / "extract")
    filters = [([JsonlReader(str(src)), JsonlReader(str(tmp / "extracted")), *datatrove_filters().values(),
                 JsonlWriter(str(tmp / "filtered"))], workers)]
    _run_chain(filters, workers, tmp / "logs" / "filters")
    for name, chain in _dedup_chains(tmp / "filtered", tmp, workers, chained=True).items():
        _run_chain(chain, workers, tmp / "logs" / name)
    return time.perf_counter() - start


# --- HTML extraction --------------------------------------------------------------------------------------

# Debian documentation packages, each from another HTML generator. python3-doc is what the extractor was
# developed on; the others are held out.
DOC_PACKAGES = {
    "python3-doc (Sphinx)": "/usr/share/doc/python3.11/html/library/*.html",
    "git-doc (AsciiDoc)": "/usr/share/doc/git-doc/*.html",
    "bash-doc (Texinfo, man2html)": "/usr/share/doc/bash-doc/*.html",
    "debian-reference-fr (DocBook)": "/usr/share/debian-reference/*.fr.html",
    "python-sympy-doc (Sphinx imgmath)": "/usr/share/doc/python-sympy-doc/html/modules/**/*.html",
}


def _template_share(outputs: list[str]) -> float:
    """Share of output characters in lines that recur on over 30% of a package's pages: the site's template
    (menus, footers, notices) left in, found without knowing the site."""
    from collections import Counter

    per_page = [{s.strip() for s in o.split("\n") if len(s.strip()) >= 20} for o in outputs]
    seen = Counter(s for lines in per_page for s in lines)
    common = {s for s, c in seen.items() if c > 0.3 * len(outputs)} if len(outputs) >= 5 else set()
    total = sum(len(o) for o in outputs) or 1
    return sum(len(s) for o in outputs for s in o.split("\n") if s.strip() in common) / total


def extraction_table(packages: dict[str, str], limit: int) -> None:
    """herd's extractor beside trafilatura on every page of each package (up to `limit`): <pre> blocks
    recovered line for line, math-image alt texts kept, template text kept, and time per page."""
    import glob

    from herd.data.html import code_blocks, parse
    from herd.data.readers import EXTRACTORS

    header = (f"{'package':36} {'pages':>5} {'<pre>':>6} {'code kept herd':>15} {'trafilatura':>12} "
              f"{'math alt herd':>14} {'trafilatura':>12} {'template herd':>14} {'trafilatura':>12} "
              f"{'ms/page herd':>13} {'trafilatura':>12}")
    print(header)
    print("-" * len(header))
    for name, pattern in packages.items():
        pages = sorted(glob.glob(pattern, recursive=True))[:limit]
        if not pages:
            print(f"{name:36} not installed ({pattern}): run scripts/test-fixtures.sh")
            continue
        n_code = n_math = 0
        kept = {"herd": [0, 0], "trafilatura": [0, 0]}  # code blocks, math alts
        secs = {"herd": 0.0, "trafilatura": 0.0}
        outputs: dict[str, list[str]] = {"herd": [], "trafilatura": []}
        for page in pages:
            html = Path(page).read_bytes().decode("utf-8", errors="replace")
            tree = parse(html)
            blocks = code_blocks(tree)
            alts = [" ".join(a.split()) for a in tree.xpath("//img[contains(@class, 'math')]/@alt") if a.strip()]
            n_code += len(blocks)
            n_math += len(alts)
            for which in ("herd", "trafilatura"):
                start = time.perf_counter()
                # each extractor parses the page itself, as the reader runs it
                text = EXTRACTORS[which](parse(html) if which == "herd" else html, None) or ""
                secs[which] += time.perf_counter() - start
                outputs[which].append(text)
                kept[which][0] += sum(b in text for b in blocks)
                flat = " ".join(text.split())
                kept[which][1] += sum(a in flat for a in alts)
        pct = lambda k, n: f"{100 * k / n:.1f}%" if n else "-"  # noqa: E731
        print(f"{name:36} {len(pages):>5} {n_code:>6} {pct(kept['herd'][0], n_code):>15} "
              f"{pct(kept['trafilatura'][0], n_code):>12} {pct(kept['herd'][1], n_math):>14} "
              f"{pct(kept['trafilatura'][1], n_math):>12} {100 * _template_share(outputs['herd']):>13.1f}% "
              f"{100 * _template_share(outputs['trafilatura']):>11.1f}% {1000 * secs['herd'] / len(pages):>13.1f} "
              f"{1000 * secs['trafilatura'] / len(pages):>12.1f}")


# --- recall curves: near duplicates and adult content --------------------------------------------------

FORTUNES = Path("/usr/share/games/fortunes")


def _real_texts(n_words: int = 400) -> dict[str, list[str]]:
    """Real clean text per language, in documents of about `n_words` words: fortunes (en, de, es, it), the
    French Debian Reference, the Python manual (en)."""
    from herd.data.readers import read

    sources = {"en": ["fortunes", "literature", "science", "wisdom", "people"], "de": ["de/zitate", "de/wusstensie"],
               "es": ["es/sabiduria.fortunes", "es/filosofia.fortunes"], "it": ["it/italia", "it/definizioni"]}
    out: dict[str, list[str]] = {}
    for lang, files in sources.items():
        words = [w for f in files if (FORTUNES / f).exists()
                 for w in (FORTUNES / f).read_bytes().decode("utf-8", errors="replace").replace("\n%\n", " ").split()]
        out[lang] = [" ".join(words[i : i + n_words]) for i in range(0, len(words) - n_words, n_words)]
    french = [w for p in sorted(DEBREF.glob("ch0*.fr.html"))[:3] for d in read(p) for w in d.text.split()]
    out["fr"] = [" ".join(french[i : i + n_words]) for i in range(0, len(french) - n_words, n_words)]
    manual = [w for p in sorted((PY_HTML / "library").glob("*.html"))[:60] for d in read(p) for w in d.text.split()]
    out["en"] += [" ".join(manual[i : i + n_words]) for i in range(0, len(manual) - n_words, n_words)]
    return out


def minhash_curve(texts: list[str], seeds: range, path: Path) -> None:
    """Planted pairs at 5-gram Jaccard 0.5-1.0: the share found per similarity bin beside the theory."""
    import numpy as np

    from herd.data.dedup import MinHashDedup
    from herd.data.document import Document
    from herd.data.planted import near_duplicate

    stage = MinHashDedup()
    vocab = sorted({w for t in texts for w in t.split()})
    sims, found = [], []
    for seed in seeds:
        rng = random.Random(seed)
        docs = [Document(f"o{i}", t) for i, t in enumerate(texts)]
        truth = {}
        for i, t in enumerate(texts):
            edited, sim = near_duplicate(t, rng.uniform(0.5, 1.0), rng, vocab)
            docs.append(Document(f"c{i}", edited))
            truth[f"c{i}"] = (f"o{i}", sim)
        plan = stage.plan(k for k in stage.keys(docs))
        for c, (o, sim) in truth.items():
            sims.append(sim)
            found.append(plan.get(c) == o)
    sims, found = np.array(sims), np.array(found)
    edges = np.linspace(0.5, 1.0, 21)
    mids = (edges[:-1] + edges[1:]) / 2
    rate = [found[(sims >= lo) & (sims < hi)].mean() if ((sims >= lo) & (sims < hi)).any() else np.nan
            for lo, hi in zip(edges[:-1], edges[1:])]
    high, low = sims >= 0.8, sims < 0.6
    precision = found[sims >= 0.6].sum() / max(found.sum(), 1)
    print(f"minhash ({len(sims)} planted pairs, seeds {seeds.start}-{seeds.stop - 1}): recall at J >= 0.8 "
          f"{found[high].mean():.3f} ({high.sum()} pairs), dropped below 0.6 {found[low].mean():.3f} "
          f"({low.sum()} pairs), precision (dropped pairs with J >= 0.6) {precision:.3f}")
    grid = np.linspace(0.5, 1, 101)
    _plot(path, "MinHash near-duplicate detection (b=%d bands x r=%d rows, threshold %.2f)"
          % (stage.bands, stage.rows, stage.threshold), "5-gram Jaccard similarity of the planted pair",
          "share detected", [(mids, rate, "measured (planted pairs)", "o-"),
                             (grid, [stage.detection_probability(x) for x in grid],
                              "theory: (1-(1-s^r)^b) x P(estimate >= threshold)", "-")],
          hlines=[(0.95, "95%")], vlines=[0.6, 0.8])


def nsfw_curve(by_lang: dict[str, list[str]], clean_sensitive: list[str], path: Path) -> None:
    """Recall per density of planted terms (tuning and held-out halves), and the clean documents dropped."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests" / "data"))
    from test_nsfw import split_terms  # the tests' term halves: the curve shows what the tests assert

    from herd.data.filters import NSFWFilter
    from herd.data.document import Document
    from herd.data.planted import plant_terms

    stage = NSFWFilter()
    densities = [0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1]
    curves = []
    for half, label in ((0, "tuning terms"), (1, "held-out terms")):
        rng = random.Random(half)
        rates = []
        for dens in densities:
            docs = [Document(f"{lang}{i}", plant_terms(t, split_terms(lang)[half], dens, rng))
                    for lang, texts in by_lang.items() for i, t in enumerate(texts[:60])]
            rates.append(len(stage(docs).dropped) / len(docs))
        curves.append((np.array(densities) * 100, rates, label, "o-"))
        print(f"nsfw recall, {label}: " + ", ".join(f"{d:.1%}: {r:.2f}" for d, r in zip(densities, rates)))
    clean = [Document(f"c{i}", t) for i, t in enumerate([t for ts in by_lang.values() for t in ts] + clean_sensitive)]
    fpr = len(stage(clean).dropped) / len(clean)
    print(f"nsfw: {fpr:.4f} of {len(clean)} clean documents dropped ({len(clean_sensitive)} on sensitive topics)")
    curves.append((np.array(densities) * 100, [fpr] * len(densities), f"clean documents dropped ({len(clean)})", "--"))
    _plot(path, "NSFW filter: documents dropped vs density of planted terms (en, de, fr, es, it)",
          "planted explicit terms, % of words", "share of documents dropped", curves,
          hlines=[(0.9, "90%"), (0.01, "1%")], vlines=[3])


def _plot(path: Path, title: str, xlabel: str, ylabel: str, curves, hlines=(), vlines=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for xs, ys, label, style in curves:
        ax.plot(xs, ys, style, label=label, markersize=4)
    for y, label in hlines:
        ax.axhline(y, color="grey", lw=0.8, ls=":")
        ax.text(ax.get_xlim()[0], y, f" {label}", va="bottom", fontsize=8, color="grey")
    for x in vlines:
        ax.axvline(x, color="grey", lw=0.8, ls=":")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(-0.02, 1.02))
    ax.legend(loc="center right")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def curves(seeds: range) -> None:
    import gzip
    import re

    texts = _real_texts()
    minhash_curve([t for ts in texts.values() for t in ts][:300], seeds, ROOT / "docs" / "data_minhash_scurve.png")
    with gzip.open("/usr/share/dictd/gcide.dict.dz", "rt", encoding="utf-8", errors="replace") as fh:
        senses = [" ".join(s.split()) for s in fh.read(20_000_000).split("\n\n")
                  if re.search(r"\((Med|Anat|Physiol|Law|Biol|Zool|Surg)\.\)", s)]
    sensitive = [" ".join(senses[i : i + 8]) for i in range(0, len(senses) - 8, 8)]
    nsfw_curve(texts, sensitive, ROOT / "docs" / "data_nsfw_density.png")


# --- the table -------------------------------------------------------------------------------------------


def main() -> None:
    from herd.data.executors import cpu_count

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=min(cpu_count(), 8))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "herd-bench-data")
    ap.add_argument("--skip-stages", action="store_true", help="only the full pipelines")
    ap.add_argument("--extraction", action="store_true", help="only the HTML extraction table")
    ap.add_argument("--pages", type=int, default=300,
                    help="HTML pages in the full pipelines' WARC; per package in the extraction table")
    ap.add_argument("--curves", action="store_true", help="only the near-duplicate and NSFW curves (docs/*.png)")
    args = ap.parse_args()
    if args.extraction:
        extraction_table(DOC_PACKAGES, args.pages)
        return
    if args.curves:
        curves(range(0, 5))
        return

    files = build_corpus(args.work / "corpus", args.docs, n_files=max(args.workers, 4))
    records = load(files)
    mb = sum(len(r["text"].encode("utf-8")) for r in records) / 1e6
    n = len(records)
    print(f"corpus: {n:,} documents, {mb:.1f} MB of text, {len(files)} files; {args.workers} workers\n")

    rows = []
    if not args.skip_stages:
        print("timing each stage on one core ...", file=sys.stderr)
        ours = herd_stage_times(records)
        theirs = datatrove_stage_times(records, files[0].parent, args.work / "dt-stages")
        for name, seconds in ours.items():
            rows.append((f"stage {name}", 1, seconds, theirs.get(name)))
    print(f"full pipelines on {args.workers} workers ...", file=sys.stderr)
    warc = build_warc(args.work, args.pages)
    herd_s = herd_full(files + [warc], args.work / "herd-out", args.workers)
    dt_s = datatrove_full(files[0].parent, warc, args.work / "dt-full", args.workers)
    rows.append((f"full pipeline + {args.pages} pages", args.workers, herd_s, dt_s))

    # every stage row ran over the whole corpus, one core, in this process
    header = f"{'':26} {'cores':>5} {'herd docs/s/core':>17} {'herd MB/s/core':>15} " \
             f"{'datatrove docs/s/core':>22} {'datatrove MB/s/core':>20} {'herd/datatrove':>15}"
    print(header)
    print("-" * len(header))
    for name, cores, ours_s, theirs_s in rows:
        dt = (f"{n / theirs_s / cores:>22,.0f} {mb / theirs_s / cores:>20.2f} {theirs_s / ours_s:>14.1f}x"
              if theirs_s else f"{'no equivalent':>22} {'':>20} {'':>15}")
        print(f"{name:26} {cores:>5} {n / ours_s / cores:>17,.0f} {mb / ours_s / cores:>15.2f} {dt}")


if __name__ == "__main__":
    main()
