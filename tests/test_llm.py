"""LLM's own logic on a tiny random model with the real Llama 3 tokenizer and chat format."""
import pytest
import torch

import herd
from herd.llm import LLM
from herd.model import ModelConfig, Transformer


def tiny_llm():
    torch.manual_seed(0)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_hidden_dim=128,
                         max_seq_len=256)
    tok = herd.load_tokenizer()
    return LLM(Transformer(config).eval(), tok, herd.ChatFormat(tok))


def test_choose_scores_each_choice_by_its_own_log_likelihood():
    llm = tiny_llm()
    messages = [{"role": "user", "content": "Pick one."}]
    choices = ["a", "much longer answer", "7"]
    scores = llm.choose(messages, choices)
    prompt = llm.chat_format.encode_dialog(messages)
    for choice in choices:
        reply = llm.tokenizer.encode(choice, bos=False)
        with torch.inference_mode():
            logp = torch.log_softmax(llm.model(torch.tensor([prompt + reply]))[0], -1)
        expected = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(reply))
        assert abs(scores[choice] - expected) < 1e-4


def test_generate_accepts_text_ids_and_batches():
    llm = tiny_llm()
    one = llm.generate("Hello", max_tokens=5, temperature=0, ignore_eos=True)
    same = llm.generate(llm.tokenizer.encode("Hello"), max_tokens=5, temperature=0, ignore_eos=True)
    batch = llm.generate(["Hello", "A longer prompt here"], max_tokens=5, temperature=0, ignore_eos=True)
    assert one.tokens == same.tokens == batch[0].tokens and len(batch) == 2
    assert "".join(llm.generate("Hello", max_tokens=5, temperature=0, ignore_eos=True, stream=True)) == one.text


def test_a_batch_of_requests_each_with_its_own_parameters_answers_each_as_alone():
    """As vLLM's LLM.generate takes a SamplingParams per prompt: one set had applied to every prompt of a batch."""
    llm = tiny_llm()
    prompts = ["Hello", "A longer prompt here", "Third"]
    params = [herd.generate.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
              herd.generate.SamplingParams(max_tokens=7, temperature=1.0, seed=3, ignore_eos=True, logprobs=2),
              herd.generate.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logit_bias={100: 50})]
    batch = llm.generate(prompts, sampling_params=params)
    for prompt, sp, got in zip(prompts, params, batch):
        alone = llm.generate(prompt, sampling_params=sp)
        assert got.tokens == alone.tokens and len(got.tokens) == sp.max_tokens
    assert batch[2].tokens == [100] * 5 and len(batch[1].logprobs) == 7 and batch[0].logprobs is None
    with pytest.raises(ValueError, match="sampling_params holds 2 sets for 3 prompts"):
        llm.generate(prompts, sampling_params=params[:2])
    with pytest.raises(TypeError, match=r"give sampling_params or SamplingParams fields \(temperature\), not both"):
        llm.generate(prompts, sampling_params=params, temperature=0)


def test_a_raw_prompt_reads_special_token_text_as_vllm_does_without_doubling_bos():
    """A client that renders its own template sends it as a completion's prompt: the markers are the special tokens
    (they had been encoded as the letters '<', '|', ...), as Meta's tokenizer gives them with allowed_special="all"."""
    from llama_models.llama3.tokenizer import Tokenizer

    meta = Tokenizer.get_instance()
    llm = tiny_llm()
    turn = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    expected = meta.encode(turn, bos=True, eos=False, allowed_special="all")
    assert llm.encode(turn) == expected
    assert llm.encode("<|begin_of_text|>" + turn) == expected           # a written BOS is not doubled
    assert llm.encode(turn, bos=False) == expected[1:]
    assert llm.encode("<|begin_of_text|><|begin_of_text|>x")[:2] == [meta.bos_id] * 2   # only the one herd adds goes


def test_the_engine_is_built_once_with_the_settings_given(monkeypatch):
    """herd.load(engine=...) and the CLI's KV cache option build the one engine they ask for, where a default one
    (its KV cache included) used to be built first and replaced."""
    import herd.llm
    from herd.cli import _load
    from herd.generate import EngineConfig, Generator

    built = []

    class Counted(Generator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.config)

    monkeypatch.setattr(herd.llm, "Generator", Counted)
    llm = herd.load(engine=EngineConfig(max_batch=3, prefix_caching=False))
    assert built == [llm.generator.config] and (llm.generator.config.max_batch, llm.generator.config.prefix_caching) \
        == (3, False)
    built.clear()
    llm = _load(None, "auto", None, 64, EngineConfig(max_batch=5))
    assert built == [llm.generator.config] and llm.generator.config.kv_cache_bytes == 64 << 20
    assert llm.generator.config.max_batch == 5


