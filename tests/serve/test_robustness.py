"""Malformed requests get specific 4xx answers (and the server keeps serving); a full queue gets 429; 32 concurrent
streams all finish, uncrossed, each equal to the same request run alone. A tiny random model is enough here."""
import asyncio
import concurrent.futures
import functools
import json
import logging
import re
import socket
import time

import httpx
import openai
import pytest
import torch
from fastapi import APIRouter, Request

import herd
from herd.generate import EngineConfig, Generator, SamplingParams
from herd.llm import LLM
from herd.model import ModelConfig, Transformer
from herd.serve.app import ServeSettings, create_app

from serve_helpers import KEY, Server

NAME = "tiny"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_hidden_dim=128,
                         max_seq_len=512)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.output.weight.mul_(30)  # sharp logits: greedy choices are not near-ties
    tok = herd.load_tokenizer()
    llm = LLM(model, tok, herd.ChatFormat(tok), name=NAME)
    llm.generator = Generator(model, tok, config=EngineConfig(max_batch=32, max_queue=32, max_step_tokens=256))
    server = Server(llm, ServeSettings(api_keys=(KEY,), max_body_bytes=32 << 10, max_n=4))
    yield server
    server.stop()


def post(server, body, *, key=KEY, raw=None, path="/v1/chat/completions", content_type="application/json"):
    headers = {"Authorization": f"Bearer {key}", **({"Content-Type": content_type} if content_type else {})}
    return httpx.post(server.url + path, content=raw if raw is not None else json.dumps(body), headers=headers,
                      timeout=60)


GOOD = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
LONG_PROMPT = "word " * 600  # over the 512-token context, under the body limit


@pytest.mark.parametrize(("name", "request_body", "status", "code"), [
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_json"),
    # Valid JSON, but half of a UTF-16 pair is no text: echoed in an error, it had made the error itself fail.
    ("unpaired surrogate", b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', 400,
     "invalid_json"),
    ("messages not a list", {**GOOD, "messages": "hi"}, 400, "invalid_value"),
    ("empty messages", {**GOOD, "messages": []}, 400, "invalid_value"),
    ("unknown role", {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value"),
    ("unknown model", {**GOOD, "model": "gpt-9"}, 404, "model_not_found"),
    ("negative max_tokens", {**GOOD, "max_tokens": -5}, 400, "invalid_value"),
    ("max_tokens a string", {**GOOD, "max_tokens": "5"}, 400, "invalid_value"),
    ("temperature a string", {**GOOD, "temperature": "hot"}, 400, "invalid_value"),
    ("temperature too high", {**GOOD, "temperature": 7}, 400, "invalid_value"),
    ("n over the limit", {**GOOD, "n": 50}, 400, "invalid_value"),
    ("prompt over the context", {**GOOD, "messages": [{"role": "user", "content": LONG_PROMPT}]}, 400,
     "context_length_exceeded"),
    ("max_tokens over the context", {**GOOD, "max_tokens": 100000}, 400, "context_length_exceeded"),
    ("oversized body", {**GOOD, "messages": [{"role": "user", "content": "x" * (40 << 10)}]}, 413,
     "request_too_large"),
    ("bad json_schema", {**GOOD, "response_format": {"type": "json_schema"}}, 400, None),
    # Schemas that would hold the grammar compiler for minutes (measured: 69 s at 900 levels, 25 s at {1,20000}).
    ("json_schema nested 100 deep", {**GOOD, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": functools.reduce(lambda s, _: {"type": "array", "items": s}, range(100), {})}}},
     400, None),
    ("json_schema pattern repeated 20000 times", {**GOOD, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "^[a-z]{1,20000}$"}}}}, 400, None),
    ("json_schema patternProperties repeated 20000 times", {**GOOD, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "patternProperties": {"^[a-z]{1,20000}$": {"type": "integer"}}}}}}, 400, None),
    # vLLM's extensions that herd does not implement had been ignored: the answer silently another.
    ("include_stop_str_in_output", {**GOOD, "include_stop_str_in_output": True}, 400, "invalid_value"),
    ("continue_final_message", {**GOOD, "continue_final_message": True, "add_generation_prompt": False}, 400,
     "invalid_value"),
    ("guided_json", {**GOOD, "guided_json": {"type": "object"}}, 400, "invalid_value"),
    ("logit_bias key not a token id", {**GOOD, "logit_bias": {"hello": 5}}, 400, "invalid_value"),
    ("logit_bias over 100", {**GOOD, "logit_bias": {"5": 500}}, 400, "invalid_value"),
    ("logit_bias past the vocabulary", {**GOOD, "logit_bias": {"200000": 5}}, 400, "invalid_value"),
    ("presence_penalty out of range", {**GOOD, "presence_penalty": -3}, 400, "invalid_value"),
    ("repetition_penalty zero", {**GOOD, "repetition_penalty": 0}, 400, "invalid_value"),
    ("tool parameters not a JSON Schema", {**GOOD, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": 3}}}]}, 400, "invalid_value"),
    # Each of these was a 500 (an infinite penalty the sampler refused; jsonschema's recursion) or a silent 200.
    ("repetition_penalty infinite", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
     b'"max_tokens": 1, "repetition_penalty": 1e309}', 400, "invalid_value"),
    ("tool parameters nested 100 deep", {**GOOD, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": functools.reduce(lambda s, _: {"type": "object", "properties": {"a": s}},
                                                    range(100), {"type": "string"})}}]}, 400, "invalid_value"),
    # A call forced to these had been the reply's text (finish "stop"), or read as the built-in's call.
    ("tool parameters not an object", {**GOOD, "tools": [{"type": "function", "function": {
        "name": "echo", "parameters": {"type": "string"}}}]}, 400, "invalid_value"),
    ("a function named as a built-in, of other parameters", {**GOOD, "tools": [{"type": "function", "function": {
        "name": "brave_search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]}, 400,
     "invalid_value"),
    ("named tool_choice without a name", {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}],
                                          "tool_choice": {"type": "function", "function": {}}}, 400, "invalid_value"),
    ("a user message without content", {**GOOD, "messages": [{"role": "user"}]}, 400, "invalid_value"),
    ("a user message of no parts", {**GOOD, "messages": [{"role": "user", "content": []}]}, 400, "invalid_value"),
    ("top_logprobs without logprobs", {**GOOD, "top_logprobs": 3}, 400, "invalid_value"),
    ("stream_options without stream", {**GOOD, "stream_options": {"include_usage": True}}, 400, "invalid_value"),
    ("functions, which tools replaced", {**GOOD, "functions": [{"name": "f", "parameters": {}}]}, 400,
     "invalid_value"),
])
def test_malformed_requests_get_specific_4xx(tiny, name, request_body, status, code):
    raw = request_body if isinstance(request_body, bytes) else None
    answer = post(tiny, request_body, raw=raw)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and error["type"]
    if code:
        assert error["code"] == code
    assert post(tiny, GOOD).status_code == 200  # and the server goes on serving


