"""The server through the official `openai` client: chat and completions, streaming, tools, JSON schemas, keys."""
import json

import httpx
import jsonschema
import openai
import pytest

from serve_helpers import KEY

pytestmark = pytest.mark.heavy
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def post_to(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": server.llm.name, **body},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [server.llm.name]
    assert client.models.retrieve(server.llm.name).id == server.llm.name  # an id with spaces, sent URL-encoded
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_chat_non_streaming_and_streaming_agree(server, client):
    done = client.chat.completions.create(model=server.llm.name, messages=QUESTION, max_tokens=24, temperature=0)
    answer = done.choices[0].message.content
    assert "Paris" in answer and done.choices[0].finish_reason in ("stop", "length")
    assert answer == server.llm.chat(QUESTION, temperature=0, max_tokens=24)["content"]
    prompt_tokens = len(server.llm.chat_prompt(QUESTION))
    assert done.usage.prompt_tokens == prompt_tokens and done.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=server.llm.name, messages=QUESTION, max_tokens=24,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: a prefix-cache hit


def test_chat_logprobs_n_and_seed(server, client):
    kwargs = dict(model=server.llm.name, messages=QUESTION, max_tokens=6, temperature=1.0, seed=11, n=3,
                  logprobs=True, top_logprobs=2)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len(first.choices) == 3 and len({c.message.content for c in first.choices}) > 1
    entries = first.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == first.choices[0].message.content
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)