def test_wrong_argument_types_are_named():
    import numpy as np
    import pytest

    llm = tiny_llm()
    for messages in ([], "hello", {"role": "user", "content": "hi"}, ["hi"]):
        with pytest.raises(TypeError, match="messages must be a non-empty list of"):
            llm.chat(messages, max_tokens=2)
    for field, value, kind in (("seed", "7", "an integer"), ("max_tokens", 2.0, "an integer"),
                               ("temperature", True, "a number"), ("top_p", "0.9", "a number")):
        with pytest.raises(TypeError, match=f"{field} must be {kind}, got"):
            llm.generate("Hello", **{field: value})
    # numpy's scalars are numbers too
    assert len(llm.generate("Hello", max_tokens=np.int64(3), temperature=np.float32(0), ignore_eos=True).tokens) == 3


def test_a_device_this_machine_lacks_is_named_before_the_model_is_read(monkeypatch):
    import pytest

    import herd.checkpoint

    def unread(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the device was checked")

    monkeypatch.setattr(herd.checkpoint, "load_checkpoint", unread)
    # torch had answered with its list of forty device types, and cuda without one with an AssertionError
    for device, words in (("bogus", "'bogus' is no device"), ("meta", "meta device holds shapes"),
                          *([] if torch.cuda.is_available() else [("cuda", "device 'cuda' is not available here")])):
        with pytest.raises(ValueError, match=words) as refused:
            herd.load(device=device)
        assert "use cpu" in str(refused.value) and "\n" not in str(refused.value)


def test_arguments_of_the_wrong_kind_are_named_and_no_prompts_are_no_completions():
    import pytest

    llm = tiny_llm()
    for prompt in (None, 5, ["a", 5], [1, "a"]):  # had been "'NoneType' object is not iterable" and the like
        with pytest.raises(TypeError, match="a prompt must be text or a list of token ids"):
            llm.generate(prompt, max_tokens=2)
    assert llm.generate([], max_tokens=2) == []  # was "every prompt needs at least one token"
    import numpy as np

    ids = llm.encode("Hello")  # numpy's integers are token ids too, one prompt or a batch of them
    greedy = dict(max_tokens=2, temperature=0, ignore_eos=True)
    alone = llm.generate(ids, **greedy).tokens
    assert llm.generate(np.array(ids), **greedy).tokens == alone
    assert [c.tokens for c in llm.generate([[np.int64(t) for t in ids], ids], **greedy)] == [alone, alone]
    dialog = [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError, match="tools must be a list of tools"):  # had been "unknown tool 't'"
        llm.chat(dialog, "tools", max_tokens=2)
    with pytest.raises(ValueError, match="unknown tool prompt format 'xml'"):
        llm.chat(dialog, tool_prompt_format="xml", max_tokens=2)
    with pytest.raises(ValueError, match="choose needs a list of choices"):  # was "every prompt needs a token"
        llm.choose(dialog, [])
    for bad in ({"quantize": 5}, {"dtype": "float16"}):  # AttributeErrors: 'int' has no 'strip', 'str' no 'itemsize'
        with pytest.raises(TypeError, match=next(iter(bad)) + " must be"):
            herd.load(**bad)


def test_tool_choice_none_offers_no_tools_as_openai_has_it():
    llm = tiny_llm()
    dialog = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    params = dict(max_tokens=3, temperature=0, ignore_eos=True)
    # was "tool_choice names 'none', which is not among the tools"
    assert llm.chat(dialog, tools, tool_choice="none", **params) == llm.chat(dialog, **params)


def test_a_base_model_whose_tokenizer_has_no_chat_format_loads_and_generates(tmp_path):
    """A base checkpoint (no chat template, no Llama 3 header tokens) had been refused at load, though plain
    generation needs no chat format; chatting with it is what fails, by saying why."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from herd.checkpoint import save_checkpoint
    from herd.tokenizer import TokenizerError
    from herd.tokenizer.hf import BYTE_CHARS

    torch.manual_seed(0)
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=258, ffn_hidden_dim=64, max_seq_len=64)
    save_checkpoint((config, Transformer(config).state_dict()), tmp_path / "base", "hf")
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(BYTE_CHARS)}, merges=[]))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(tmp_path / "base" / "tokenizer.json"))
    llm = herd.load(tmp_path / "base", quantize=None)
    assert len(llm.generate("Hello", max_tokens=4, temperature=0, ignore_eos=True).tokens) == 4
    with pytest.raises(TokenizerError, match="no chat template and is not Llama 3's"):
        llm.chat([{"role": "user", "content": "Hi"}])


def test_load_checks_its_engine_settings_before_reading_the_model(tmp_path):
    with pytest.raises(TypeError, match="engine must be a herd.generate.EngineConfig .*, got dict"):
        herd.load(tmp_path / "never-read", engine={"max_batch": 0})


def test_the_readmes_names_resolve_in_a_fresh_interpreter():
    """As the README writes them, before anything else is loaded: herd.generate and herd.quant.schemes had been
    AttributeErrors until some herd.load ran, and herd.safety had no PromptGuard, load_guard or Shields."""
    import subprocess
    import sys

    code = ("import herd\n"
            "herd.generate.EngineConfig(max_batch=16)\n"
            "herd.quant.schemes.Scheme('fp8', keep=('output',))\n"
            "from herd.safety import CodeShield, LlamaGuard, PromptGuard, Shields, load_guard, llama_guard_prompt\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