def test_a_prompt_past_the_context_is_said_in_openais_words(tiny):
    """Clients tell this 400 from others by OpenAI's and vLLM's wording ("maximum context length"): litellm's
    context-window fallbacks had not fired on herd's own."""
    error = post(tiny, {**GOOD, "messages": [{"role": "user", "content": LONG_PROMPT}]}).json()["error"]
    assert error["message"].startswith("This model's maximum context length is 512 tokens, but the prompt has ")
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_a_body_not_sent_as_json_is_refused(tiny, content_type):
    """What a web page may send any site without its consent (CORS's "simple" requests): it had been answered,
    so any page a user of a keyless server visited could spend the server, or make agents that run code."""
    answer = post(tiny, GOOD, content_type=content_type)
    assert answer.status_code == 415, answer.text
    assert answer.json()["error"]["code"] == "unsupported_media_type"
    assert post(tiny, GOOD, content_type="application/json; charset=utf-8").status_code == 200


@pytest.mark.parametrize(("field", "value", "names"), [
    ("seed", 1 << 70, "seed"),  # was the number library's "Overflow when unpacking long long"
    ("stop", "", "must not be empty"),  # was "at most 4 non-empty stop strings"
    ("tool_choice", "required", "tool_choice"),  # was answered as plain text, no call demanded
])
def test_a_bad_field_is_named_in_its_error(tiny, field, value, names):
    answer = post(tiny, {**GOOD, field: value})
    assert answer.status_code == 400, answer.text
    assert names in answer.json()["error"]["message"]


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),  # param was "", the message ": Value error, ..."
    ({"tool_choice": "always"}, "tool_choice", "Input should be"),  # was "tool_choice.literal['none',...]"
    ({"stop": [1]}, "stop", "valid string"),  # was "stop.str"
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content", "only text content parts are supported, not 'image_url'"),  # was "a valid string"
    ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages", "context"),
])
def test_an_error_names_the_field_as_the_client_sent_it(tiny, extra, param, words):
    answer = post(tiny, {**GOOD, **extra})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"] and "Value error" not in error["message"]


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "number", "multipleOf": 0.5}}}}}], "tool_choice": "required"},
     "tools"),
])
def test_a_schema_decoding_cannot_enforce_is_a_400_naming_its_field(tiny, extra, param):
    answer = post(tiny, {**GOOD, **extra})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and "cannot be enforced" in error["message"]