def test_completions_streaming_stop_and_logprobs(server, client):
    prompt = "The capital of France is"
    done = client.completions.create(model=server.llm.name, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
    assert done.choices[0].text == server.llm.generate(prompt, max_tokens=12, temperature=0).text
    assert len(done.choices[0].logprobs.token_logprobs) == done.usage.completion_tokens
    stop = done.choices[0].text.strip()[:3]
    streamed = client.completions.create(model=server.llm.name, prompt=prompt, max_tokens=12, temperature=0,
                                         stop=[stop], stream=True)
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert text == done.choices[0].text[:done.choices[0].text.find(stop)]
    # Log-probabilities stream with their tokens, the ones whose text a stop string holds back included.
    never = "@" * 40  # a stop string that never completes, whose length holds every token's text back a while
    streamed = client.completions.create(model=server.llm.name, prompt=prompt, max_tokens=12, temperature=0,
                                         logprobs=1, stop=[never], stream=True)
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == done.choices[0].logprobs.tokens
    batch = client.completions.create(model=server.llm.name, prompt=[prompt, "Once upon a time"], max_tokens=5,
                                      temperature=0)
    assert batch.choices[0].text == done.choices[0].text[:len(batch.choices[0].text)]
    assert len(batch.choices) == 2 and batch.choices[1].index == 1


def test_completions_echo_logprobs_score_the_prompt(server, client):
    """echo with logprobs, as lm-evaluation-harness asks for log-likelihoods: the prompt's tokens, the first
    without a log-probability, each other one as the engine scores it, then the reply's."""
    llm = server.llm
    prompt = llm.encode("The capital of France is Paris, and the capital of Italy is")
    done = client.completions.create(model=llm.name, prompt=prompt, max_tokens=2, temperature=0, logprobs=2,
                                     echo=True)
    choice = done.choices[0]
    reply = llm.generate(prompt, max_tokens=2, temperature=0)
    assert choice.text == llm.tokenizer.decode(prompt) + reply.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = llm.generator.score([prompt], score_from=1)[0]
    assert lp.token_logprobs[1:len(prompt)] == pytest.approx(expected, abs=1e-4)
    # The top alternatives are the likeliest tokens: at least as likely as the token that came.
    assert all(max(top.values()) >= logprob - 1e-6 and len(top) >= 1
               for top, logprob in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed = client.completions.create(model=llm.name, prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    # max_tokens 0: the prompt alone, scored (OpenAI's legacy way to ask for a text's log-likelihood)
    scored = client.completions.create(model=llm.name, prompt=prompt, max_tokens=0, logprobs=0, echo=True)
    assert scored.choices[0].text == llm.tokenizer.decode(prompt) and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(prompt)]


def test_legacy_logprobs_of_pieces_of_characters(server, client):
    """Tokens holding part of a UTF-8 character (an emoji, CJK): each had shown as U+FFFD, so text_offset drifted
    past the returned text from the first such character on, and two pieces in one top_logprobs collided in one
    key. Now a piece is named as OpenAI names it ("bytes:\\xNN"), and offsets are characters of the text."""
    llm = server.llm
    prompt = "Emoji \U0001f389 and \u65e5\u672c ok"
    done = client.completions.create(model=llm.name, prompt=prompt, max_tokens=3, temperature=0, logprobs=3,
                                     echo=True)
    choice, tok = done.choices[0], llm.tokenizer
    ids = llm.encode(prompt) + llm.generate(prompt, max_tokens=3, temperature=0).tokens
    pieces = [tok.decode_bytes([t]) for t in ids]
    assert any(_is_piece(p) for p in pieces)  # the case itself
    # each token starts at the character its first byte falls in
    assert choice.logprobs.text_offset == [len(b"".join(pieces[:i]).decode("utf-8", "ignore")) for i in range(len(ids))]
    assert all(choice.text[at:].encode().startswith(p) for at, p in zip(choice.logprobs.text_offset, pieces)
               if not _is_piece(p))
    assert choice.logprobs.tokens == [p.decode() if not _is_piece(p) else "bytes:" + "".join(f"\\x{b:02x}" for b in p)
                                      for p in pieces]
    prompt_logprobs = llm.generate(ids[:len(llm.encode(prompt))], max_tokens=1, prompt_logprobs=3).prompt_logprobs
    for top, theirs in zip(choice.logprobs.top_logprobs[1:], prompt_logprobs):
        assert len(top) == len({**theirs.top, theirs.token: theirs.logprob})  # no two tokens under one key


def _is_piece(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_logit_bias_and_penalties_steer_greedy_choices(server, client):
    llm = server.llm
    prompt = "List the days of the week: Monday, Tuesday,"
    plain = llm.generate(prompt, max_tokens=6, temperature=0)
    first = plain.tokens[0]
    banned = client.completions.create(model=llm.name, prompt=prompt, max_tokens=6, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != plain.text
    assert banned.choices[0].text == llm.generate(prompt, max_tokens=6, temperature=0,
                                                  logit_bias={first: -100}).text
    forced = client.completions.create(model=llm.name, prompt=prompt, max_tokens=3, temperature=0, logprobs=0,
                                       logit_bias={"42": 100})
    assert forced.choices[0].logprobs.tokens == [llm.tokenizer.decode([42])] * 3
    penalised = client.completions.create(model=llm.name, prompt=prompt, max_tokens=6, temperature=0,
                                          extra_body={"repetition_penalty": 1.3, "frequency_penalty": 1.0})
    assert penalised.choices[0].text == llm.generate(prompt, max_tokens=6, temperature=0, repetition_penalty=1.3,
                                                     frequency_penalty=1.0).text


def test_tokenize_counts_what_the_routes_count(server, client):
    """vLLM's /tokenize and /detokenize: a prompt's ids and a chat's (template and tool prompt applied) are the
    ones the completion routes then count as prompt tokens."""
    llm = server.llm

    def post(path, body):
        return post_to(server, path, body)

    text = "The capital of France is"
    ids = post("/tokenize", {"prompt": text}).json()
    assert ids["tokens"] == llm.encode(text) and ids["max_model_len"] == llm.generator.capacity
    assert ids["count"] == client.completions.create(model=llm.name, prompt=text, max_tokens=1).usage.prompt_tokens
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    chat = post("/tokenize", {"messages": messages, "tools": [WEATHER]}).json()
    usage = client.chat.completions.create(model=llm.name, messages=messages, tools=[WEATHER], max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens
    assert post("/detokenize", {"tokens": ids["tokens"]}).json()["prompt"] == llm.tokenizer.decode(ids["tokens"])
    assert post("/tokenize", {}).status_code == 400
    assert post("/detokenize", {"tokens": [10 ** 9]}).status_code == 400


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}


def test_tool_call_round_trip(server, client):
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    done = client.chat.completions.create(model=server.llm.name, messages=messages, tools=[WEATHER],
                                          tool_choice="required", max_tokens=40, temperature=0, logprobs=True)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    asked = post_to(server, "/tokenize", {"messages": messages, "tools": [WEATHER]}).json()["tokens"]
    written = "".join(e.token for e in choice.logprobs.content)  # the call as the model wrote it
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    # Sent back as the client got it (a name and arguments), the call is the model's own text again, and the
    # second request reuses the first one's prompt and reply from the prefix cache.
    history = post_to(server, "/tokenize", {"messages": messages, "tools": [WEATHER]}).json()["tokens"]
    assert history[:len(asked)] == asked
    assert server.llm.tokenizer.decode(history[len(asked):]).startswith(written)
    reply = client.chat.completions.create(model=server.llm.name, messages=messages, tools=[WEATHER],
                                           max_tokens=30, temperature=0)
    assert reply.choices[0].message.content or reply.choices[0].message.tool_calls
    reused = reply.usage.prompt_tokens_details.cached_tokens
    assert reused >= (len(asked) + done.usage.completion_tokens) // 16 * 16, (reused, len(asked))
    streamed = list(client.chat.completions.create(model=server.llm.name, messages=messages[:1], tools=[WEATHER],
                                                   tool_choice="required", max_tokens=40, temperature=0,
                                                   stream=True))
    calls = [c for chunk in streamed for c in (chunk.choices[0].delta.tool_calls or []) if chunk.choices]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == json.loads(call.function.arguments)
    streamed_call = {"id": calls[0].id, "type": "function", "function": calls[0].function.model_dump()}
    messages[1:3] = [{"role": "assistant", "tool_calls": [streamed_call]}, {**messages[2], "tool_call_id": calls[0].id}]
    assert post_to(server, "/tokenize", {"messages": messages, "tools": [WEATHER]}).json()["tokens"] == history


def test_json_schema_output_validates(server, client):
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "number"}}, "required": ["city", "country", "population_millions"],
        "additionalProperties": False}
    done = client.chat.completions.create(
        model=server.llm.name, max_tokens=80, temperature=0.7, seed=1,
        messages=[{"role": "user", "content": "Describe the capital of France as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    jsonschema.validate(json.loads(done.choices[0].message.content), schema)
    anything = client.chat.completions.create(model=server.llm.name, messages=QUESTION, max_tokens=60,
                                              temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    # On completions too (as vLLM takes it), each prompt's choices: it had been ignored there (free text).
    texts = client.completions.create(model=server.llm.name, prompt=["The capital of France:", "Paris is"], n=2,
                                      max_tokens=40, temperature=0.7, seed=1, extra_body={"response_format": {
                                          "type": "json_schema", "json_schema": {"name": "city", "schema": schema}}})
    assert len(texts.choices) == 4
    for choice in texts.choices:
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.text), schema)
        else:
            assert choice.text.startswith('{"city": "')


def test_wrong_key_is_rejected(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=server.llm.name, messages=QUESTION, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def _echoed(client, server, target: str, stream: bool, **extra):
    """The default model made to write `target` (it repeats an earlier exchange), through OpenAI's own stream
    accumulator when streamed."""
    from openai.lib.streaming.chat import ChatCompletionStreamState

    messages = [{"role": "system", "content": "You repeat the user's text exactly, with nothing added."},
                {"role": "user", "content": target}, {"role": "assistant", "content": target},
                {"role": "user", "content": target}]
    request = dict(model=server.llm.name, messages=messages, tools=[WEATHER], max_tokens=50, temperature=0, **extra)
    if not stream:
        return client.chat.completions.create(**request).choices[0]
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(**request, stream=True):
        state.handle_chunk(chunk)
    return state.current_completion_snapshot.choices[0]


def test_a_call_after_text_streams_as_it_answers_and_parallel_calls_can_be_refused(server, client):
    # A `<function=...>` call after some text had streamed as text too (its markup in `content`) besides the call.
    target = 'Let me check. <function=get_weather>{"city": "Paris"}</function>'
    whole, streamed = (_echoed(client, server, target, stream) for stream in (False, True))
    for choice in whole, streamed:
        assert choice.finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
            ("get_weather", {"city": "Paris"})]
    assert streamed.message.content == whole.message.content == "Let me check. "
    # parallel_tool_calls false: at most one call (the first), where both had come back.
    two = '<function=get_weather>{"city": "Paris"}</function><function=get_weather>{"city": "Rome"}</function>'
    assert len(_echoed(client, server, two, False).message.tool_calls) == 2
    for stream in (False, True):
        [call] = _echoed(client, server, two, stream, parallel_tool_calls=False).message.tool_calls
        assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_vllms_continuous_usage_stats_is_refused_not_ignored(server):
    """vLLM's stream_options.continuous_usage_stats asks for usage in every chunk: herd had streamed without it."""
    body = {"messages": QUESTION, "max_tokens": 1, "stream": True}
    refused = post_to(server, "/v1/chat/completions", {**body, "stream_options": {"continuous_usage_stats": True}})
    assert refused.status_code == 400 and "continuous_usage_stats" in refused.json()["error"]["message"], refused.text
    for options in ({"continuous_usage_stats": False}, {"include_usage": True}):
        assert post_to(server, "/v1/chat/completions", {**body, "stream_options": options}).status_code == 200
