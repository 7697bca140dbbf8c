"""`herd data run`: read -> per-document stages -> de-duplication barriers -> classifiers -> mix -> shards.

The stage list is cut at every de-duplication stage into rounds. In round k each work unit (a slice of
`docs_per_unit` documents of one input file) loads its documents as round k-1 left them, applies
de-duplication k-1's global plan, runs the per-document stages up to de-duplication k, and computes that
stage's keys; the main process then plans de-duplication k over all keys in document order (first
occurrence kept). The last round tokenizes. Every unit's output is a set of files under `DIR/work`,
its `.done.json` written last and atomically, so a re-run skips whatever is finished and, everything
being a pure function of the inputs and the configuration, writes byte-identical outputs.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import pickle
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from herd.data.config import PipelineConfig, check_mix_domains, validate
from herd.data.document import Document, Dropped, StageResult
from herd.atomic import atomic_output
from herd.data.executors import Executor, LocalExecutor
from herd.data.mix import MixItem, content_key, plan_mix
from herd.data.readers import STAGE as READ
from herd.data.readers import doc_id, read
from herd.data.report import CHART, REPORT, Tally, build_report, chart
from herd.data.shards import ShardWriter, TOKEN_DTYPE, encode_document, load_tokenizer

KEPT = "kept.jsonl"
DROPPED = "dropped.jsonl"
WORK = "work"
MIX_STAGE = "mix"


class PipelineError(RuntimeError):
    pass


# --- the stages, built once per process ------------------------------------------------------------


def is_dedup(stage: Any) -> bool:
    return all(callable(getattr(stage, m, None)) for m in ("keys", "plan", "apply"))


@dataclass
class Stages:
    segments: list[list[Any]]  # per-document stages of round k
    dedups: list[Any]  # the barrier ending round k

    @property
    def names(self) -> list[str]:
        out = []
        for k, segment in enumerate(self.segments):
            out += [s.name for s in segment]
            if k < len(self.dedups):
                out.append(self.dedups[k].name)
        return out

    @property
    def has_domains(self) -> bool:
        return any(getattr(s, "sets_domain", False) for seg in self.segments for s in seg)

    @property
    def domains(self) -> set[str] | None:
        """Every domain the stages can label a document with; None where a stage that labels does not say."""
        labellers = [s for seg in self.segments for s in seg if getattr(s, "sets_domain", False)]
        if not labellers or not all(hasattr(s, "domains") for s in labellers):
            return None
        return {d for s in labellers for d in s.domains}


_built: dict[str, Stages] = {}


def build_stages(config: PipelineConfig) -> Stages:
    key = config.fingerprint()
    if key not in _built:
        segments: list[list[Any]] = [[]]
        dedups: list[Any] = []
        for spec in config.stages:
            stage = spec.build()
            if is_dedup(stage):
                dedups.append(stage)
                segments.append([])
            else:
                segments[-1].append(stage)
        names = [s.name for seg in segments for s in seg] + [d.name for d in dedups]
        if len(set(names)) != len(names) or READ in names or MIX_STAGE in names:
            raise PipelineError(f"stage names must be unique and not {READ!r}/{MIX_STAGE!r}: {names}")
        _built[key] = Stages(segments, dedups)
    return _built[key]


# --- files of the work directory ---------------------------------------------------------------------


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, obj: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def _write_pickle(path: Path, obj: Any) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)


def _load_docs(path: Path) -> list[Document]:
    return [Document(**r) for r in _read_jsonl(path)]


def _dropped_record(d: Dropped, meta: dict | None = None) -> dict:
    record = {"id": d.id, "stage": d.stage, "reason": d.reason, "url": d.url, "source": d.source}
    return record | _meta(meta or {})


def _meta(meta: dict) -> dict:
    """A document's metadata as outputs carry it: the input record's other fields (and what stages noted), as
    datatrove's writers keep them; `domain` has its own key in kept.jsonl."""
    rest = {k: v for k, v in meta.items() if k != "domain"}
    return {"meta": rest} if rest else {}


_plans: dict[tuple[str, int], Any] = {}


def _load_plan(path: Path) -> Any:
    # plans can be large; each worker process reads one once, not once per unit
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _plans:
        _plans.clear()
        with open(path, "rb") as fh:
            _plans[key] = pickle.load(fh)
    return _plans[key]


@dataclass(frozen=True)
class Task:
    """One work unit of one round, as a worker receives it (small and picklable)."""

    work: str
    config: PipelineConfig
    round: int  # -1: read an input file
    unit: str
    source: str  # the input file (round -1) or the unit's documents as the previous round left them

    def path(self, suffix: str, round: int | None = None) -> Path:
        r = self.round if round is None else round
        return Path(self.work) / ("read" if r < 0 else f"r{r}") / f"{self.unit}.{suffix}"


