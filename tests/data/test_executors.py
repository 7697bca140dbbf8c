"""Resuming and distributing: an interrupted run, a failed run and a Dask run all end byte-identical to one
uninterrupted local run."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from herd.data import pipeline
from herd.data.config import ShardConfig, default_config, load_config
from herd.atomic import atomic_output
from herd.data.executors import LocalExecutor

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = ("kept.jsonl", "dropped.jsonl", "manifest.json", "report.json")


def config(**changes):
    # the byte tokenizer keeps these runs about orchestration, not BPE speed
    base = dataclasses.replace(default_config(), shards=ShardConfig(tokenizer="herd.data.shards:ByteTokenizer",
                                                                    max_tokens_per_shard=200_000), docs_per_unit=20)
    return dataclasses.replace(base, **changes)


def digests(out: Path) -> dict[str, str]:
    names = list(OUTPUTS) + sorted(p.name for p in out.glob("shard-*"))
    return {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names}


@pytest.fixture(scope="module")
def reference(planted_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    pipeline.run(planted_corpus.files, out, config(), LocalExecutor(workers=2, progress=False))
    result = digests(out)
    assert len([n for n in result if n.endswith(".bin")]) > 1  # several shards, so shard order is exercised
    return result


def test_atomic_output_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "unit.json"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


def test_local_executor_keeps_item_order():
    ex = LocalExecutor(workers=2, progress=False)
    try:
        assert ex.map(abs, [-3, 1, -2, 5, -8], "t") == [3, 1, 2, 5, 8]
    finally:
        ex.close()


def test_killed_run_resumes_to_identical_outputs(planted_corpus, reference, tmp_path):
    """SIGKILL a `herd data run` once its first units are on disk; a second run finishes the rest."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "herd.data.cli", "run", *map(str, planted_corpus.files), "--out", str(out),
           "--config", str(_toml(tmp_path)), "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "work" / "r0").glob("*.done.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "work" / "r0").glob("*.done.json")))
    units = len(list((out / "work" / "read").glob("*.docs.jsonl")))
    assert 0 < finished < units, "the kill should land mid-way"
    assert not (out / "kept.jsonl").exists()

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "work" / "r0").glob("*.done.json")}
    pipeline.run(planted_corpus.files, out, config(), LocalExecutor(workers=2, progress=False))
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())  # finished units were not redone
    assert digests(out) == reference


@dataclass
class FailOnce:
    """Raises on a given document while `flag` exists: a crash in the middle of a round."""

    flag: str
    doc: str
    name: str = "fail_once"

    def __call__(self, docs):
        from herd.data.document import StageResult

        if Path(self.flag).exists() and any(d.public_id == self.doc for d in docs):
            raise RuntimeError("injected failure")
        return StageResult(docs, [])


def test_failed_run_resumes_to_identical_outputs(planted_corpus, tmp_path):
    from herd.data.config import StageSpec

    flag = tmp_path / "fail"
    flag.touch()
    victim = planted_corpus.docs[len(planted_corpus.docs) // 2].id
    stages = (config().stages[0], StageSpec(f"{__name__}:FailOnce", {"flag": str(flag), "doc": victim}),
              *config().stages[1:])
    cfg = config(stages=stages)
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.run(planted_corpus.files, tmp_path / "a", cfg, LocalExecutor(workers=1, progress=False))
    done = len(list((tmp_path / "a" / "work" / "r0").glob("*.done.json")))
    assert done > 0
    flag.unlink()
    pipeline.run(planted_corpus.files, tmp_path / "a", cfg, LocalExecutor(workers=1, progress=False))
    pipeline.run(planted_corpus.files, tmp_path / "b", cfg, LocalExecutor(workers=1, progress=False))
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


def _toml(tmp_path: Path) -> Path:
    """The reference run's configuration as a PIPELINE.toml, for runs through the CLI."""
    toml = tmp_path / "p.toml"
    stages = "".join(f'[[stages]]\ntype = "{s.type}"\n' for s in config().stages)
    toml.write_text('docs_per_unit = 20\n[shards]\ntokenizer = "herd.data.shards:ByteTokenizer"\n'
                    f'max_tokens_per_shard = 200000\n{stages}')
    assert load_config(toml) == config()  # the same run as the reference, so the same outputs
    return toml


def _scheduler_address(info: Path, proc: subprocess.Popen, seconds: float = 120) -> str:
    """The address a starting dask-scheduler writes to its scheduler file (which appears before it is full)."""
    deadline = time.time() + seconds
    while True:
        assert proc.poll() is None, f"dask-scheduler exited with {proc.returncode}"
        assert time.time() < deadline, "dask-scheduler did not start"
        try:
            return json.loads(info.read_text())["address"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            time.sleep(0.1)


def test_dask_cluster_by_address_matches_the_local_executor(planted_corpus, reference, tmp_path):
    """A dask-scheduler and two dask-worker processes on 127.0.0.1, reached by `herd data run --scheduler`, the
    inputs and --out given relative to the CLI's directory, which is not the workers' (each worker had read them
    from its own: "no document could be read")."""
    info = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    common = ["--no-dashboard"]
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--scheduler-file", str(info), *common], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        address = _scheduler_address(info, procs[0])
        assert address.startswith("tcp://127.0.0.1:")
        (tmp_path / "workers").mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "2",
                                       "--nthreads", "1", "--host", "127.0.0.1", *common], cwd=tmp_path / "workers",
                                      env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        out = tmp_path / "out"
        here = planted_corpus.files[0].parent
        cmd = [sys.executable, "-m", "herd.data.cli", "run", *(os.path.relpath(f, here) for f in planted_corpus.files),
               "--out", os.path.relpath(out, here), "--config", str(_toml(tmp_path)), "--scheduler", address, "--quiet"]
        result = subprocess.run(cmd, cwd=here, capture_output=True, text=True, timeout=900,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr[-2000:]
        assert digests(out) == reference
        # the work ran in the worker processes, not in the CLI's: they were the ones to import herd's stages
        from distributed import Client

        with Client(address, timeout=30) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            loaded = client.run(lambda: "herd.data.pipeline" in sys.modules)
        assert len(loaded) == 2 and all(loaded.values())
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_unreachable_scheduler_is_one_clear_line(planted_corpus, tmp_path):
    cmd = [sys.executable, "-m", "herd.data.cli", "run", str(planted_corpus.files[0]), "--out", str(tmp_path / "o"),
           "--scheduler", "tcp://127.0.0.1:9", "--quiet"]
    # Dask's own connect timeout (30 s by default) cut short, as a user may set it too
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stderr
