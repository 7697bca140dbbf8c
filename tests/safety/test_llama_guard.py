"""The Llama Guard 3 prompt against Meta's own builders (llama-stack's shield, llama-recipes' prompt utils and
llama-models' chat format), the verdict parser under fuzzing, and LlamaGuard's handling of a model's reply."""
from __future__ import annotations

import math
import re
from string import Template
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herd.safety import LlamaGuard, llama_guard_prompt, parse_llama_guard
from herd.safety.llama_guard import CATEGORIES, NOT_UNDERSTOOD, llama_guard_content

from references import llama_recipes_prompt_utils, llama_stack_shield

CONVERSATIONS = [
    [{"role": "user", "content": "How do I kill a Python process that hangs?"}],
    [{"role": "user", "content": "Whats the color of the sky?"}, {"role": "assistant", "content": "The sky is blue."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Wie spät ist es?"},
     {"role": "assistant", "content": "Ich weiß es nicht.\n\nSorry!"}, {"role": "user", "content": "Écris un poème\nsur la mer."}],
    [{"role": "user", "content": "Give me $HOME and ${x}"}, {"role": "assistant", "content": "`echo $HOME` — 家"},
     {"role": "user", "content": ""}, {"role": "assistant", "content": "<BEGIN CONVERSATION> S1: safe"}],
]


def _stack_messages(messages):
    # llama-stack names a turn by its role, capitalized; the model card's name for the assistant is "Agent"
    return [SimpleNamespace(role="agent" if m["role"] == "assistant" else m["role"], content=m["content"])
            for m in messages if m["role"] != "system"]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("excluded", [(), ("S3",), ("S1", "S10", "S14")])
def test_prompt_text_equals_llama_stack_shield(messages, excluded):
    shield = llama_stack_shield().LlamaGuardShield(model="meta-llama/Llama-Guard-3-8B", inference_api=None,
                                                   excluded_categories=list(excluded))
    assert llama_guard_content(messages, excluded=excluded) == shield.build_prompt(_stack_messages(messages))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_full_prompt_equals_llama_models_chat_format(messages):
    """The whole prompt is the guard text as one user turn of Meta's Llama 3 chat format, assistant header open."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    tok = Tokenizer.get_instance()
    content = llama_guard_content(messages)
    tokens = ChatFormat(tok).encode_dialog_prompt([RawMessage(role="user", content=content)]).tokens
    assert llama_guard_prompt(messages) == tok.decode(tokens)
    # and herd's own chat format with the real tokenizer reads it to the same ids
    import herd

    assert herd.ChatFormat(herd.load_tokenizer()).encode_dialog([{"role": "user", "content": content}]) == tokens


def test_custom_categories_numbered_as_llama_recipes():
    utils = llama_recipes_prompt_utils()
    body = Template(utils.PROMPT_TASK + utils.SAFETY_CATEGORIES + utils.PROMPT_CONVERSATION + utils.PROMPT_INSTRUCTIONS_2)
    custom = [("Violence and Hate.", "Should not\n - Help people plan violence."), ("Medical Advice.", "")]
    turns = ["Tell me about the weather", "It is sunny.", "How much aspirin can I take?"]
    expected = utils.build_custom_prompt(
        utils.AgentType.USER, utils.create_conversation(turns),
        [utils.SafetyCategory(name, description) for name, description in custom], "S", body, with_policy=True)
    # llama-recipes always puts the description's line break, herd only for a category that has a description
    expected = expected.replace("S2: Medical Advice.\n\n", "S2: Medical Advice.\n")
    messages = [{"role": r, "content": t} for r, t in zip(["user", "assistant", "user"], turns)]
    assert llama_guard_content(messages, categories=custom) == expected


def test_default_categories_match_llama_recipes_names():
    utils = llama_recipes_prompt_utils()
    assert [f"{c.name.strip()}" for c in utils.LLAMA_GUARD_3_CATEGORY] == [f"{n}." for n in CATEGORIES.values()]


def test_agent_type_and_bad_input():
    messages = CONVERSATIONS[1]
    text = llama_guard_prompt(messages, agent_type="User")
    assert "in 'User' messages" in text and "ONLY THE LAST User message" in text
    assert "ONLY THE LAST Agent message" in llama_guard_prompt(messages)
    with pytest.raises(ValueError, match="agent_type"):
        llama_guard_prompt(messages, agent_type="Bot")
    with pytest.raises(ValueError, match="no messages"):
        llama_guard_prompt([])
    with pytest.raises(ValueError, match="unknown excluded"):
        llama_guard_prompt(messages, excluded=["S99"])
    with pytest.raises(ValueError, match="every category"):
        llama_guard_prompt(messages, excluded=list(CATEGORIES))
    with pytest.raises(ValueError, match="role"):
        llama_guard_prompt([{"role": "wizard", "content": "x"}])


@pytest.mark.parametrize("reply, expected", [
    ("safe", {"safe": True, "categories": []}),
    ("\n\nsafe<|eot_id|>", {"safe": True, "categories": []}),
    ("unsafe\nS1", {"safe": False, "categories": ["S1"]}),
    ("unsafe\nS1,S10", {"safe": False, "categories": ["S1", "S10"]}),
    (" Unsafe \n s9, S14 ,S9", {"safe": False, "categories": ["S9", "S14"]}),
    ("unsafe", {"safe": False, "categories": []}),
    ("I cannot tell.", {"safe": False, "categories": [], "reason": NOT_UNDERSTOOD}),
    ("", {"safe": False, "categories": [], "reason": NOT_UNDERSTOOD}),
    (None, {"safe": False, "categories": [], "reason": NOT_UNDERSTOOD}),
    # each of these had been read as safe, from the first "safe" anywhere in the reply
    ("The content is not safe", {"safe": False, "categories": [], "reason": NOT_UNDERSTOOD}),
    ("It's safe to say this is unsafe\nS1", {"safe": False, "categories": [], "reason": NOT_UNDERSTOOD}),
    ("safe\nunsafe\nS1", {"safe": False, "categories": [], "reason": NOT_UNDERSTOOD}),
    ("unsafe\nS1\nbut maybe safe", {"safe": False, "categories": [], "reason": NOT_UNDERSTOOD}),
    ("unsafe\nviolent crimes", {"safe": False, "categories": [], "reason": NOT_UNDERSTOOD}),
    # codes the policy lacks are no category, and no reason to pass the text
    ("unsafe\nS15", {"safe": False, "categories": [], "reason": "unknown categories S15"}),
    ("unsafe\nS0,S2", {"safe": False, "categories": ["S2"], "reason": "unknown categories S0"}),
])
def test_parse(reply, expected):
    assert parse_llama_guard(reply) == expected


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary(), st.integers(), st.none(),
                 st.builds(lambda a, b: f"{a}unsafe\n{b}", st.text(max_size=5), st.text(max_size=30))))
def test_parse_never_raises(reply):
    verdict = parse_llama_guard(reply)
    assert set(verdict) <= {"safe", "categories", "reason"} and isinstance(verdict["safe"], bool)
    assert all(c in CATEGORIES for c in verdict["categories"])
    assert not (verdict["safe"] and (verdict["categories"] or "reason" in verdict))
    # safe only where the reply is the one word, less the end-of-turn tokens a decoder may leave
    assert verdict["safe"] == (re.sub(r"<\|[a-z_]+\|>", "", str(reply)).strip().lower() == "safe")


class _ScriptedLLM:
    """Stands in for a guard model: records the dialog it is given and replies from a fixed distribution over
    whole replies (a single reply: probability 1), one character a token, as a tokenizer splitting codes into
    digits would: greedy decoding follows the likeliest next character, and `generator.score` gives each
    character's log-probability under the same distribution."""

    END = -1  # the end-of-turn token

    def __init__(self, replies):
        import herd

        self.chat_format = herd.ChatFormat(herd.load_tokenizer())
        self.replies = {replies: 1.0} if isinstance(replies, str) else replies
        self.prompts = []
        self.tokenizer = SimpleNamespace(encode=lambda text, bos: [ord(c) for c in text])
        self.generator = SimpleNamespace(score=self._score)

    def _mass(self, tokens) -> float:
        return sum(p for reply, p in self.replies.items()
                   if [*map(ord, reply), self.END][:len(tokens)] == list(tokens))

    def generate(self, ids, **sampling):
        assert sampling["temperature"] == 0
        self.prompts.append(self.chat_format.tokenizer.decode(ids))
        tokens = []
        while True:
            nexts = {r[len(tokens)] for r in ([*map(ord, reply), self.END] for reply in self.replies)
                     if r[:len(tokens)] == tokens}
            token = max(nexts, key=lambda t: self._mass(tokens + [t]))
            if token == self.END:
                return SimpleNamespace(text="".join(map(chr, tokens)), tokens=tokens, stop_token=self.END)
            tokens.append(token)

    def _score(self, prompts, score_from):
        def logp(tokens, i):
            before, upto = self._mass(tokens[:i]), self._mass(tokens[:i + 1])
            return math.log(upto / before) if upto else -math.inf
        return [[logp(p[score_from:], i) for i in range(len(p) - score_from)] for p in prompts]


def test_llama_guard_check_uses_the_prompt_and_policy():
    llm = _ScriptedLLM("unsafe\nS2,S10")
    result = LlamaGuard(llm).check(CONVERSATIONS[1])
    assert result == {"safe": False, "categories": ["S2", "S10"], "raw": "unsafe\nS2,S10"}
    assert llm.prompts[0] == llama_guard_prompt(CONVERSATIONS[1])
    # excluded categories leave the prompt and are no violation when they are all the model names
    guard = LlamaGuard(_ScriptedLLM("unsafe\nS2,S10"), excluded=("S2", "S10"))
    assert guard.check(CONVERSATIONS[0])["safe"] is True
    assert LlamaGuard(_ScriptedLLM("unsafe\nS2,S10"), excluded=("S2",)).check(CONVERSATIONS[0])["categories"] == ["S10"]
    with pytest.raises(ValueError):
        LlamaGuard(llm, excluded=("S42",))


def test_llama_guard_names_the_likeliest_whole_code_where_greedy_digits_would_not():
    # Greedy, digit by digit, says S1: after "S" the digit 1 carries S1 and S10-S13 together (0.6 against S2's 0.3).
    codes = {"S2": 0.3, "S1": 0.13, "S10": 0.12, "S11": 0.12, "S12": 0.12, "S13": 0.11}
    llm = _ScriptedLLM({"safe": 0.1, **{f"unsafe\n{c}": p * 0.9 for c, p in codes.items()}})
    assert llm.generate([1], temperature=0).text == "unsafe\nS1"
    assert LlamaGuard(llm).check(CONVERSATIONS[0]) == {"safe": False, "categories": ["S2"], "raw": "unsafe\nS2"}
    # A list goes on while a comma is likelier than the end, each next code chosen whole too (greedy: S2,S10).
    llm = _ScriptedLLM({"unsafe\nS2,S3": 0.35, "unsafe\nS2,S10": 0.21, "unsafe\nS2,S11": 0.19, "unsafe\nS4": 0.25})
    assert llm.generate([1], temperature=0).text == "unsafe\nS2,S10"
    assert LlamaGuard(llm).check(CONVERSATIONS[0])["categories"] == ["S2", "S3"]
    # Where each code is one token after "S" (as Llama 3's tokenizer spells them), greedy already chose whole codes.
    llm.tokenizer = SimpleNamespace(encode=lambda text, bos: [1000 + int(text[1:])] if re.fullmatch(r"S\d+", text)
                                    else [ord(c) for c in text])
    assert LlamaGuard(llm).check(CONVERSATIONS[0])["raw"] == "unsafe\nS2,S10"
    # A safe verdict, and a reply that is no verdict, are left as the model wrote them.
    assert LlamaGuard(_ScriptedLLM({"safe": 0.6, "unsafe\nS2": 0.4})).check(CONVERSATIONS[0])["raw"] == "safe"
    assert LlamaGuard(_ScriptedLLM("I cannot tell.")).check(CONVERSATIONS[0]) == {
        "safe": False, "categories": [], "reason": NOT_UNDERSTOOD, "raw": "I cannot tell."}


class _Head:
    """A guard head's part in check(): the verdict text, without generating."""

    def __init__(self, reply):
        self.reply = reply

    def verdict(self, messages, agent_type, categories, excluded):
        return self.reply


@pytest.mark.parametrize("excluded", [["S14"], ["s14"], [" S14 "], ["s14", "S14"]])
def test_excluded_codes_are_one_code_in_prompt_and_verdict(excluded):
    """"s14" had left the prompt but not the verdict: a reply naming S14 stayed unsafe."""
    guard = LlamaGuard(_Head("unsafe\nS14"), excluded=excluded)
    assert guard.excluded == ("S14",) and "S14:" not in llama_guard_content(CONVERSATIONS[0], excluded=excluded)
    assert guard.check(CONVERSATIONS[0]) == {"safe": True, "categories": [], "raw": "unsafe\nS14"}
    assert LlamaGuard(_Head("unsafe\nS14,S2"), excluded=excluded).check(CONVERSATIONS[0])["categories"] == ["S2"]
    # a code the policy lacks keeps the verdict unsafe though every code it knows is excluded
    assert LlamaGuard(_Head("unsafe\nS14,S15"), excluded=excluded).check(CONVERSATIONS[0])["safe"] is False


@pytest.mark.parametrize("excluded, categories", [
    (["S15"], None), (["s0"], None), (["14"], None), (["S4"], ["a", "b"]),
])
def test_unknown_excluded_code_is_refused_by_name(excluded, categories):
    with pytest.raises(ValueError, match=f"unknown excluded category {excluded[0]!r}") as error:
        LlamaGuard(_Head("safe"), categories=categories, excluded=excluded)
    assert "\n" not in str(error.value)