def test_a_named_tool_choice_forces_a_call_of_that_tool(tiny):
    tools = [{"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}}} for name in ("f", "g")]
    answer = post(tiny, {**GOOD, "max_tokens": 60, "tools": tools,
                         "tool_choice": {"type": "function", "function": {"name": "g"}}})
    assert answer.status_code == 200, answer.text  # was a 500 (AttributeError) once the choice became a model
    calls = answer.json()["choices"][0]["message"]["tool_calls"]
    assert [call["function"]["name"] for call in calls] == ["g"]
    assert isinstance(json.loads(calls[0]["function"]["arguments"])["a"], bool)


def test_completions_errors_and_keys(tiny):
    assert post(tiny, {"model": NAME, "prompt": [], "max_tokens": 2}, path="/v1/completions").status_code == 400
    assert post(tiny, {"model": NAME, "prompt": [999999], "max_tokens": 2}, path="/v1/completions").status_code == 400
    too_long = post(tiny, {"model": NAME, "prompt": LONG_PROMPT}, path="/v1/completions")
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"  # was "messages"
    # What herd cannot do is refused, not silently ignored: Llama 3 has no fill-in-the-middle, and best_of would
    # return fewer sequences than were sampled.
    for extra in ({"suffix": "end"}, {"best_of": 3}, {"max_tokens": 0}):  # 0 only scores a prompt, with echo
        answer = post(tiny, {"model": NAME, "prompt": "x", "max_tokens": 2, **extra}, path="/v1/completions")
        assert answer.status_code == 400 and answer.json()["error"]["param"] == next(iter(extra))
    assert post(tiny, GOOD, key="nope").status_code == 401
    assert httpx.get(tiny.url + "/v1/models").status_code == 401
    assert httpx.get(tiny.url + "/nowhere").json()["error"]["type"] == "not_found_error"
    assert httpx.get(tiny.url + "/health").json()["status"] == "ok"
    # HEAD, as load balancers and uptime checks ask, had been 405; a NUL byte in a static file's name a 500
    assert [httpx.head(tiny.url + path).status_code for path in ("/health", "/", "/metrics")] == [200] * 3
    assert httpx.get(tiny.url + "/static/%00").status_code == 404


def test_completions_top_logprobs_hold_the_sampled_token_and_chat_the_likeliest_alone(tiny):
    """Legacy completions "always return the logprob of the sampled token, so there may be up to logprobs+1
    elements" (OpenAI, as vLLM does); chat's top_logprobs are the likeliest tokens only, as OpenAI's are. A bias
    forces a token the model itself finds unlikely (log-probabilities are the model's, before the bias)."""
    forced = {"max_tokens": 1, "temperature": 0, "logit_bias": {"1000": 100}}
    for n in (0, 1, 3):
        answer = post(tiny, {"model": NAME, "prompt": "hi", "logprobs": n, **forced}, path="/v1/completions")
        logprobs = answer.json()["choices"][0]["logprobs"]
        [top], [logprob] = logprobs["top_logprobs"], logprobs["token_logprobs"]
        assert logprobs["tokens"] == ["indow"] and len(top) == n + 1 and top["indow"] == logprob
        assert (max(top.values()) > logprob) == (n > 0)  # the n likeliest, then the token
    chat = post(tiny, {**GOOD, **forced, "logprobs": True, "top_logprobs": 1}).json()["choices"][0]["logprobs"]
    [entry] = chat["content"]
    assert entry["token"] == "indow" and [t["token"] for t in entry["top_logprobs"]] != ["indow"]
    assert len(entry["top_logprobs"]) == 1


def test_a_padded_vocabulary_keeps_its_padded_ids_out_of_replies_and_prompts():
    """A model whose vocabulary is padded past its tokenizer's: the padded ids, which have no text, had been top
    alternatives (a 500 when their text was looked up); a prompt holding one, echoed or detokenized, had been a 500
    too, and is now a 400, as vLLM refuses it."""
    from fastapi.testclient import TestClient

    tok = herd.load_tokenizer()
    torch.manual_seed(0)
    config = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size + 64,
                         ffn_hidden_dim=128, max_seq_len=64)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.output.weight[tok.vocab_size:] = model.output.weight.abs().max() * 10  # padded ids the likeliest
    llm = LLM(model, tok, herd.ChatFormat(tok), name=NAME)
    with TestClient(create_app(llm, ServeSettings())) as client:
        answer = client.post("/v1/completions", json={"model": NAME, "prompt": [1, 2, 3], "max_tokens": 2,
                                                      "logprobs": 3, "echo": True})
        assert answer.status_code == 200, answer.text  # was a 500: padded ids among the alternatives
        assert all(len(top) >= 3 for top in answer.json()["choices"][0]["logprobs"]["top_logprobs"][1:])
        padded = client.post("/v1/completions", json={"model": NAME, "prompt": [1, tok.vocab_size], "echo": True})
        assert padded.status_code == 400 and padded.json()["error"]["param"] == "prompt"
        assert client.post("/detokenize", json={"model": NAME, "tokens": [tok.vocab_size + 1]}).status_code == 400


def test_a_tool_whose_property_schema_is_true_is_prompted_as_any_type(tiny):
    # `true` is a JSON Schema (anything validates): the tool prompt lists the parameter without a type.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "extra": True}}}}]
    answer = post(tiny, {**GOOD, "tools": tools})  # the server builds the tool prompt
    assert answer.status_code == 200, answer.text
    prompt = tiny.llm.tokenizer.decode(tiny.llm.chat_prompt([{"role": "user", "content": "hi"}], tools))
    assert "\"extra\"" in prompt and "\"city\"" in prompt


def test_an_unexpected_error_is_a_500_on_a_connection_that_stays_open(tiny, caplog):
    # The server's own bug must not cost the client its connection: its next request on it is served.
    router = APIRouter()

    @router.get("/peer")
    async def peer(request: Request):
        return {"port": request.client.port}

    @router.post("/boom")
    async def boom():
        raise RuntimeError("a bug")

    own = LLM(tiny.llm.model, tiny.llm.tokenizer, tiny.llm.chat_format, name=NAME)  # a server stops its engine
    server = Server(own, ServeSettings(), routers=[router])
    try:
        with httpx.Client() as client:
            before = client.get(server.url + "/peer").json()["port"]
            answer = client.post(server.url + "/boom")
            assert answer.status_code == 500
            assert answer.json()["error"] == {"message": "internal error: RuntimeError", "type": "server_error",
                                              "param": None, "code": None}
            assert client.get(server.url + "/peer").json()["port"] == before
    finally:
        server.stop()
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")]  # nothing left for uvicorn to report


def test_a_client_gone_before_a_whole_reply_frees_its_sequence_quietly(tiny, caplog):
    engine = tiny.llm.generator
    with pytest.raises(httpx.ReadTimeout):  # four choices of 480 tokens: seconds of work on the tiny model
        httpx.post(tiny.url + "/v1/chat/completions", json={**GOOD, "max_tokens": 480, "n": 4},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    deadline = time.monotonic() + 30
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_work() and int(engine.cache.pool.refs.sum()) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback: a client may just leave
    closed = [line for line in httpx.get(tiny.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
              .splitlines() if line.startswith('herd_requests_total{route="/v1/chat/completions",status="499"}')]
    assert closed and float(closed[0].split()[-1]) >= 1  # the server saw the client leave mid-reply


def test_a_client_gone_while_sending_its_request_is_no_internal_error(tiny, caplog):
    with socket.create_connection(("127.0.0.1", tiny.port)) as raw:  # promises 200 bytes, sends 8, leaves
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                    b"\r\nContent-Length: 200\r\n\r\n{\"model\"")
    time.sleep(0.5)
    assert post(tiny, GOOD).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # was a traceback, ClientDisconnect
    assert 'status="500"' not in httpx.get(tiny.url + "/metrics").text


def test_metrics_count_a_route_by_its_template_not_every_path_asked_for(tiny):
    for i in range(3):
        httpx.get(f"{tiny.url}/invented-{i}")
        httpx.get(f"{tiny.url}/v1/models/invented-{i}", headers={"Authorization": f"Bearer {KEY}"})
    text = httpx.get(tiny.url + "/metrics").text
    assert "invented" not in text  # each URL had been a series of its own: memory any client could fill
    assert 'route="unmatched",status="404"' in text and 'route="/v1/models/{model_id:path}",status="404"' in text


def test_full_queue_answers_429_with_retry_after(tiny):
    engine = tiny.llm.generator
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    blockers = []
    try:
        for i in range(4):  # 32 running (the most the engine batches), then 32 waiting: the queue is full
            blockers.append(engine.submit([[1, 2, 3]] * 16, params, lambda d: None))
            while i < 2 and (engine._inbox or engine.scheduler.waiting):
                time.sleep(0.01)
        answer = post(tiny, GOOD)
        assert answer.status_code == 429 and answer.headers["Retry-After"] == "1"
        assert answer.json()["error"]["code"] == "queue_full"
    finally:
        for blocker in blockers:
            blocker.cancel()
    deadline = time.monotonic() + 30
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert int(engine.cache.pool.refs.sum()) == 0  # cancelled sequences gave their blocks back
    assert post(tiny, GOOD).status_code == 200


def test_a_burst_the_batch_can_take_is_admitted_and_a_request_that_never_fits_is_a_400(tiny):
    """The queue limit counted every new sequence as waiting, places free in the batch or not: on an idle server a
    request of 40 prompts (32 run at once, 32 may wait) was a 429, and one of 65 a 429 on every retry."""
    prompts = {"model": NAME, "max_tokens": 1, "temperature": 0}
    fits = post(tiny, {**prompts, "prompt": [f"item {i}" for i in range(40)]}, path="/v1/completions")
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 40
    never = post(tiny, {**prompts, "prompt": [f"item {i}" for i in range(65)]}, path="/v1/completions")
    assert never.status_code == 400 and "send at most 64 a request" in never.json()["error"]["message"]
    # a caller waiting for its own results is never refused: the library's generate, any number of prompts
    assert len(tiny.llm.generate([f"item {i}" for i in range(100)], max_tokens=1, temperature=0)) == 100


def test_a_request_past_the_time_limit_is_a_504_not_a_finished_reply(tiny):
    """At --timeout a reply had ended as a 200 with finish_reason "length", as if max_tokens were reached; a
    request still queued came back empty, looking complete."""
    own = LLM(tiny.llm.model, tiny.llm.tokenizer, tiny.llm.chat_format, name=NAME)  # a server stops its engine
    server = Server(own, ServeSettings(request_timeout=0.1))
    body = {**GOOD, "max_tokens": 480, "n": 4, "temperature": 1.0, "seed": 0}
    try:
        answer = post(server, body)
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "request_timeout", answer.text
        assert "limit of 0.1 s (--timeout)" in answer.json()["error"]["message"]
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as streamed:
            events = [line.removeprefix("data: ") for line in streamed.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        finished = [c["finish_reason"] for e in events[:-2] for c in json.loads(e)["choices"]]
        assert not any(finished)  # no choice claims an end it did not reach
        assert 'route="/v1/chat/completions",status="504"} 1.0' in httpx.get(server.url + "/metrics").text
    finally:
        server.stop()


def test_allowed_origins_answer_a_browsers_preflight_and_no_others(tiny):
    """A page on another origin (a team's web app) could not call the API: every preflight was a 405. With
    allowed_origins, CORS as vLLM's --allowed-origins gives it; without, same-origin only, as before."""
    origin = "https://app.example.com"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    assert httpx.options(tiny.url + "/v1/chat/completions", headers=preflight).status_code == 405  # default
    own = LLM(tiny.llm.model, tiny.llm.tokenizer, tiny.llm.chat_format, name=NAME)  # a server stops its engine
    server = Server(own, ServeSettings(api_keys=(KEY,), allowed_origins=(origin,)))
    try:
        answer = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        reply = httpx.post(server.url + "/v1/chat/completions", json=GOOD,
                           headers={"Origin": origin, "Authorization": f"Bearer {KEY}"}, timeout=60)
        assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == origin
        other = httpx.options(server.url + "/v1/chat/completions",
                              headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        assert httpx.post(server.url + "/v1/chat/completions", json=GOOD, headers={"Origin": origin}).status_code == 401
    finally:
        server.stop()
    with pytest.raises(ValueError, match="'https://app.example.com/' is not an origin"):
        ServeSettings(allowed_origins=("https://app.example.com/",))  # a slash never matches what browsers send


def test_a_loopback_server_answers_only_requests_addressed_to_loopback(tiny):
    """DNS rebinding: a web page whose name the attacker re-points at 127.0.0.1 is of the same origin as the
    server it reaches, and had read its answers (Host: attacker.example was a 200)."""
    from herd.serve.cli import _loopback_names

    assert _loopback_names("0.0.0.0") == () and _loopback_names("example.com") == ()
    own = LLM(tiny.llm.model, tiny.llm.tokenizer, tiny.llm.chat_format, name=NAME)  # a server stops its engine
    server = Server(own, ServeSettings(allowed_hosts=_loopback_names("127.0.0.1")))
    try:
        for host, status in (("attacker.example", 400), (f"attacker.example:{server.port}", 400),
                             (f"localhost:{server.port}", 200), (f"[::1]:{server.port}", 200), (None, 200)):
            answer = httpx.get(server.url + "/v1/models", headers={"Host": host} if host else {})
            assert answer.status_code == status, (host, answer.text)
        assert answer.json()["data"][0]["id"] == NAME
        refused = httpx.post(server.url + "/v1/chat/completions", json=GOOD, headers={"Host": "attacker.example"})
        assert refused.json()["error"]["code"] == "unknown_host"
    finally:
        server.stop()
    with pytest.raises(ValueError, match="other than printable ASCII"):
        ServeSettings(api_keys=("pässwörd",))  # a header carries it as latin-1: it could never match


def _served(server) -> float:
    return sum(float(line.split()[-1]) for line in httpx.get(server.url + "/metrics").text.splitlines()
               if line.startswith('herd_requests_total{route="/v1/chat/completions",status="200"}'))


def test_client_disconnect_frees_its_sequence(tiny):
    engine = tiny.llm.generator
    body = {**GOOD, "max_tokens": 400, "stream": True}
    served = _served(tiny)
    with httpx.stream("POST", tiny.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as answer:
        lines = answer.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 30
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_work() and int(engine.cache.pool.refs.sum()) == 0
    assert _served(tiny) == served + 1  # a 200 when its stream opened; a stream left early had been counted nowhere


def test_metrics_count_requests_and_tokens(tiny):
    post(tiny, GOOD)
    text = httpx.get(tiny.url + "/metrics").text
    for name in ("herd_requests_total", "herd_generation_tokens_total", "herd_queue_depth", "herd_running_sequences",
                 "herd_cache_blocks_in_use", "herd_time_to_first_token_seconds_bucket",
                 "herd_inter_token_latency_seconds_bucket", "herd_draft_tokens_total",
                 "herd_draft_tokens_accepted_total"):
        assert name in text
    served = sum(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith('herd_requests_total{route="/v1/chat/completions",status="200"}'))
    assert served >= 1


def _samples(server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels or set(s.labels) == {"le"} and s.labels["le"] == "+Inf"}


def test_latency_metrics_time_every_sequence_from_arrival_and_no_scoring_token(tiny, monkeypatch):
    """As vLLM counts them: each choice's first token is a time to first token (one per request had been), timed
    from the request's arrival (a grammar's compile time had been left out), and a prompt scored with max_tokens 0
    generates no token (the engine's dropped one had been counted)."""
    import herd.serve.app as app

    compile_grammar = app.grammar_constraints

    async def slow_grammar(*args):
        await asyncio.sleep(0.3)
        return await compile_grammar(*args)

    monkeypatch.setattr(app, "grammar_constraints", slow_grammar)
    before = _samples(tiny)
    ending = {**GOOD, "n": 3, "max_tokens": 5, "temperature": 1, "seed": 1, "logit_bias": {"128009": 100}}
    assert post(tiny, ending).json()["usage"]["completion_tokens"] == 0  # <|eot_id|> at once
    before = _samples(tiny)
    reply = post(tiny, {**ending, "ignore_eos": True}).json()
    after = _samples(tiny)
    assert [c["finish_reason"] for c in reply["choices"]] == ["length"] * 3  # vLLM's ignore_eos (had been dropped)
    assert reply["usage"]["completion_tokens"] == 15
    delta = {name: after[name] - before.get(name, 0) for name in after}
    assert delta["herd_generation_tokens_total"] == 15
    assert delta["herd_time_to_first_token_seconds_count"] == 3
    assert delta["herd_inter_token_latency_seconds_count"] == 12
    assert delta["herd_time_to_first_token_seconds_sum"] >= 3 * 0.3 and delta["herd_request_latency_seconds_sum"] >= 0.3
    scored = post(tiny, {"model": NAME, "prompt": "a b c", "max_tokens": 0, "echo": True, "logprobs": 0},
                  path="/v1/completions").json()
    assert scored["usage"]["completion_tokens"] == 0
    delta = {name: value - after[name] for name, value in _samples(tiny).items() if name in after}
    assert delta["herd_generation_tokens_total"] == 0 and delta["herd_time_to_first_token_seconds_count"] == 0
    assert delta["herd_prompt_tokens_total"] == scored["usage"]["prompt_tokens"]


def test_32_concurrent_streams_complete_uncrossed_and_equal_solo_runs(tiny):
    client = openai.AsyncOpenAI(base_url=tiny.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    jobs = [([{"role": "user", "content": f"Request {i}: " + "tell me more " * (i % 7)}], 4 + (i * 5) % 23)
            for i in range(32)]

    async def one(messages, max_tokens):
        stream = await client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens,
                                                      temperature=0, stream=True)
        ids, text = set(), ""
        async for chunk in stream:
            ids.add(chunk.id)
            text += "".join(c.delta.content or "" for c in chunk.choices)
        assert len(ids) == 1  # every chunk of a stream belongs to it
        return text

    async def together():
        return await asyncio.wait_for(asyncio.gather(*(one(m, n) for m, n in jobs)), timeout=240)

    concurrent = asyncio.run(together())
    solo = [tiny.llm.generate(tiny.llm.chat_prompt(m), max_tokens=n, temperature=0).text for m, n in jobs]
    assert concurrent == solo
    assert len(set(concurrent)) > 16  # different requests, different answers: nothing was swapped unnoticed


@pytest.mark.parametrize(("fields", "words"), [
    ({"request_timeout": 0.0}, "request_timeout must be above 0, got 0.0"),
    ({"request_timeout": float("nan")}, "request_timeout must be above 0, got nan"),
    ({"max_n": 0}, "max_n must be at least 1, got 0"),
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
    ({"max_body_bytes": 0}, "max_body_bytes must be at least 1, got 0"),
])
def test_server_settings_out_of_range_are_refused_naming_the_field(fields, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        ServeSettings(**fields)


def _optional_in_openai(params) -> set[str]:
    """The fields OpenAI's own request type (the openai package's) lets be null."""
    import typing

    return {name for name, hint in typing.get_type_hints(params).items() if type(None) in typing.get_args(hint)}


def _nullable(params, herd_request) -> list[str]:
    from herd.serve.protocol import CompletionRequest

    # vLLM's extensions are Optional in vLLM's request models too. A completion's prompt may be null at OpenAI
    # (a document from its start, <|endoftext|>), but herd refuses an empty prompt, so it is left out here.
    fields = (_optional_in_openai(params) | {"top_k", "min_p", "repetition_penalty"}) & set(herd_request.model_fields)
    return sorted(fields - ({"prompt"} if herd_request is CompletionRequest else set()))


def _null_cases():
    from openai.types import completion_create_params as completion
    from openai.types.chat import completion_create_params as chat

    from herd.serve.protocol import ChatCompletionRequest, CompletionRequest

    base = {"model": NAME, "max_tokens": 3, "seed": 7}
    return ([("/v1/chat/completions", {**base, "messages": GOOD["messages"]}, field)
             for field in _nullable(chat.CompletionCreateParamsNonStreaming, ChatCompletionRequest)]
            + [("/v1/completions", {**base, "prompt": "hi"}, field)
               for field in _nullable(completion.CompletionCreateParamsNonStreaming, CompletionRequest)])


@pytest.mark.parametrize(("path", "body", "field"), _null_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_null_is_the_default_for_every_field_openai_lets_be_null(tiny, path, body, field):
    """The openai SDK sends an explicit None as null (create(..., temperature=None)): temperature, n, stream, echo
    and the like had been 400s, "Input should be a valid number"."""
    answer = post(tiny, {**body, field: None}, path=path)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"  # stream null: not streamed
    left_out = post(tiny, {k: v for k, v in body.items() if k != field}, path=path).json()
    choices = answer.json()["choices"]
    if field == "max_tokens":  # null: as many as the context allows, as vLLM reads it; left out: 16 (completions)
        [text, shorter] = [c[0].get("text") or c[0]["message"]["content"] for c in (choices, left_out["choices"])]
        assert text.startswith(shorter)
    elif field != "seed":  # without a seed the choice is sampled afresh
        assert choices == left_out["choices"]


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/chat/completions", "stream", "yes"), ("/v1/chat/completions", "n", 1.5),
    ("/v1/chat/completions", "logprobs", 1), ("/v1/chat/completions", "temperature", "1"),
    ("/v1/completions", "echo", "true"), ("/v1/completions", "top_k", 2.5)])
def test_a_wrong_type_is_still_a_400_where_null_is_the_default(tiny, path, field, value):
    body = {"model": NAME, "max_tokens": 1, field: value,
            **({"prompt": "hi"} if path == "/v1/completions" else {"messages": GOOD["messages"]})}
    answer = post(tiny, body, path=path)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == field, answer.text


def test_the_openai_client_sending_none_is_answered_as_leaving_it_out(tiny):
    client = openai.OpenAI(base_url=tiny.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    nones = dict(temperature=None, top_p=None, n=None, presence_penalty=None, frequency_penalty=None, stream=None,
                 seed=None, stop=None, logit_bias=None)
    chat = client.chat.completions.create(model=NAME, messages=GOOD["messages"], max_tokens=2, logprobs=None,
                                          top_logprobs=None, **nones)
    assert len(chat.choices) == 1 and chat.choices[0].logprobs is None
    completion = client.completions.create(model=NAME, prompt="hi", max_tokens=2, echo=None, logprobs=None,
                                           best_of=None, suffix=None, **nones)
    assert len(completion.choices) == 1 and not completion.choices[0].text.startswith("hi")


def _events(server, path, body) -> list:
    with httpx.stream("POST", server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as answer:
        assert answer.status_code == 200
        return [json.loads(line[6:]) for line in answer.iter_lines() if line.startswith("data: {")]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": GOOD["messages"]}), ("/v1/completions", {"prompt": "hi"})])
def test_streamed_usage_is_null_in_every_chunk_but_the_last(tiny, path, body):
    """As OpenAI documents include_usage: every chunk has "usage": null, the last one (no choices) the usage;
    the field had been left out of the other chunks."""
    body = {"model": NAME, "max_tokens": 3, "n": 2, "stream": True, **body}
    *chunks, last = _events(tiny, path, {**body, "stream_options": {"include_usage": True}})
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
    assert chunks and all("usage" in chunk and chunk["usage"] is None for chunk in chunks), chunks
    assert not [chunk for chunk in _events(tiny, path, body) if "usage" in chunk]  # not asked for: no field


def _sample(server, line: str) -> float:
    """A /metrics sample's value, by the start of its line (name and labels); 0 before it is first counted."""
    text = httpx.get(server.url + "/metrics").text
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line + " "))


def test_cached_prompt_tokens_are_counted_once_per_prompt_as_usage_counts_them(tiny):
    body = {**GOOD, "messages": [{"role": "user", "content": "tell me more " * 30}], "max_tokens": 2, "n": 4}
    post(tiny, body)  # the prompt in the prefix cache
    names = ("herd_prompt_tokens_total", "herd_cached_prompt_tokens_total")
    before = [_sample(tiny, name) for name in names]
    usage = post(tiny, body).json()["usage"]
    prompt, cached = (_sample(tiny, name) - b for name, b in zip(names, before))
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
    # Four choices of one prompt had counted its cached tokens four times: more cached tokens than prompt tokens.
    assert (prompt, cached) == (usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"])


@pytest.mark.parametrize(("method", "path", "body", "route"), [
    ("GET", "/v1/models", None, "/v1/models"),
    ("HEAD", "/v1/models", None, "/v1/models"),
    ("GET", f"/v1/models/{NAME}", None, "/v1/models/{model_id:path}"),
    ("POST", "/tokenize", {"model": NAME, "prompt": "hi"}, "/tokenize"),
    ("POST", "/detokenize", {"model": NAME, "tokens": [1, 2]}, "/detokenize"),
    ("GET", "/v1/shields", None, "/v1/shields"),
])
def test_a_route_counts_its_successes_as_it_counts_its_errors(tiny, method, path, body, route):
    """herd_requests_total had counted these routes' 4xx answers only: an error ratio read 100%."""
    served = f'herd_requests_total{{route="{route}",status="200"}}'
    before = _sample(tiny, served)
    answer = httpx.request(method, tiny.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200, answer.text
    assert _sample(tiny, served) == before + 1


_LS_NULLS = {  # each a request that llama-stack's own types allow, by route, built from its modules (ls, types)
    "chat tools": ("chat-completion", lambda ls, types: {"tools": None}),
    "chat sampling_params": ("chat-completion", lambda ls, types: {"sampling_params": None}),
    "chat stream": ("chat-completion", lambda ls, types: {"stream": None}),
    "LogProbConfig.top_k": ("chat-completion", lambda ls, types: {"logprobs": ls.LogProbConfig(top_k=None)}),
    "ToolParamDefinition.required": ("chat-completion", lambda ls, types: {"tools": [types.ToolDefinition(
        tool_name="get_weather", parameters={"city": types.ToolParamDefinition(param_type="string", required=None)})]}),
    "ToolConfig fields": ("chat-completion", lambda ls, types: {
        "tool_config": ls.ToolConfig(tool_choice=None, system_message_behavior=None)}),
    "CompletionMessage.tool_calls": ("chat-completion", lambda ls, types: {"messages": [
        ls.UserMessage(content="Hi"), ls.CompletionMessage(content="Hello", stop_reason="end_of_turn", tool_calls=None),
        ls.UserMessage(content="Hi")]}),
    "completion sampling_params": ("completion", lambda ls, types: {"sampling_params": None}),
    "completion stream": ("completion", lambda ls, types: {"stream": None}),
}


@pytest.mark.parametrize("case", list(_LS_NULLS))
def test_llama_stack_requests_may_leave_optional_fields_null(tiny, llama_stack, case):
    """What llama-stack's own request types allow to be None (sent as null) is its default here too: each had
    been a 400 ("Input should be a valid list", "a valid integer", "a valid boolean")."""
    ls = llama_stack("llama_stack.apis.inference.inference")
    path, variant = _LS_NULLS[case]
    variant = variant(ls, llama_stack("llama_stack.models.llama.datatypes"))
    if path == "chat-completion":
        request, response = ls.ChatCompletionRequest, ls.ChatCompletionResponse
        fields = {"messages": [ls.UserMessage(content="Hi")], "sampling_params": ls.SamplingParams(max_tokens=3)}
    else:
        request, response, fields = ls.CompletionRequest, ls.CompletionResponse, {"content": "Hello"}
    body = request(model=NAME, **{**fields, **variant}).model_dump(mode="json")  # its Nones sent as null
    body["model_id"] = body.pop("model")
    answer = post(tiny, body, path=f"/v1/inference/{path}")
    assert answer.status_code == 200, answer.text
    response.model_validate(answer.json())  # answered once, not streamed


def test_a_slow_request_to_read_holds_no_other_request(tiny, monkeypatch):
    """Reading a request (pydantic, jsonschema over its tool schemas; then its prompt) ran on the event loop: one of
    11,000 tool parameters had held every stream and /health for 14 s. A read made slow on purpose here."""
    from herd.serve.protocol import ChatCompletionRequest

    validate = ChatCompletionRequest.model_validate.__func__

    def slow(cls, data, **options):
        time.sleep(3)
        return validate(cls, data, **options)

    monkeypatch.setattr(ChatCompletionRequest, "model_validate", classmethod(slow))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow_request = pool.submit(post, tiny, GOOD)
        time.sleep(0.5)
        began = time.monotonic()
        assert httpx.get(tiny.url + "/health", timeout=10).status_code == 200
        waited = time.monotonic() - began
        assert slow_request.result().status_code == 200
    assert waited < 1.5  # not the 2.5 s left of the slow read


def test_a_slow_template_in_tokenize_holds_no_other_request(tiny, monkeypatch):
    """/tokenize rendered its chat template on the event loop, where chat completions render theirs off it: a
    checkpoint's slow template (or a hostile one) had held every stream and /health."""
    chat_prompt = tiny.llm.chat_prompt

    def slow(*args, **options):
        time.sleep(3)
        return chat_prompt(*args, **options)

    monkeypatch.setattr(tiny.llm, "chat_prompt", slow)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        tokenized = pool.submit(post, tiny, {"model": GOOD["model"], "messages": GOOD["messages"]}, path="/tokenize")
        time.sleep(0.5)
        began = time.monotonic()
        assert httpx.get(tiny.url + "/health", timeout=10).status_code == 200
        waited = time.monotonic() - began
        assert tokenized.result().status_code == 200, tokenized.result().text
    assert waited < 1.5
