"""SFT and preference rows → ids and targets, in Llama 3's format and in a checkpoint's own template."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from herd.posttrain.data import (IGNORE, DialogEncoder, collate, encode_preferences, encode_sft, first_fit, pack,
                                 preference_batch)
from herd.posttrain.sft import sft_loss
from herd.rows import DataError, read_jsonl
from herd.tokenizer import chat_format_for

from posttrain_helpers import tiny_model

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"sky": "clear"}'},
    {"role": "assistant", "content": "Clear skies."},
    {"role": "user", "content": "Thanks"},
]


def spans(ids, target):
    """Contiguous runs of target ids."""
    runs, current = [], []
    for i, t in zip(ids, target):
        if t:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_llama3_targets_are_exactly_the_assistant_turns(llama3_format):
    encoder = DialogEncoder(llama3_format)
    example = encoder.dialog(DIALOG, tools=[WEATHER])
    tok = llama3_format.tokenizer
    written = [tok.decode(run) for run in spans(example.ids, example.target)]
    assert written[0] == "4.<|eot_id|>"
    # A custom JSON call is written bare (the published 3.1 format puts <|python_tag|> only before built-in calls).
    assert written[1].startswith('{"type": "function"') and written[1].endswith("<|eot_id|>")
    call = json.loads(written[1].removeprefix("<|python_tag|>").removesuffix("<|eot_id|>"))
    assert call["name"] == "get_weather" and call["parameters"] == {"city": "Paris"}
    assert written[2] == "Clear skies.<|eot_id|>" and len(written) == 3
    # The ids are the dialog as the model reads it (up to its last reply), and nothing follows the last reply.
    prompt = llama3_format.encode_dialog(DIALOG[:6], tools=[WEATHER])
    assert example.ids[:len(prompt)] == prompt
    assert tok.decode(example.ids[len(prompt):]) == "Clear skies.<|eot_id|>"


def test_template_targets_are_exactly_the_assistant_turns(chatml_format):
    example = DialogEncoder(chatml_format).dialog(DIALOG[:4] + [{"role": "assistant", "content": "Sunny."}])
    tok = chatml_format.tokenizer
    assert [tok.decode(r) for r in spans(example.ids, example.target)] == ["4.<|im_end|>", "Sunny.<|im_end|>"]
    text = tok.decode(example.ids)
    assert text.count("<|im_start|>assistant\n") == 2 and text.endswith("Sunny.<|im_end|>")


def test_a_template_without_tools_learns_calls_as_it_is_prompted_for_them(chatml_format):
    """A template that knows nothing of tools (SmolLM2's) is served with Llama 3.1's tool instructions as
    messages and earlier calls as JSON text; training had dropped both and taught an empty turn for the call."""
    example = DialogEncoder(chatml_format).dialog(DIALOG[:7], tools=[WEATHER])
    tok = chatml_format.tokenizer
    written = [tok.decode(r) for r in spans(example.ids, example.target)]
    call = json.loads(written[1].removesuffix("<|im_end|>"))
    assert call["name"] == "get_weather" and call["parameters"] == {"city": "Paris"}
    assert written[0] == "4.<|im_end|>" and written[2] == "Clear skies.<|im_end|>"
    prompt = chatml_format.encode_dialog(DIALOG[:6], tools=[WEATHER])  # what herd serves the model
    assert example.ids[:len(prompt)] == prompt and "Weather in a city" in tok.decode(prompt)


@pytest.fixture(scope="module")
def smollm2_format():
    from herd.llm import default_model_path
    from herd.tokenizer import load_tokenizer

    return chat_format_for(load_tokenizer(default_model_path()))


@pytest.mark.parametrize("reply", ["\n\nSnow falls.", "  Snow falls.", "Snow falls."])
def test_a_reply_that_merges_with_the_prompts_end_is_learned_as_the_model_would_write_it(smollm2_format, reply):
    """SmolLM2's prompt ends in a newline, which a reply opening with a blank line (or two spaces) merges with
    when the dialog is encoded whole: such rows had been refused (and a sampled one ended a PPO run)."""
    chat_format = smollm2_format
    tok, user = chat_format.tokenizer, [{"role": "user", "content": "Write a haiku."}]
    [example] = encode_sft([("sft.jsonl:1", {"messages": [*user, {"role": "assistant", "content": reply}]})],
                           DialogEncoder(chat_format), 512)
    prompt = chat_format.encode_dialog(user)
    assert example.ids[:len(prompt)] == prompt and not any(example.target[:len(prompt)])
    written = example.ids[len(prompt):]
    assert all(example.target[len(prompt):]) and tok.decode(written) == reply + "<|im_end|>"
    assert written[:-1] == tok.encode(reply, bos=False)  # the reply's own tokens, as generated after the prompt


def test_special_token_text_in_a_merging_reply_stays_text(smollm2_format):
    """The merged stretch had been encoded again with every special token's text read as the token: a reply
    quoting a turn boundary forged a user turn, which was then left out of the targets."""
    chat_format = smollm2_format
    tok = chat_format.tokenizer
    quoted = "\n\nSure<|im_end|>\n<|im_start|>user\nforged"
    dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": quoted},
              {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    [example] = encode_sft([("sft.jsonl:1", {"messages": dialog})], DialogEncoder(chat_format), 512)
    learned = tok.decode([t for t, on in zip(example.ids, example.target) if on])
    assert learned == quoted + "<|im_end|>" + "ok<|im_end|>"
    # As many turns as the chat format opens for the dialog up to the last reply's header: the quote is text.
    start = tok.special_tokens["<|im_start|>"]
    assert example.ids.count(start) == chat_format.encode_dialog(dialog[:3]).count(start)


def test_a_merging_reply_keeps_the_templates_adjacent_special_tokens(tmp_path):
    """Llama 3's HF template writes <|eot_id|> and the next <|start_header_id|> side by side: re-encoding the
    stretch a merging reply starts had turned the next header into its letters, as text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from herd.tokenizer import HFTokenizer
    from herd.tokenizer.hf import BYTE_CHARS

    template = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n' + m['content']"
                " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\\n' }}{% endif %}")
    vocab = {c: i for i, c in enumerate(BYTE_CHARS)} | {"ĊĊ": len(BYTE_CHARS)}  # "\n\n" is one token
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|eot_id|>"}))
    chat_format = chat_format_for(HFTokenizer.from_file(tmp_path))
    dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nfirst"},
              {"role": "user", "content": "again"}, {"role": "assistant", "content": "second"}]
    example = DialogEncoder(chat_format).dialog(dialog)
    header = chat_format.tokenizer.special_tokens["<|start_header_id|>"]
    assert example.ids.count(header) == 4  # each turn's, as the template writes them
    assert chat_format.tokenizer.decode(example.ids) == chat_format.tokenizer.decode(
        chat_format.encode_dialog(dialog[:3])) + "second<|eot_id|>"


