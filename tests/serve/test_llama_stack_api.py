"""Llama Stack's inference routes on the real server: requests built with llama-stack's own pydantic models (what its
client sends), answers validated by them, and the same replies as the OpenAI routes give on the same engine."""
import json

import httpx
import pytest

from serve_helpers import KEY
from herd.quant.kernel import ops


@pytest.fixture(scope="module")
def ls(llama_stack):
    return llama_stack("llama_stack.apis.inference.inference")


def post(server, path, body):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)


def events(server, path, body):
    with httpx.stream("POST", server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=600) as response:
        assert response.status_code == 200
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def dump(models):
    return [m.model_dump(mode="json", exclude_none=True) for m in models]


QUESTION = "What is the capital of France?"


def test_chat_completion_equals_the_openai_route(server, client, ls):
    llm = server.llm
    body = {"model_id": llm.name, "messages": dump([ls.UserMessage(content=QUESTION)]),
            "sampling_params": ls.SamplingParams(max_tokens=24).model_dump(mode="json")}
    answer = post(server, "/v1/inference/chat-completion", body)
    assert answer.status_code == 200, answer.text
    reply = ls.ChatCompletionResponse.model_validate(answer.json())
    openai = client.chat.completions.create(model=llm.name, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=24, temperature=0)
    assert reply.completion_message.content == openai.choices[0].message.content
    expected = {"stop": "end_of_turn", "length": "out_of_tokens"}[openai.choices[0].finish_reason]
    assert reply.completion_message.stop_reason.value == expected
    usage = {m.metric: m.value for m in reply.metrics}
    assert usage["prompt_tokens"] == openai.usage.prompt_tokens
    assert usage["completion_tokens"] == openai.usage.completion_tokens

    streamed = events(server, "/v1/inference/chat-completion", {**body, "stream": True})
    chunks = [ls.ChatCompletionResponseStreamChunk.model_validate(e) for e in streamed]
    assert [c.event.event_type.value for c in chunks][::len(chunks) - 1] == ["start", "complete"]
    assert "".join(c.event.delta.text for c in chunks) == reply.completion_message.content
    assert chunks[-1].event.stop_reason == reply.completion_message.stop_reason


def test_models_listed_as_llama_stack_lists_them(server, llama_stack):
    models = llama_stack("llama_stack.apis.models.models")
    headers = {"Authorization": f"Bearer {KEY}"}
    listed = models.ListModelsResponse.model_validate(httpx.get(server.url + "/v1/models", headers=headers).json())
    assert [(m.identifier, m.model_type.value, m.provider_id) for m in listed.data] == \
        [(server.llm.name, "llm", "herd")]
    one = httpx.get(server.url + f"/v1/models/{server.llm.name}", headers=headers)
    assert models.Model.model_validate(one.json()).model_id == server.llm.name


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}


