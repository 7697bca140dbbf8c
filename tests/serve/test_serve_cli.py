"""`herd serve` itself, as a user runs it: a subprocess that serves the default model and shuts down cleanly on
SIGTERM; bad flags, a missing model or a taken port end in one line on stderr and a non-zero exit."""
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from herd.generate import EngineConfig, Generator, SamplingParams

HERD = [sys.executable, "-m", "herd.cli"]
QUESTION = [{"role": "user", "content": "Name one primary colour."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_flags_missing_model_and_taken_port_fail_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["--bogus"], "--bogus"),
            (["--max-batch", "0"], "--max-batch"),
            (["--kv-cache-dtype", "int8"], "--kv-cache-dtype"),
            (["--timeout", "-1"], "--timeout must be above 0"),  # every reply had ended empty at once
            (["--timeout", "nan"], "--timeout must be above 0"),  # no reply had ever timed out
            (["--tools", "os:nope"], "os:nope"),  # an operator's function that is not there
            (["--api-key", ""], "--api-key: a key is empty"),  # an unset $KEY had let an empty Bearer in
            ([str(tmp_path / "missing.gguf")], "missing.gguf"),
            (["--port", str(port)], f"127.0.0.1:{port}"),
        ]
        # All at once: each is a process that starts Python and torch, then stops in one line.
        started = [subprocess.Popen([*HERD, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for args, _ in cases]
        for process, (args, fragment) in zip(started, cases):
            out, err = process.communicate(timeout=300)
            assert process.returncode != 0, (args, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("herd: error:") and fragment in lines[0], (args, err)
            assert "Traceback" not in err and not out


@pytest.mark.heavy
def test_serve_answers_health_models_and_chat_then_stops_cleanly(default_llm):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([*HERD, "serve", "--port", str(port), "--api-key", "k-123", "--max-batch", "4"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "herd serve did not come up"
            try:
                health = httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        key = {"Authorization": "Bearer k-123"}
        [model] = httpx.get(url + "/v1/models", headers=key).json()["data"]
        assert model["id"] == default_llm.name
        body = {"model": model["id"], "messages": QUESTION, "max_tokens": 8, "temperature": 0}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=120).status_code == 401
        answer = httpx.post(url + "/v1/chat/completions", json=body, headers=key, timeout=120)
        assert answer.status_code == 200, answer.text
        reply = answer.json()
        # The reference on an engine of its own, whose cache is as empty as the new server's: the shared engine's
        # holds other tests' chat-template blocks, and without VNNI a prompt's BLAS rounding depends on how many of
        # its rows are computed.
        fresh = Generator(default_llm.model, default_llm.tokenizer, config=EngineConfig(kv_cache_bytes=1))
        expected = fresh.generate([default_llm.chat_prompt(QUESTION)], SamplingParams(max_tokens=8, temperature=0))
        assert reply["choices"][0]["message"]["content"] == expected[0].text
        assert reply["usage"]["completion_tokens"] > 0
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    # uvicorn raises the signal again once it has shut down, which ends the process
    assert process.returncode == -signal.SIGTERM, err
    assert f"on http://127.0.0.1:{port}" in out and "Traceback" not in err


@pytest.mark.heavy
def test_a_stop_cuts_off_requests_still_running_after_the_shutdown_timeout(default_llm):
    """SIGTERM let every request in flight run to its end: up to --timeout (600 s), past any orchestrator's grace
    period, after which the server was killed. --shutdown-timeout bounds the wait; the process then ends on the
    signal, as it would without herd (each request cut off had printed a traceback, and Ctrl-C exited 0)."""
    # Ctrl-C ignored, as a background job of a script inherits it: uvicorn takes it all the same, and so must the
    # process's end (SIGTERM's is the first test's)
    stop = signal.SIGINT
    process = subprocess.Popen([*HERD, "serve", "--port", "0", "--shutdown-timeout", "1", "--access-log"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    tok = default_llm.tokenizer
    never_stop = {str(t): -100 for t in tok.stop_ids}  # a reply of 4,000 tokens: half a minute here at least
    body = {"model": default_llm.name, "prompt": "Once upon a time", "max_tokens": 4000, "stream": True,
            "logit_bias": never_stop}
    try:
        # the port the system chose, printed once the socket listens: no waiting for /health
        url = re.search(r"on (http://127\.0\.0\.1:[1-9][0-9]*) ", process.stdout.readline()).group(1)
        received = 0
        with pytest.raises(httpx.HTTPError):  # the stream is cut off; it never reaches its 4,000 tokens
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as stream:
                for line in stream.iter_lines():
                    received += line.startswith("data: {")
                    if received == 5:
                        stopped = time.monotonic()
                        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
        assert time.monotonic() - stopped < 15 and 5 <= received < 4000
        assert process.returncode == -stop and "Traceback" not in err, err
        assert '"POST /v1/completions HTTP/1.1" 200' in out  # --access-log, on stdout as uvicorn's
    finally:
        process.kill()


def test_the_port_is_held_from_before_the_model_loads():
    """It had been checked and let go: another process could take it while the model loaded, after which herd
    printed "serving" on it and failed."""
    from herd.serve.cli import _bound_socket, _listen

    sock = _bound_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    with sock, socket.socket() as plain:
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    sock = _bound_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    with sock, socket.socket() as reusing:  # Linux lets a second SO_REUSEADDR socket bind until one listens
        reusing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reusing.bind(("127.0.0.1", port))
        reusing.listen()
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{port} \(Address already in use\): choose"):
            _listen(sock, "127.0.0.1", port)


def test_the_server_raises_its_limit_on_open_files():
    """At a shell's soft limit of 1,024, a thousand idle connections had taken every descriptor."""
    code = ("import resource\nfrom herd.serve.cli import _more_open_files\n"
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n_more_open_files()\n"
            "soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
            "print(soft == hard if hard != resource.RLIM_INFINITY else soft >= 65536)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "True", result.stderr


def test_an_unlimited_hard_limit_on_open_files_is_raised_to_as_well(monkeypatch):
    """RLIM_INFINITY is -1: min() with it had left the soft limit where it was."""
    import resource

    from herd.serve import cli

    asked = []
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (256, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", lambda kind, limits: asked.append(limits))
    cli._more_open_files()
    assert asked == [(1 << 20, resource.RLIM_INFINITY)]


def test_herd_serve_holds_its_port_while_the_model_loads(monkeypatch):
    """The port had been checked and let go before the model loaded: another process could take it meanwhile."""
    import typer
    from typer.testing import CliRunner

    from herd import cli
    from herd.serve.cli import serve_cmd

    port = free_port()

    def load(*args, **kwargs):
        with socket.socket() as other:
            with pytest.raises(OSError):
                other.bind(("127.0.0.1", port))
        raise SystemExit(0)

    monkeypatch.setattr(cli, "_load", load)
    app = typer.Typer()
    app.command()(serve_cmd)
    result = CliRunner().invoke(app, ["--port", str(port)])
    assert result.exit_code == 0, result.output