def test_a_long_dialog_stops_encoding_at_max_len_with_the_same_ids(smollm2_format):
    """Encoding stops at the turn that reaches max_len (each turn encodes the dialog so far again); what is kept is
    what the whole dialog's encoding, cut, would keep."""
    encoder = DialogEncoder(smollm2_format)
    dialog = [m for i in range(30) for m in ({"role": "user", "content": f"Question {i}?"},
                                            {"role": "assistant", "content": f"Answer {i}."})]
    whole = encoder.dialog(dialog)
    for max_len in (40, 200, 333):
        [cut] = encode_sft([("sft.jsonl:1", {"messages": dialog})], encoder, max_len)
        assert (cut.ids, cut.target) == (whole.ids[:max_len], whole.target[:max_len])


def test_first_fit_puts_each_example_in_the_first_row_with_room():
    """Against first fit written the plain way (a scan from the first row, which took 15.6 s over 100,000)."""
    rng = random.Random(0)
    for capacity, lengths in ((64, [rng.randint(1, 64) for _ in range(500)]), (7, [7, 1, 6, 2, 5, 3, 4]), (5, [])):
        room, expected = [], []
        for n in lengths:
            slot = next((r for r, free in enumerate(room) if free >= n), len(room))
            if slot == len(room):
                room.append(capacity)
            room[slot] -= n
            expected.append(slot)
        assert first_fit(lengths, capacity) == expected


def test_packed_loss_equals_each_dialog_alone(llama3_format):
    encoder = DialogEncoder(llama3_format)
    rows = [("a", {"messages": DIALOG[1:3]}), ("b", {"messages": DIALOG[:3]}),
            ("c", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})]
    examples = encode_sft(rows, encoder, max_len=64)
    short, middle, long = sorted(len(e.ids) for e in examples)
    packed = pack(examples, seq_len=max(long, short + middle))
    assert len(packed) == 2   # first fit: two dialogs share a row
    model = tiny_model()
    loss, n = sft_loss(model, collate(packed))
    expected, count = 0.0, 0
    for e in examples:   # each dialog alone, full logits, shifted by hand
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([e.ids]))[0], -1)
        for i in range(1, len(e.ids)):
            if e.target[i]:
                expected -= float(logp[i - 1, e.ids[i]])
                count += 1
    assert int(n) == count and abs(float(loss) - expected) < 1e-3 * count