def test_tool_calls_round_trip_like_the_openai_route(server, client, ls):
    llm = server.llm
    tool = ls.ToolDefinition(tool_name="get_weather", description="The current weather in a city",
                             parameters={"city": ls.ToolParamDefinition(param_type="string", description="the city")})
    ask = ls.UserMessage(content="What is the weather in Paris?")
    body = {"model_id": llm.name, "messages": dump([ask]), "tools": dump([tool]),
            "tool_config": ls.ToolConfig(tool_choice="required").model_dump(mode="json"),
            "sampling_params": {"max_tokens": 60}}
    answer = post(server, "/v1/inference/chat-completion", body)
    message = ls.ChatCompletionResponse.model_validate(answer.json()).completion_message
    openai = client.chat.completions.create(
        model=llm.name, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
        tool_choice="required", max_tokens=60, temperature=0).choices[0].message
    assert len(message.tool_calls) == 1 and message.tool_calls[0].tool_name == "get_weather"
    assert message.tool_calls[0].arguments == json.loads(openai.tool_calls[0].function.arguments)
    streamed = [ls.ChatCompletionResponseStreamChunk.model_validate(e)
                for e in events(server, "/v1/inference/chat-completion", {**body, "stream": True})]
    calls = [c.event.delta.tool_call for c in streamed if c.event.delta.type == "tool_call"]
    assert [(c.tool_name, c.arguments) for c in calls] == [("get_weather", message.tool_calls[0].arguments)]

    # The call and its result go back as the next turn's history, and encode as the OpenAI route encodes its own
    # call sent back (each the ids the model wrote).
    result = ls.ToolResponseMessage(call_id=message.tool_calls[0].call_id, content='{"temperature_c": 21}')
    history = dump([ask, message, result])
    again = post(server, "/v1/inference/chat-completion", {**body, "messages": history, "tool_config": None})
    assert again.status_code == 200, again.text
    prompt_tokens = {m["metric"]: m["value"] for m in again.json()["metrics"]}["prompt_tokens"]
    openai_history = [{"role": "user", "content": "What is the weather in Paris?"},
                      openai.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": openai.tool_calls[0].id, "content": '{"temperature_c": 21}'}]
    usage = client.chat.completions.create(model=llm.name, messages=openai_history, tools=[WEATHER], max_tokens=1,
                                           temperature=0).usage
    assert prompt_tokens == usage.prompt_tokens


def test_a_call_with_nested_arguments_is_one_llama_stack_reads(server, ls):
    """llama-stack's ToolCall takes arguments nested one level at most: a matrix had been sent as an object it
    refuses (14 validation errors, streamed or not); it goes as JSON text, as the agents route sends it."""
    body = {"model_id": server.llm.name,
            "messages": [{"role": "user", "content": "Call matmul with matrix [[1, 2], [3, 4]]."}],
            "tools": [{"tool_name": "matmul", "description": "Multiply matrices given as lists of rows",
                       "parameters": {"matrix": {"param_type": "array",
                                                 "description": "rows, e.g. [[1, 2], [3, 4]]"}}}],
            "tool_config": {"tool_choice": "required"}, "sampling_params": {"max_tokens": 60}}
    answer = post(server, "/v1/inference/chat-completion", body).json()
    [call] = ls.ChatCompletionResponse.model_validate(answer).completion_message.tool_calls
    [streamed] = [c.event.delta.tool_call for c in map(ls.ChatCompletionResponseStreamChunk.model_validate,
                                                        events(server, "/v1/inference/chat-completion",
                                                               {**body, "stream": True}))
                  if c.event.delta.type == "tool_call"]
    assert json.loads(call.arguments_json) == json.loads(streamed.arguments_json)
    assert json.loads(call.arguments_json) == {"matrix": [[1, 2], [3, 4]]} and call.arguments == call.arguments_json


def test_a_tool_whose_parameters_are_typed_as_python_names_them_is_called(server):
    """Llama Stack's examples type parameters "int" or "str": such a tool had been refused as soon as a call was
    demanded (the grammar took "int" for a JSON Schema type); its prompt keeps the types as written."""
    body = {"model_id": server.llm.name, "messages": [{"role": "user", "content": "Add 2 and 3."}],
            "tools": [{"tool_name": "add", "parameters": {"a": {"param_type": "int"}, "b": {"param_type": "int"}}}],
            "tool_config": {"tool_choice": "add"}, "sampling_params": {"max_tokens": 40}}
    answer = post(server, "/v1/inference/chat-completion", body)
    assert answer.status_code == 200, answer.text
    call = answer.json()["completion_message"]["tool_calls"][0]
    assert call["tool_name"] == "add" and all(type(v) is int for v in call["arguments"].values())


def test_completion_and_its_stream(server, ls):
    llm = server.llm
    body = {"model_id": llm.name, "content": "Once upon a time", "sampling_params": {"max_tokens": 10},
            "logprobs": {"top_k": 2}}
    reply = ls.CompletionResponse.model_validate(post(server, "/v1/inference/completion", body).json())
    assert reply.content == llm.generate("Once upon a time", max_tokens=10, temperature=0).text
    assert len(reply.logprobs) == 10 and all(len(lp.logprobs_by_token) >= 2 for lp in reply.logprobs)
    chunks = [ls.CompletionResponseStreamChunk.model_validate(e)
              for e in events(server, "/v1/inference/completion", {**body, "stream": True})]
    assert "".join(c.delta for c in chunks) == reply.content
    assert chunks[-1].stop_reason == reply.stop_reason and all(c.stop_reason is None for c in chunks[:-1])
    # A stop string that never completes holds each token's text back a while, never its log-probabilities.
    held = {**body, "sampling_params": {"max_tokens": 10, "stop": ["@" * 40]}, "stream": True}
    chunks = [ls.CompletionResponseStreamChunk.model_validate(e)
              for e in events(server, "/v1/inference/completion", held)]
    assert [lp.logprobs_by_token for c in chunks for lp in c.logprobs or []] == [
        lp.logprobs_by_token for lp in reply.logprobs]


def test_batch_routes_equal_one_request_at_a_time(server, ls):
    """Batch inference: every conversation (or text) in the engine at once, each reply what it gets alone."""
    llm = server.llm
    # Questions no other test asks (tests/serve/test_serve_cli.py counts on its own being new to the cache).
    questions = ["Say hello in French.", "Give a synonym for quick.", "Spell the word cat backwards."]
    params = {"max_tokens": 16}
    batch = post(server, "/v1/inference/batch-chat-completion", {
        "model_id": llm.name, "messages_batch": [dump([ls.UserMessage(content=q)]) for q in questions],
        "sampling_params": params})
    assert batch.status_code == 200, batch.text
    replies = ls.BatchChatCompletionResponse.model_validate(batch.json()).batch
    prompts = [llm.chat_prompt([{"role": "user", "content": q}]) for q in questions]
    assert [{m.metric: m.value for m in r.metrics}["prompt_tokens"] for r in replies] == [len(p) for p in prompts]
    if ops() is not None:
        # With herd's kernel a prompt computes alike in any company and however much of it the prefix cache held
        # (README, Serving): each reply is the one it gets alone. Without it (a GPU) prompts multiply in one GEMM
        # whose rounding may depend on how many rows share it.
        for question, reply in zip(questions, replies, strict=True):
            alone = post(server, "/v1/inference/chat-completion", {
                "model_id": llm.name, "messages": dump([ls.UserMessage(content=question)]),
                "sampling_params": params}).json()
            assert reply.completion_message.content == alone["completion_message"]["content"]
            assert [(m.metric, m.value) for m in reply.metrics] == [(m["metric"], m["value"]) for m in alone["metrics"]]
    texts = ["Once upon a time", "The capital of Italy is"]
    done = post(server, "/v1/inference/batch-completion", {"model_id": llm.name, "content_batch": texts,
                                                            "sampling_params": params})
    completions = ls.BatchCompletionResponse.model_validate(done.json()).batch
    assert len(completions) == 2 and all(c.content for c in completions)
    if ops() is not None:
        assert [c.content for c in completions] == [llm.generate(t, max_tokens=16, temperature=0).text for t in texts]
    streamed = post(server, "/v1/inference/batch-completion", {"model_id": llm.name, "content_batch": texts,
                                                                "stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("completion", {"model_id": "nope", "content": "x"}, 404, "model_id"),
    ("completion", {"content": "x"}, 400, "model_id"),
    ("completion", {"content": "x", "response_format": {"type": "grammar", "bnf": {}}}, 400, "response_format"),
    ("completion", {"content": "x", "sampling_params": {"strategy": {"type": "top_p", "temperature": -1}}}, 400,
     "sampling_params.strategy.temperature"),
    ("chat-completion", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0"),
    ("chat-completion", {"messages": []}, 400, "messages"),
    ("chat-completion", {"messages": [{"role": "user", "content": "x"}], "sampling_params": {"stop": [""]}}, 400,
     "sampling_params"),
    ("completion", {"content": ""}, 400, None),
    ("chat-completion", {"messages": [{"role": "user", "content": "x"}],
                         "tool_config": {"system_message_behavior": "replace"}}, 400, "tool_config"),
    # a call demanded with no tool to call (was answered with plain text)
    ("chat-completion", {"messages": [{"role": "user", "content": "x"}], "tool_config": {"tool_choice": "required"}},
     400, "tool_config.tool_choice"),
    # tool definitions no call could be made of: each had gone into the prompt unchecked under tool_choice auto
    ("chat-completion", {"messages": [{"role": "user", "content": "x"}],
                         "tools": [{"tool_name": "f", "parameters": {"q": {"param_type": "banana"}}}]}, 400,
     "tools.0.parameters.q.param_type"),
    ("chat-completion", {"messages": [{"role": "user", "content": "x"}], "tools": [{"tool_name": "weird name!"}]},
     400, "tools.0.tool_name"),
    ("chat-completion", {"messages": [{"role": "user", "content": "x"}],
                         "tools": [{"tool_name": "f"}, {"tool_name": "f"}]}, 400, "tools"),
])
def test_malformed_requests_get_specific_4xx(server, path, body, status, param):
    if "model_id" not in body and param != "model_id":
        body = {"model_id": server.llm.name, **body}
    answer = post(server, f"/v1/inference/{path}", body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param and answer.json()["error"]["message"]


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.mark.parametrize("path,body", [
    ("/v1/inference/completion", {"content": "A number:", "response_format": {"type": "json_schema",
                                                                               "json_schema": SCHEMA},
                                  "sampling_params": {"max_tokens": 8}}),
    ("/v1/inference/chat-completion", {"messages": [{"role": "user", "content": "A number?"}],
                                       "response_format": {"type": "json_schema", "json_schema": SCHEMA},
                                       "sampling_params": {"max_tokens": 8}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "A number?"}], "max_tokens": 8,
                              "response_format": {"type": "json_schema", "json_schema": {"name": "n",
                                                                                         "schema": SCHEMA}}}),
], ids=["llama-stack completion", "llama-stack chat", "openai chat"])
def test_a_grammar_compiles_while_other_requests_are_answered(server, monkeypatch, path, body):
    """A schema's grammar compiles on a worker thread: the server answers others meanwhile (a deep schema's compile
    took seconds before the limits on nesting and repeats, and the first one builds the vocabulary's tables)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    grammars = server.app.state.herd.grammars
    compile_ = grammars.constraint

    def slow(schema):
        time.sleep(1.5)
        return compile_(schema)

    monkeypatch.setattr(grammars, "constraint", slow)
    model = {"model_id": server.llm.name} if "inference" in path else {"model": server.llm.name}
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, server, path, {**model, **body})
        time.sleep(0.3)
        start = time.monotonic()
        health = httpx.get(server.url + "/health", timeout=30)
        waited = time.monotonic() - start
        assert answer.result().status_code == 200, answer.result().text
    assert health.status_code == 200 and waited < 0.8, waited
