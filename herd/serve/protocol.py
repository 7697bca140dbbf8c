"""The OpenAI API's request bodies as pydantic models (strict: a wrong type is an error, never a guess), and the
errors it answers with."""
from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_STOP = 4


def token_bias(value: dict) -> dict[int, float]:
    """A JSON logit_bias ({"token id": bias}: JSON's keys are strings) as SamplingParams takes it; ValueError
    naming the first entry that is no token id or no bias from -100 to 100."""
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ValueError(f"{key!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ValueError(f"the bias of token {key} must be a number from -100 to 100")
    return {int(key): float(bias) for key, bias in value.items()}


class StrictModel(BaseModel):
    # Unknown fields are ignored, as OpenAI does; the known ones must have the right type.
    model_config = ConfigDict(strict=True, extra="ignore")
    # Fields whose API (OpenAI's, vLLM's, Llama Stack's) allows null for "the default": clients send it (the openai
    # SDK sends an explicit None as null), so null here is as if the field were left out; a wrong type is still an
    # error.
    null_means_default: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict) and cls.null_means_default:
            return {k: v for k, v in data.items() if v is not None or k not in cls.null_means_default}
        return data


def resource(identifier: str, kind: str) -> dict[str, Any]:
    """The fields Llama Stack gives one of a server's resources (a model, a shield): this server provides it."""
    return {"identifier": identifier, "provider_resource_id": identifier, "provider_id": "herd", "type": kind}


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error(error: Exception) -> APIError:
    """What a client is told of an exception no route expected: its kind, not its traceback."""
    return APIError(500, f"internal error: {type(error).__name__}", type="server_error")


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str


class ToolCall(StrictModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "ipython"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value):
        # Without this an image part failed every branch of the union: "Input should be a valid string".
        if isinstance(value, list):
            kinds = {part.get("type") for part in value if isinstance(part, dict)} - {"text"}
            if kinds:
                raise ValueError(f"only text content parts are supported, not {', '.join(map(repr, sorted(kinds)))}")
        return value

    @model_validator(mode="after")
    def _says_something(self) -> Message:
        # As OpenAI: only an assistant's turn that calls tools may leave its content out.
        if not self.content and self.content != "" and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def as_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        message["content"] = (self.content if isinstance(self.content, str) or self.content is None
                              else "".join(p.text for p in self.content))
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDef(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @model_validator(mode="after")
    def _a_json_schema(self) -> FunctionDef:
        from herd.tokenizer.tool_calls import check_function
        from herd.tools.functions import check_parameters

        check_parameters(self.name, self.parameters)
        check_function(self.name, self.parameters)
        return self


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDef


class ToolName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: ToolName


class JsonSchemaSpec(StrictModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's usage in every chunk: refused, as its other extensions herd lacks

    @field_validator("continuous_usage_stats")
    @classmethod
    def _once(cls, value):
        if value:
            raise ValueError("continuous_usage_stats=True (a vLLM extension) is not supported by herd; leave it out "
                             "or at False, and read the usage in the last chunk (include_usage)")
        return value


# vLLM's request fields herd does not implement, with the value that asks nothing of them.
_VLLM_UNSUPPORTED = {
    "include_stop_str_in_output": False, "prompt_logprobs": None, "min_tokens": 0, "use_beam_search": False,
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "truncate_prompt_tokens": None,
    "allowed_token_ids": None, "bad_words": None, "guided_json": None, "guided_regex": None, "guided_choice": None,
    "guided_grammar": None, "structured_outputs": None, "continue_final_message": False,
    "add_generation_prompt": True, "chat_template": None, "chat_template_kwargs": None, "echo": False,
}


class _Sampling(StrictModel):
    null_means_default = frozenset({"temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty",
                                    "top_k", "min_p", "repetition_penalty", "ignore_eos"})
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None  # on completions too, as vLLM takes it
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what a torch.Generator takes
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None  # token id (a string key in JSON) -> -100..100, added to its logit
    # vLLM's extensions, which its clients send: -1 and 0 mean no top-k.
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    # what benchmark clients (vllm bench serve --ignore-eos, genai-perf) send to fix the reply lengths
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported_extension(cls, data):
        # Unknown fields are ignored, as OpenAI's own are; these vLLM ones would change the answer, so a request
        # relying on them is refused instead of silently answered otherwise.
        if isinstance(data, dict):
            for name, default in _VLLM_UNSUPPORTED.items():
                if data.get(name, default) not in (default, None) and name not in cls.model_fields:
                    raise ValueError(f"{name}={data[name]!r} (a vLLM extension) is not supported by herd; leave it "
                                     f"out or at {default!r}")
        return data

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty",
                     mode="before")
    @classmethod
    def _number(cls, value):
        # Strict floats still take ints (temperature=1); bools are not numbers here.
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if isinstance(value, float) and not math.isfinite(value):  # JSON's 1e309 is infinite: no bound says so
            raise ValueError("must be a finite number")
        return float(value) if isinstance(value, int) else value

    @field_validator("stream_options")
    @classmethod
    def _streaming(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return stops

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias(cls, value):
        return token_bias(value) if isinstance(value, dict) else value


class ChatCompletionRequest(_Sampling):
    null_means_default = _Sampling.null_means_default | {"logprobs", "parallel_tool_calls"}
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True  # false: at most one call, the first (OpenAI's promise; vLLM keeps the first)

    # The function-calling fields OpenAI replaced by tools: refused, where ignoring them would answer without calls.
    functions: Any = None
    function_call: Any = None

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value, info: ValidationInfo):
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, value, info: ValidationInfo):
        # A call demanded with no tool to call would silently be plain text.
        if not info.data.get("tools") and value not in (None, "none", "auto"):
            raise ValueError("tool_choice 'required' or a named tool needs tools")
        return value

    @field_validator("functions", "function_call")
    @classmethod
    def _deprecated(cls, value, info: ValidationInfo):
        if value is not None:
            raise ValueError(f"{info.field_name} is deprecated and not supported: send tools and tool_choice")
        return value


class CompletionRequest(_Sampling):
    null_means_default = _Sampling.null_means_default | {"echo"}
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=0)  # 0 with echo: the prompt scored, nothing generated
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the prompt before the completion, and with logprobs its tokens' log-probabilities too
    # Accepted only where they change nothing, so that a request relying on them fails instead of silently
    # getting something else: Llama 3 has no fill-in-the-middle, and herd returns every sequence it samples.
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("a suffix (fill-in-the-middle) is not supported by Llama 3 models")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value, info: ValidationInfo):
        if value is not None and value != info.data.get("n"):
            raise ValueError("best_of other than n is not supported: ask for n choices and rank them (logprobs)")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if not value or (isinstance(value, list) and any(not p for p in value if not isinstance(p, int))):
            raise ValueError("the prompt must not be empty")
        return value


class TokenizeRequest(StrictModel):
    """vLLM's /tokenize: a prompt's ids, or a chat's (its template applied, the assistant's turn opened)."""

    model: str
    prompt: str | None = None
    messages: list[Message] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool = True  # for a prompt: the beginning-of-text token first, as completions add it


class DetokenizeRequest(StrictModel):
    model: str
    tokens: list[int]