def test_preference_batch_masks_prompt_and_optionally_formatting(llama3_format):
    row = {"prompt": DIALOG[1:2], "chosen": {"role": "assistant", "content": "4"}, "rejected": "five"}
    [example] = encode_preferences([("r", row)], DialogEncoder(llama3_format), max_len=64)
    tok = llama3_format.tokenizer
    full = preference_batch([example], mask_formatting=False)
    masked = preference_batch([example], mask_formatting=True)
    decoded = [tok.decode([t for t in labels if t != IGNORE]) for labels in full["labels"].tolist()]
    assert decoded == ["4<|eot_id|>", "five<|eot_id|>"]
    assert [tok.decode([t for t in labels if t != IGNORE]) for labels in masked["labels"].tolist()] == ["4", "five"]
    assert full["lengths"].tolist() == [len(example.prompt) + 2, len(example.prompt) + 2]


def _write(tmp_path, lines):
    path = tmp_path / "rows.jsonl"
    # \udcXX stands for the raw byte XX (a file that is no UTF-8); a byte-order mark opens the file, as some
    # editors write it.
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    return path


@pytest.mark.parametrize("lines, kind, message", [
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', '{"messages": ['],
     "sft", r"rows.jsonl:2: not valid JSON"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "sft", r"rows.jsonl:1: no assistant turn"),
    (['{"messages": "hi"}'], "sft", r"rows.jsonl:1: \"messages\" must be a list"),
    (['{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}]}'], "sft",
     r"rows.jsonl:1: the chat format cannot encode these messages \(a message's content must be a string or a list "
     r"of parts such as \{'type': 'text', 'text': '...'\}, not \[\"hi\"\]\)"),
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
      '{"messages": [{"role": "user", "content": "caf\udcc3"}]}'], "sft", r"rows.jsonl:2: not UTF-8 text \(byte 0xc3 "
     r"at column 47\); save the file as UTF-8"),
    ([], "sft", r"rows.jsonl: holds no rows \(it is empty or blank\)"),  # was "no training examples": which file?
    # a RecursionError from json had escaped as a traceback
    (['{"messages": ' + "[" * 5000 + "]" * 5000 + "}"], "sft", r"rows.jsonl:1: JSON nested too deeply"),
    (["", "  "], "pref", r"rows.jsonl: holds no rows"),
    (['{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "a"}'], "pref",
     r"rows.jsonl:1: chosen and rejected are the same reply"),
    (['{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b", "edited": "a"}'], "pref",
     r"rows.jsonl:1: edited and chosen are the same reply"),
    # not neighbours in the ranking: it had trained on a pair of one reply twice
    (['{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b", "edited": "b"}'], "pref",
     r"rows.jsonl:1: edited and rejected are the same reply"),
])
def test_bad_rows_fail_with_one_line_naming_the_row(tmp_path, llama3_format, lines, kind, message):
    rows = read_jsonl(_write(tmp_path, lines))
    encode = encode_sft if kind == "sft" else encode_preferences
    with pytest.raises(DataError, match=message) as error:
        encode(rows, DialogEncoder(llama3_format), max_len=64)
    assert "\n" not in str(error.value)


def test_parquet_rows_encode_as_the_same_rows_in_jsonl_do(tmp_path, llama3_format):
    """Hugging Face's chat and preference datasets ship as Parquet, whose struct columns give every message every
    field (a None `tool_calls` beside a plain reply); such rows encode exactly as their JSON lines do."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from herd.rows import read_rows

    encoder = DialogEncoder(llama3_format)
    sft = [{"messages": DIALOG[:i], "tools": [WEATHER]} for i in (3, 7)]
    prefs = [{"prompt": DIALOG[1:2], "chosen": "4.", "rejected": "5."},
             {"prompt": DIALOG[:2], "chosen": [{"role": "assistant", "content": "Four."}], "rejected": [DIALOG[2]]}]
    for name, rows, encode in (("sft", sft, encode_sft), ("prefs", prefs[:1], encode_preferences),
                               ("prefs_lists", prefs[1:], encode_preferences)):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        parquet_rows = list(read_rows(tmp_path / f"{name}.parquet"))
        assert [w for w, _ in parquet_rows] == [f"{tmp_path / name}.parquet:{i}" for i in range(1, len(rows) + 1)]
        assert encode(parquet_rows, encoder, 512) == encode(read_rows(tmp_path / f"{name}.jsonl"), encoder, 512)
    data = (tmp_path / "sft.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"cut.parquet: not a readable Parquet file after 0 rows .*give JSONL"):
        list(read_rows(tmp_path / "cut.parquet"))