# --- the per-unit work -------------------------------------------------------------------------------


def read_unit(task: Task) -> None:
    """Split one input file into work units of `docs_per_unit` documents; record what the reader dropped."""
    tally, dropped, units = Tally(), [], []
    batch: list[Document] = []

    def flush() -> None:
        name = f"{task.unit}-{len(units):05d}"
        _write_jsonl(Path(task.work) / "read" / f"{name}.docs.jsonl", (d.__dict__ for d in batch))
        units.append(name)
        batch.clear()

    def items() -> Iterator[Document | Dropped]:
        try:
            yield from read(task.source, task.config.html_extractor, task.config.text_key)
        except Exception as e:  # an unforeseen failure costs the rest of this file, reported, not the run
            yield Dropped(doc_id(f"{task.source}:unreadable"), READ, f"unreadable:{type(e).__name__}",
                          source=task.source)

    for item in items():
        if isinstance(item, Dropped):
            tally.add_read(0)
            tally.add_dropped(READ, item.reason, None, None, 0, 0, {"id": item.id, "source": item.source, "text": None})
            dropped.append(_dropped_record(item))
            continue
        tally.add_read(len(item.text.encode("utf-8")))
        batch.append(item)
        if len(batch) == task.config.docs_per_unit:
            flush()
    if batch:
        flush()
    _write_jsonl(task.path("dropped.jsonl"), dropped)
    _write_json(task.path("done.json"), {"units": units, "tally": tally.to_dict()})


def process_unit(task: Task) -> None:
    """Round k of one unit: apply the previous plan, run the round's stages, key or tokenize the result."""
    config, k = task.config, task.round
    stages = build_stages(config)
    tokenizer = load_tokenizer(config.shards.tokenizer)
    docs = _load_docs(Path(task.source))
    tally, dropped = Tally(), []

    def run(stage: Any, result_of) -> None:
        nonlocal docs
        before = {d.id: d for d in docs}
        result: StageResult = result_of(docs)
        _check_accounting(stage.name, before, result)
        for d in result.dropped:
            doc = before[d.id]
            tokens = len(encode_document(tokenizer, doc.text, config.shards)) if doc.text else 0
            tally.add_dropped(stage.name, d.reason, doc.lang, doc.meta.get("domain"), tokens,
                              len(doc.text.encode("utf-8")), {"id": doc.public_id, "source": doc.source,
                                                              "text": doc.text})
            dropped.append(_dropped_record(dataclasses.replace(d, id=doc.public_id, stage=stage.name,
                                                               source=doc.source), doc.meta))
        docs = result.kept

    if k > 0:
        dedup = stages.dedups[k - 1]
        plan = _load_plan(Path(task.work) / "plans" / f"{k - 1}.pkl")
        run(dedup, lambda batch: dedup.apply(batch, plan))
    for stage in stages.segments[k]:
        if docs:
            run(stage, stage)
    _write_jsonl(task.path("docs.jsonl"), (d.__dict__ for d in docs))
    _write_jsonl(task.path("dropped.jsonl"), dropped)
    done: dict[str, Any] = {"tally": tally.to_dict()}
    if k < len(stages.dedups):
        _write_pickle(task.path("keys.pkl"), stages.dedups[k].keys(docs) if docs else [])
    else:
        encoded = [encode_document(tokenizer, d.text, config.shards) for d in docs]
        offsets = np.zeros(len(encoded) + 1, dtype=np.uint64)
        np.cumsum([len(t) for t in encoded], out=offsets[1:])
        with atomic_output(task.path("tokens.npy")) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.concatenate(encoded) if encoded else np.zeros(0, TOKEN_DTYPE))
        with atomic_output(task.path("offsets.npy")) as tmp, open(tmp, "wb") as fh:
            np.save(fh, offsets)
        done["mix"] = [[d.id, d.meta.get("domain") or "general", len(t), content_key(d.text)]
                       for d, t in zip(docs, encoded)]
        done["names"] = [d.public_id for d in docs]  # what the shards name each document by, as kept.jsonl does
    _write_json(task.path("done.json"), done)


def _check_accounting(name: str, before: dict[str, Document], result: StageResult) -> None:
    """Every document a stage receives comes back exactly once, kept or dropped: nothing vanishes."""
    out = [d.id for d in result.kept] + [d.id for d in result.dropped]
    if len(out) != len(before) or set(out) != set(before):
        missing = set(before) - set(out)
        raise PipelineError(f"stage {name!r} returned {len(out)} documents for {len(before)} "
                            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(set(out) - set(before))[:5]})")


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    out: Path
    report: dict[str, Any]
    manifest: dict[str, Any]
    # an input read only in part, or not at all; a mix shrunk by a scarce domain
    warnings: list[str] = dataclasses.field(default_factory=list)


