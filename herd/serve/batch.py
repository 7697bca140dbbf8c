"""`herd batch`: a file of requests in OpenAI's batch input format, answered in OpenAI's batch output format.

Every request goes through the server's own FastAPI app, in-process (httpx's ASGITransport), so a line is answered
as `herd serve` answers the same body: the same validation, the same response and the same 4xx error body. The
requests are sent concurrently, a bounded number at once, so that the engine batches them as it batches a server's
clients.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from herd.atomic import atomic_output
from herd.rows import DataError, read_jsonl
from herd.serve.protocol import APIError

URLS = ("/v1/chat/completions", "/v1/completions")
AHEAD = 8


@dataclass(frozen=True)
class BatchRequest:
    """One line of the input: where it is (FILE:LINE, for errors), its id, the route and the request's body."""

    where: str
    custom_id: str
    url: str
    body: Any


@dataclass
class BatchSummary:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.completion_tokens / self.seconds if self.seconds else 0.0
        return (f"{self.requests} requests: {self.succeeded} succeeded, {self.failed} failed; "
                f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens in {self.seconds:.1f} s "
                f"({rate:.1f} completion tokens/s)")


@dataclass(frozen=True)
class BatchFile:
    """A checked batch input file. Its requests are read again, a line at a time, as they are answered, so that a
    file of any size is never held in memory whole."""

    path: Path
    count: int

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[BatchRequest]:
        return _requests(self.path)


def read_batch(path: str | Path) -> BatchFile:
    """A batch input file, every line checked as OpenAI checks a batch file before it runs: a DataError naming the
    first bad line and what to fix. A body is the server's to judge, line by line."""
    count = sum(1 for _ in _requests(Path(path)))
    return BatchFile(Path(path), count)


def _requests(path: Path) -> Iterator[BatchRequest]:
    seen: dict[str, str] = {}
    for where, row in read_jsonl(path):
        custom_id = row.get("custom_id")
        if custom_id is None:
            raise DataError(f'{where}: no "custom_id"; give every request a custom_id of its own (a string)')
        if not isinstance(custom_id, str):
            raise DataError(f"{where}: custom_id must be a string, got {json.dumps(custom_id)}")
        if not _utf8(custom_id):
            # the output file, UTF-8, could not hold it: the whole batch had run, then been lost on writing it
            raise DataError(f"{where}: custom_id {json.dumps(custom_id)} holds a lone surrogate (\\ud800-\\udfff), "
                            "which UTF-8 cannot write; give it as text")
        if custom_id in seen:
            raise DataError(f"{where}: custom_id {json.dumps(custom_id)} is already used at {seen[custom_id]}; "
                            "give every request a custom_id of its own")
        seen[custom_id] = where
        if row.get("method") != "POST":
            raise DataError(f'{where}: method {json.dumps(row.get("method"))} is not supported; give "POST"')
        if row.get("url") not in URLS:
            raise DataError(f"{where}: url {json.dumps(row.get('url'))} is not supported; give "
                            + " or ".join(f'"{url}"' for url in URLS))
        if "body" not in row:
            raise DataError(f'{where}: no "body"; give the request as "body": {{"model": ..., ...}}')
        yield BatchRequest(where, custom_id, row["url"], row["body"])


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


async def answer_batch(app, requests: Iterable[BatchRequest], out: Path, *, concurrency: int,
                       progress: bool = True) -> BatchSummary:
    """Answer `requests` through the ASGI `app` (within its lifespan), `concurrency` at a time, writing one output
    line per request, in input order, to `out`: atomically, so that an interrupted run leaves no file. Requests
    are started up to `AHEAD` times `concurrency` past the oldest one unwritten: a long one holds back that many
    answers, not the whole file's."""
    import httpx
    from tqdm import tqdm

    summary = BatchSummary()
    started = time.perf_counter()
    limit = asyncio.Semaphore(concurrency)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://herd", timeout=None) as client:

        async def answer(request: BatchRequest) -> dict[str, Any]:
            async with limit:
                line = await _answer(client, request)
            # Counted in the task itself: a done-callback runs only later, and the last ones after the bar had closed.
            bar.update()
            return line

        total = len(requests) if isinstance(requests, Sized) else None
        with atomic_output(out) as tmp, tmp.open("w", encoding="utf-8") as file, \
                tqdm(total=total, desc="batch", unit="req", dynamic_ncols=True, disable=not progress) as bar:
            waiting, unstarted = deque(), iter(requests)

            def start() -> None:
                for request in islice(unstarted, AHEAD * concurrency - len(waiting)):
                    waiting.append(asyncio.ensure_future(answer(request)))

            try:
                start()
                while waiting:  # in input order: a line waits for those before it, not for those after
                    line = await waiting.popleft()
                    summary.requests += 1
                    _count(summary, line)
                    file.write(json.dumps(line, ensure_ascii=False) + "\n")
                    start()
            finally:  # interrupted: every request's sequences leave the engine before it closes
                for task in waiting:
                    task.cancel()
                await asyncio.gather(*waiting, return_exceptions=True)
    summary.seconds = time.perf_counter() - started
    return summary


async def _answer(client, request: BatchRequest) -> dict[str, Any]:
    """The output line of one request: the route's status and body, as a client of the server would get them; a
    failure with no HTTP answer in `error`, as OpenAI reports those."""
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request.custom_id, "response": None, "error": None}
    if isinstance(request.body, dict) and request.body.get("stream") is True:
        # A batch has no client to stream to (vLLM's run-batch refuses it too); answered as the server's 400s are.
        error = APIError(400, "stream is not supported in a batch: leave it out or set it to false", param="stream",
                         code="invalid_value")
        status, body = error.status, error.body()
    else:
        try:
            reply = await client.post(request.url, content=json.dumps(request.body).encode(),
                                      headers={"content-type": "application/json"})
            status, body = reply.status_code, reply.json()
        except Exception as error:  # noqa: BLE001 - one request's failure is its line's, not the batch's
            line["error"] = {"code": "request_failed", "message": f"{type(error).__name__}: {error}"}
            return line
    line["response"] = {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}
    return line


def _count(summary: BatchSummary, line: dict[str, Any]) -> None:
    response = line["response"]
    if response is None or response["status_code"] != 200:
        summary.failed += 1
        return
    summary.succeeded += 1
    usage = response["body"].get("usage") or {}
    summary.prompt_tokens += usage.get("prompt_tokens", 0)
    summary.completion_tokens += usage.get("completion_tokens", 0)


def run_batch(llm, requests: Iterable[BatchRequest], out: Path, settings=None, *, concurrency: int,
              progress: bool = True) -> BatchSummary:
    """Answer `requests` with a server app on `llm` (`settings`: a ServeSettings), written to `out`. The app's
    lifespan starts the engine's thread and closes it at the end, as a server's does."""
    from herd.serve.app import create_app

    return asyncio.run(answer_batch(create_app(llm, settings), requests, out, concurrency=concurrency,
                                    progress=progress))
