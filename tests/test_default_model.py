"""The built-in default model (real SmolLM2-135M-Instruct weights) against transformers running the same GGUF."""
import warnings

import pytest
import torch

import herd

pytestmark = pytest.mark.heavy
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm_f32():
    return herd.load(quantize=None)


@pytest.fixture(scope="module")
def reference(smollm2_transformers_model, smollm2_transformers):
    warnings.filterwarnings("ignore")
    return smollm2_transformers_model, smollm2_transformers


def test_chat_prompt_and_greedy_reply_equal_transformers_token_for_token(llm_f32, reference):
    model, tokenizer = reference
    expected_prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    expected_prompt = list(expected_prompt["input_ids"] if hasattr(expected_prompt, "keys") else expected_prompt)
    prompt = llm_f32.chat_format.encode_dialog(QUESTION)
    assert prompt == expected_prompt
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    ours = llm_f32.generate(prompt, max_tokens=24, temperature=0)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ours.tokens == out[:out.index(end)] and ours.stop_token == end
    assert "Paris" in ours.text


def test_logits_equal_transformers_on_real_weights(llm_f32, reference):
    model, _ = reference
    tokens = llm_f32.tokenizer.encode("The Eiffel Tower is in the city of Paris, which is the capital of", bos=False)
    with torch.inference_mode():
        theirs = model(torch.tensor([tokens])).logits.float()
        ours = llm_f32.model(torch.tensor([tokens]))
    assert (ours - theirs).abs().max() < 1e-3


def test_quantized_default_keeps_the_answers_of_float32(llm_f32):
    llm = herd.load()  # a quantized GGUF is computed on its own blocks by default
    assert type(llm.model.layers[0].attention.wq).__name__ == "BlockLinear"
    reply = llm.chat(QUESTION, temperature=0, max_tokens=32)
    assert "Paris" in reply["content"] and reply["stop_reason"] == "end_of_turn"
    text = open(herd.__file__).read() + " The quick brown fox jumps over the lazy dog. " * 4
    tokens = torch.tensor([llm.tokenizer.encode(text)[:200]])
    with torch.inference_mode():
        agree = (llm.model(tokens).argmax(-1) == llm_f32.model(tokens).argmax(-1)).float().mean()
    assert agree > 0.85