def run(inputs: list[Path], out: str | Path, config: PipelineConfig, executor: Executor | None = None) -> RunResult:
    """Run the pipeline over `inputs` into `out`, resuming whatever an earlier run there finished."""
    validate(config)
    # Configuration errors surface here, before any worker starts and before the directory is claimed (a run that
    # never started must not hold its --out against the corrected configuration).
    stages = build_stages(config)
    check_mix_domains(config.mix, stages.domains)
    load_tokenizer(config.shards.tokenizer)
    out = Path(out)
    work = out / WORK
    inputs = [Path(p) for p in inputs]
    _claim(work, config, inputs)
    own_executor = executor is None
    executor = executor or LocalExecutor()
    try:
        units = _read_round(executor, work, config, inputs)
        try:
            warnings = _read_problems(work, inputs)
        except PipelineError:
            # A run of nothing leaves nothing worth resuming: its claim had refused the corrected inputs this --out.
            shutil.rmtree(work)
            raise
        for k in range(len(stages.segments)):
            source = "read" if k == 0 else f"r{k - 1}"
            tasks = [Task(str(work), config, k, u, str(work / source / f"{u}.docs.jsonl")) for u in units]
            name = stages.dedups[k - 1].name if k else "filter"
            _map_unfinished(executor, process_unit, tasks, f"round {k + 1}/{len(stages.segments)} ({name})")
            if k < len(stages.dedups):
                _plan(work, k, stages.dedups[k], units)
    finally:
        if own_executor:
            executor.close()
    finished = _finish(out, work, config, stages, inputs, units)
    return dataclasses.replace(finished, warnings=warnings + finished.warnings)


def _claim(work: Path, config: PipelineConfig, inputs: list[Path]) -> None:
    """Mark the directory as this configuration's run; refuse to resume a different one."""
    claim = {"config": config.fingerprint(contents=True), "inputs": [str(p) for p in inputs]}
    path = work / "run.json"
    if path.exists():
        if _read_json(path) != claim:
            raise PipelineError(f"{work.parent} holds a run with other inputs, another configuration or other files "
                                "its stages read; use a new --out directory")
        return
    _write_json(path, claim)


def _map_unfinished(executor: Executor, fn, tasks: list[Task], desc: str) -> None:
    todo = [t for t in tasks if not t.path("done.json").exists()]
    if todo:
        executor.map(fn, todo, desc)


def _read_round(executor: Executor, work: Path, config: PipelineConfig, inputs: list[Path]) -> list[str]:
    tasks = [Task(str(work), config, -1, f"{i:05d}", str(p)) for i, p in enumerate(inputs)]
    _map_unfinished(executor, read_unit, tasks, "read")
    return [u for t in tasks for u in _read_json(t.path("done.json"))["units"]]


# read drops that cost the rest of a file, not one record
_CUT = ("truncated_input", "unreadable")


def _read_problems(work: Path, inputs: list[Path]) -> list[str]:
    """A line per input that gave no document, or was cut short; a PipelineError where no input gave any, since a
    run of nothing (a mislabelled, binary or empty file) had finished as a success that wrote no data."""
    unread, problems = [], []
    for i, path in enumerate(inputs):
        tally = _read_json(work / "read" / f"{i:05d}.done.json")["tally"]
        docs = tally["read"]["docs"] - tally["dropped"].get(READ, {}).get("docs", 0)
        reasons = tally["reasons"].get(READ, {})
        said = ", ".join(r if n == 1 else f"{r} x{n}" for r, n in sorted(reasons.items())) or "no records"
        if docs == 0:
            unread.append(f"{path} ({said})")
            problems.append(f"no document could be read from {unread[-1]}")
        elif any(r in reasons for r in _CUT):
            problems.append(f"{path}: read only in part, {docs} documents before the file broke off ({said})")
    if inputs and len(unread) == len(inputs):
        more = f"; and {len(unread) - 3} more" if len(unread) > 3 else ""
        raise PipelineError(f"no document could be read from any input: {'; '.join(unread[:3])}{more}; give JSONL, "
                            "Parquet, text, HTML or WARC files, plain or in the compression their names say")
    return problems


