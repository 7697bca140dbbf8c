"""Where the pipeline's pure per-unit functions run: this machine's cores, or a Dask cluster.

An executor only maps a top-level function over work items and hands results back in item order; the
pipeline decides what a unit is and records finished ones, so every executor resumes the same way.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tqdm import tqdm

def cpu_count() -> int:
    """The cores this process may use (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Executor(Protocol):
    workers: int

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str) -> list[Any]: ...

    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="unit", disable=not enabled or total == 0, dynamic_ncols=True)


class LocalExecutor:
    """Every core of this machine, one process per worker; workers=1 runs in this process (easy to debug)."""

    def __init__(self, workers: int | None = None, progress: bool = True):
        self.workers = max(1, workers or cpu_count())
        self.progress = progress
        self._pool = None

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str) -> list[Any]:
        results: list[Any] = [None] * len(items)
        with _progress(len(items), desc, self.progress) as bar:
            if self.workers == 1 or len(items) <= 1:
                for i, item in enumerate(items):
                    results[i] = fn(item)
                    bar.update()
                return results
            if self._pool is None:
                # forkserver: a fork of a process that already runs threads (tqdm, BLAS, torch) can deadlock.
                self._pool = multiprocessing.get_context("forkserver").Pool(self.workers)
            indexed = [(fn, i, item) for i, item in enumerate(items)]
            for i, result in self._pool.imap_unordered(_call_indexed, indexed):
                results[i] = result
                bar.update()
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


def _call_indexed(job: tuple[Callable[[Any], Any], int, Any]) -> tuple[int, Any]:
    fn, i, item = job
    return i, fn(item)


class DaskExecutor:
    """The same functions on a dask.distributed cluster: a LocalCluster unless `address` names a running one.

    Workers must see the output directory (a shared filesystem on a real cluster), since units and plans
    are exchanged as files there.
    """

    def __init__(self, workers: int | None = None, address: str | None = None, processes: bool = True,
                 progress: bool = True):
        from dask.distributed import Client, LocalCluster

        self.workers = max(1, workers or cpu_count())
        self.progress = progress
        if address:
            self._cluster = None
            try:
                self._client = Client(address)  # Dask's connect timeout: distributed.comm.timeouts.connect
            except OSError as e:  # refused, unreachable, timed out: name the address, not a traceback
                raise RuntimeError(f"cannot reach the Dask scheduler at {address}: {e}; is dask-scheduler "
                                   "running there?") from None
        else:
            self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=processes,
                                         dashboard_address=None)
            self._client = Client(self._cluster)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str) -> list[Any]:
        from dask.distributed import as_completed

        futures = self._client.map(fn, list(items), pure=False)
        position = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(items)
        with _progress(len(items), desc, self.progress) as bar:
            for future in as_completed(futures):
                results[position[future.key]] = future.result()
                bar.update()
        return results

    def close(self) -> None:
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()


def make_executor(name: str, workers: int | None = None, progress: bool = True,
                  scheduler: str | None = None) -> Executor:
    """`scheduler` (a dask-scheduler's address, e.g. tcp://10.0.0.5:8786) implies the dask executor."""
    if scheduler and name not in ("local", "dask"):
        raise ValueError(f"--scheduler is a Dask scheduler's address; it does not go with --executor {name}")
    if name == "dask" or scheduler:
        return DaskExecutor(workers, address=scheduler, progress=progress)
    if name == "local":
        return LocalExecutor(workers, progress=progress)
    if name == "ray":
        raise ValueError("the ray executor is not available in this build; use --executor dask for a cluster")
    raise ValueError(f"unknown executor {name!r}; choose one of: local, dask")