def _plan(work: Path, k: int, dedup: Any, units: list[str]) -> None:
    path = work / "plans" / f"{k}.pkl"
    if path.exists():
        return

    def keyed() -> Iterator[Any]:
        for u in units:
            with open(work / f"r{k}" / f"{u}.keys.pkl", "rb") as fh:
                yield from pickle.load(fh)

    _write_pickle(path, dedup.plan(keyed()))


def _finish(out: Path, work: Path, config: PipelineConfig, stages: Stages, inputs: list[Path],
            units: list[str]) -> RunResult:
    """Gather the last round into the outputs: mix, kept/dropped JSONL, shards, manifest, report."""
    last = f"r{len(stages.segments) - 1}"
    done = {u: _read_json(work / last / f"{u}.done.json") for u in units}
    tally = Tally()
    for i in range(len(inputs)):
        tally.merge(Tally.from_dict(_read_json(work / "read" / f"{i:05d}.done.json")["tally"]))
    for k in range(len(stages.segments)):
        for u in units:
            record = done[u] if f"r{k}" == last else _read_json(work / f"r{k}" / f"{u}.done.json")
            tally.merge(Tally.from_dict(record["tally"]))

    mix_active = config.mix is not None and stages.has_domains
    plan = plan_mix((MixItem(*m) for u in units for m in done[u]["mix"]), config.mix) if mix_active else None

    tokenizer = load_tokenizer(config.shards.tokenizer)
    mix_dropped: list[dict] = []
    kept = {"docs": 0, "tokens": 0, "bytes": 0}

    def kept_records() -> Iterator[dict]:
        for u in units:
            for doc, (_, domain, n, _) in zip(_load_docs(work / last / f"{u}.docs.jsonl"), done[u]["mix"]):
                nbytes = len(doc.text.encode("utf-8"))
                repeats = plan.repeats[doc.id] if plan else 1
                if repeats == 0:
                    tally.add_dropped(MIX_STAGE, "downsampled", doc.lang, domain, n, nbytes,
                                      {"id": doc.public_id, "source": doc.source, "text": doc.text})
                    gone = Dropped(doc.public_id, MIX_STAGE, "downsampled", doc.url, doc.source)
                    mix_dropped.append(_dropped_record(gone, doc.meta))
                    continue
                tally.add_kept(doc.lang, domain if mix_active else doc.meta.get("domain"), n, nbytes)
                kept["docs"] += 1
                kept["tokens"] += n
                kept["bytes"] += nbytes
                record = {"id": doc.public_id, "url": doc.url, "text": doc.text, "lang": doc.lang, "scores": doc.scores}
                if "domain" in doc.meta:
                    record["domain"] = doc.meta["domain"]
                if plan:
                    record["repeats"] = repeats
                yield record | _meta(doc.meta)

    _write_jsonl(out / KEPT, kept_records())

    def dropped_records() -> Iterator[dict]:
        for i in range(len(inputs)):
            yield from _read_jsonl(work / "read" / f"{i:05d}.dropped.jsonl")
        for k, u in itertools.product(range(len(stages.segments)), units):
            yield from _read_jsonl(work / f"r{k}" / f"{u}.dropped.jsonl")
        yield from mix_dropped

    _write_jsonl(out / DROPPED, dropped_records())

    writer = ShardWriter(out, config.shards, tokenizer)
    max_repeats = max(plan.repeats.values(), default=0) if plan else 1
    # copy p of every document before copy p+1 of any, so repeats are an epoch apart, not adjacent
    for p in range(1, max_repeats + 1):
        for u in units:
            # mapped, not read: from the second pass on most documents are skipped
            tokens = np.load(work / last / f"{u}.tokens.npy", mmap_mode="r")
            offsets = np.load(work / last / f"{u}.offsets.npy", mmap_mode="r")
            for j, ((did, *_), name) in enumerate(zip(done[u]["mix"], done[u]["names"])):
                if (plan.repeats[did] if plan else 1) >= p:
                    writer.add(name, tokens[offsets[j]:offsets[j + 1]])
    manifest = writer.close()

    mix_report, shrunk = None, None
    if plan:
        shrunk = plan.shrunk_warning(config.mix.max_repeats)
        mix_report = {"targets": plan.targets, "achieved": plan.achieved(), "before": plan.before,
                      "after": plan.after, "seed": config.mix.seed, "limited_by": plan.limited_by, "warning": shrunk}
    names = [READ] + stages.names + ([MIX_STAGE] if plan else [])
    report = build_report(tally, names, kept, {"docs": manifest["documents"], "tokens": manifest["tokens"]},
                          mix_report)
    with atomic_output(out / REPORT) as tmp:
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with atomic_output(out / CHART) as tmp:
        chart(report, tmp)
    return RunResult(out, report, manifest, [shrunk] if shrunk else [])
