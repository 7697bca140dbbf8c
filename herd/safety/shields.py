"""`Shields`: the guards around a model, as a server (or any application) switches them on.

check_input: Llama Guard on the conversation (the last user turn) and Prompt Guard on the user's text; an
unsafe request gets a refusal naming the categories. reply_filter: the reply as it is generated, through Code
Shield (each code block as it closes: insecure code blocked or warned as configured) and Llama Guard on the
agent turn (check_output; an unsafe reply is replaced). scan_tool_result: Prompt Guard on what a tool returned,
before the model reads it. Every decision is logged and
counted: `counts` for the program, and Prometheus counters and a latency histogram on `registry` (a server
passes its own, so the decisions appear in its /metrics).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

from herd.safety.llama_guard import CANNED_REFUSAL, CATEGORIES
from herd.safety.prompt_guard import attack_label

log = logging.getLogger("herd.safety")


@dataclass
class Decision:
    allowed: bool
    shield: str = ""  # which shield decided: llama_guard, prompt_guard, code_shield ("" when all passed)
    categories: list[str] = field(default_factory=list)  # Llama Guard codes, or the attack class
    message: str = ""  # what to say instead (a refusal), or a warning to attach
    findings: list[dict] = field(default_factory=list)  # Code Shield findings
    scores: dict = field(default_factory=dict)  # Prompt Guard scores
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in ("", [], {})}


def _injection(scores: dict) -> float:
    """A tool result's indirect-injection score as Meta's get_indirect_injection_score and herd's
    Guard.prompt_guard read it: in data, a jailbreak is an injection too, so 1 - benign, of the least benign
    window (a long text's top injection and top jailbreak may come from different windows: their sum is no
    window's score)."""
    return 1.0 - scores["benign"]


def refusal(categories: list[str]) -> str:
    named = ", ".join(f"{c} ({CATEGORIES[c]})" if c in CATEGORIES else c for c in categories)
    return CANNED_REFUSAL if not named else f"{CANNED_REFUSAL} (flagged: {named})"


class Shields:
    """guard: a LlamaGuard; prompt_guard: a PromptGuard; code_shield: a CodeShield; any may be None.
    code_action: "block" replaces a reply whose code Code Shield blocks, "warn" only attaches the warning."""

    def __init__(self, guard=None, prompt_guard=None, code_shield=None, *, code_action: str = "block",
                 threshold: float = 0.5, scan_user_input: bool = True, registry=None):
        from prometheus_client import CollectorRegistry, Counter as PromCounter, Histogram

        if code_action not in ("block", "warn"):
            raise ValueError(f"code_action must be 'block' or 'warn', not {code_action!r}")
        self.guard, self.prompt_guard, self.code_shield = guard, prompt_guard, code_shield
        self.code_action, self.threshold, self.scan_user_input = code_action, threshold, scan_user_input
        self.counts: Counter = Counter()  # (shield, outcome) -> count
        self._lock = threading.Lock()
        self._guard_lock = threading.Lock()  # a guard model reads one conversation at a time
        self.registry = registry if registry is not None else CollectorRegistry()
        self._decisions = PromCounter("herd_shield_decisions", "decisions of the safety shields",
                                      ["shield", "outcome"], registry=self.registry)
        self._seconds = Histogram("herd_shield_seconds", "time a shield took on one check", ["shield"],
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                  registry=self.registry)

    @property
    def names(self) -> list[str]:
        """The shields switched on, by the names run_shield and the metrics use."""
        return [name for name, shield in (("llama_guard", self.guard), ("prompt_guard", self.prompt_guard),
                                          ("code_shield", self.code_shield)) if shield is not None]

    def warm(self) -> Shields:
        """Run each shield once, uncounted, so the first request does not pay for lazy imports and caches (a
        server calls this before it listens)."""
        dialog = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]
        if self.prompt_guard is not None:
            self.prompt_guard.score("Hello.")
        if self.guard is not None:
            self.guard.check(dialog[:1], agent_type="User")
            self.guard.check(dialog, agent_type="Agent")
        if self.code_shield is not None:
            self.code_shield.scan("import os\nprint(os.getcwd())\n", "python")
        return self

    def _count(self, shield: str, outcome: str) -> None:
        with self._lock:
            self.counts[(shield, outcome)] += 1
        self._decisions.labels(shield, outcome).inc()

    def _timed(self, shield: str, fn, *args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._seconds.labels(shield).observe(time.perf_counter() - started)

    def _guard_check(self, messages: list[dict], agent_type: str) -> dict:
        with self._guard_lock:
            return self._timed("llama_guard", self.guard.check, messages, agent_type)

    def _attack(self, text: str) -> tuple[str | None, dict]:
        scores = self._timed("prompt_guard", self.prompt_guard.score, text)
        label = attack_label(scores, self.threshold)
        return (None if label == "benign" else label), scores

    def check_input(self, messages: list[dict]) -> Decision:
        started = time.perf_counter()
        if self.prompt_guard is not None and self.scan_user_input and messages:
            last = messages[-1]
            if last.get("role") == "user" and isinstance(last.get("content"), str):
                scores = self._timed("prompt_guard", self.prompt_guard.score, last["content"])
                # Injections live in data, not in what the user types; a jailbreak is judged on its own score, as
                # Meta's reference does (a text's top injection window must not outvote its jailbreak window).
                if scores["jailbreak"] >= self.threshold:
                    self._count("prompt_guard", "blocked")
                    log.warning("prompt guard: jailbreak in the request (%.2f)", scores["jailbreak"])
                    return Decision(False, "prompt_guard", ["jailbreak"], refusal([]), scores=scores,
                                    seconds=time.perf_counter() - started)
        if self.guard is not None:
            return self._judge(messages, "User", started)
        return Decision(True, seconds=time.perf_counter() - started)

    def check_output(self, messages: list[dict], reply: str) -> Decision:
        """Llama Guard on the reply (as the agent's turn); the reply's code is Code Shield's, see reply_filter."""
        started = time.perf_counter()
        if self.guard is not None:
            return self._judge([*messages, {"role": "assistant", "content": reply}], "Agent", started)
        return Decision(True, seconds=time.perf_counter() - started)

    def _judge(self, messages: list[dict], agent_type: str, started: float) -> Decision:
        """Llama Guard's verdict on the conversation's last turn (the user's or the agent's), counted and logged."""
        verdict = self._guard_check(messages, agent_type)
        kind, unsafe = ("llama_guard_input", "blocked") if agent_type == "User" else ("llama_guard_output", "replaced")
        if verdict["safe"]:
            self._count(kind, "passed")
            return Decision(True, seconds=time.perf_counter() - started)
        self._count(kind, unsafe)
        log.warning("llama guard: unsafe %s %s", "request" if agent_type == "User" else "reply (replaced)",
                    ",".join(verdict["categories"]) or verdict.get("reason", "(no category)"))
        return Decision(False, "llama_guard", verdict["categories"], refusal(verdict["categories"]),
                        seconds=time.perf_counter() - started)

    def run_shield(self, name: str, messages: list[dict]) -> Decision:
        """One shield alone on a conversation (what Llama Stack's run-shield asks): llama_guard judges the last
        turn, the user's or the agent's; prompt_guard reads the last message for an injection or a jailbreak;
        code_shield scans the code in it (its fenced blocks, or the whole text where it has none and reads as
        code). KeyError for a shield this Shields does not have."""
        if name not in self.names or not messages:
            raise KeyError(name)
        started = time.perf_counter()
        last = messages[-1]
        text = last.get("content") if isinstance(last.get("content"), str) else ""
        if name == "llama_guard":
            return self._judge(messages, "Agent" if last.get("role") == "assistant" else "User", started)
        if name == "prompt_guard":
            attack, scores = self._attack(text)
            self._count("prompt_guard", "flagged" if attack else "passed")
            return Decision(attack is None, "prompt_guard" if attack else "", [attack] if attack else [],
                            refusal([]) if attack else "", scores=scores, seconds=time.perf_counter() - started)
        scanner = self.code_scanner()
        decision = self.code_decision(scanner.feed(text) + scanner.finish())
        decision.seconds = time.perf_counter() - started
        return decision

    def reply_filter(self, messages: list[dict], guard_every: int = 400) -> ReplyFilter:
        """The output shields over one reply as it is generated (see ReplyFilter)."""
        return ReplyFilter(self, messages, guard_every)

    def code_scanner(self, language: str | None = None):
        """A StreamScanner (for code of `language`, None: detected) whose scans are timed as Code Shield's."""
        from herd.safety.code_shield import StreamScanner

        timed = SimpleNamespace(scan=lambda code, language=None: self._timed("code_shield", self.code_shield.scan,
                                                                             code, language))
        return StreamScanner(timed, language)

    def code_decision(self, scans: list[dict]) -> Decision:
        """What Code Shield's scans of a reply's code blocks come to under this configuration."""
        findings = [f for s in scans for f in s["findings"]]
        if not findings:
            self._count("code_shield", "allowed")
            return Decision(True)
        blocked = any(f["severity"] == "block" for f in findings) and self.code_action == "block"
        cwes = sorted({f["cwe"] for f in findings})
        self._count("code_shield", "blocked" if blocked else "warned")
        log.warning("code shield: %s (%s)", "blocked" if blocked else "warned", ", ".join(cwes))
        text = (f"The generated code was withheld: it contains insecure patterns ({', '.join(cwes)})." if blocked
                else f"Warning: the code above may be insecure ({', '.join(cwes)}).")
        return Decision(not blocked, "code_shield", cwes, text, findings=findings)

    def scan_tool_result(self, text: str) -> Decision:
        """Prompt Guard on a tool's output: flagged, before the model reads it, when its least benign
        window's 1 - benign (injection and jailbreak together) passes the threshold (named by the larger)."""
        started = time.perf_counter()
        if self.prompt_guard is None:
            return Decision(True)
        scores = self._timed("prompt_guard", self.prompt_guard.score, text)
        attack = max(("injection", "jailbreak"), key=scores.get) if _injection(scores) >= self.threshold else None
        if attack is None:
            self._count("prompt_guard_tool", "passed")
            return Decision(True, scores=scores, seconds=time.perf_counter() - started)
        self._count("prompt_guard_tool", "flagged")
        log.warning("prompt guard: %s in a tool result (%.2f)", attack, _injection(scores))
        return Decision(False, "prompt_guard", [attack], f"[tool output withheld: it looks like a prompt {attack}]",
                        scores=scores, seconds=time.perf_counter() - started)

    def tool_guard(self):
        """herd.agent's Guard over tool results: Prompt Guard, logged and counted as scan_tool_result is (None
        without a Prompt Guard)."""
        if self.prompt_guard is None:
            return None
        from herd.agent import Guard

        def score(text: str) -> float:
            return _injection(self.scan_tool_result(text).scores)

        return Guard(score, self.threshold)

    def screen_tool_results(self, messages: list[dict]) -> tuple[list[dict], list[Decision]]:
        """The messages with every flagged tool result (tool or ipython turn) withheld, and the flags."""
        decisions, cleaned = [], []
        for m in messages:
            if m.get("role") in ("tool", "ipython") and isinstance(m.get("content"), str):
                d = self.scan_tool_result(m["content"])
                if not d.allowed:
                    decisions.append(d)
                    m = {**m, "content": d.message}
            cleaned.append(m)
        return cleaned, decisions

    def guarded_chat(self, llm, messages: list[dict], **sampling) -> dict:
        """llm.chat with the shields around it: {"role": "assistant", "content", "shields": [decisions]}.
        Tool messages are scanned first and withheld when flagged."""
        cleaned, decisions = self.screen_tool_results(messages)
        d = self.check_input(cleaned)
        if not d.allowed:
            return {"role": "assistant", "content": d.message, "shields": [x.as_dict() for x in [*decisions, d]]}
        reply = llm.chat(cleaned, **sampling)
        out = self.reply_filter(cleaned)
        # A tool call's code is read as the model wrote it (the parsed message holds it in its calls, not its text);
        # a warning goes beside the call, never into it.
        ids = llm.chat_format.written.recall(reply) if reply.get("tool_calls") else None
        content = out.feed(llm.tokenizer.decode(ids[0]) if ids else reply["content"], final=True)
        if ids and out.stopped is None:
            content = out.beside(reply["content"])
        calls = [] if out.stopped else reply.get("tool_calls", [])
        return {**reply, "content": content, "tool_calls": calls,
                "shields": [x.as_dict() for x in decisions + out.decisions]}

    def collect(self):
        """Prometheus' collector protocol: registered on a server's registry, the shields appear in its /metrics."""
        return self.registry.collect()

    def metrics(self) -> str:
        """The decisions and latencies in Prometheus' text format (the registry's whole text)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class ReplyFilter:
    """One reply through the output shields while it streams: feed(piece, final) -> the text that may go out now.

    Prose goes out as it comes; a fenced code block is held until it closes and Code Shield has scanned it, so
    blocked code never reaches the client and the reply stops there (`stopped` holds the decision); code with no
    fence (a reply that reads as code, a tool call's) is held until the end, where it is scanned (StreamScanner). With a
    Llama Guard, text goes out once the guard has judged the reply up to it: every `guard_every` characters
    and at the end. A warning (or a block, in warn mode) is appended when the reply ends. Fed a whole reply
    with final=True, the result is the reply, its replacement, or the reply with its warning.
    """

    def __init__(self, shields: Shields, messages: list[dict], guard_every: int = 400):
        self.shields, self.messages, self.guard_every = shields, messages, guard_every
        self.scanner = shields.code_scanner() if shields.code_shield is not None else None
        self.text, self.sent, self.cleared = "", 0, 0  # the reply so far; how much went out; judged safe
        self.scans: list[dict] = []
        self.decisions: list[Decision] = []  # what the shields said that changed the reply
        self.stopped: Decision | None = None
        self.note = ""  # the warning appended at the end, which a server keeps out of a tool call's text

    def feed(self, piece: str, final: bool = False) -> str:
        if self.stopped is not None:
            return ""
        self.text += piece
        if self.scanner is not None:
            self.scans += self.scanner.feed(piece) + (self.scanner.finish() if final else [])
            if self.shields.code_action == "block" and any(
                    f["severity"] == "block" for s in self.scans for f in s["findings"]):
                return self._stop(self.shields.code_decision(self.scans))
        limit = len(self.text) if final or self.scanner is None else self.scanner.unscanned_from()
        if self.shields.guard is not None:
            if final or limit - self.cleared >= self.guard_every:
                verdict = self.shields.check_output(self.messages, self.text[:limit])
                if not verdict.allowed:
                    return self._stop(verdict)
                self.cleared = limit
            limit = self.cleared
        out, self.sent = self.text[self.sent:limit], max(self.sent, limit)
        if final and self.scanner is not None:
            code = self.shields.code_decision(self.scans)
            if code.message:
                self.decisions.append(code)
                self.note = f"\n\n{code.message}"
                out += self.note
        return out

    def beside(self, content: str) -> str:
        """A tool call's content with the warning that ended the reply after it (the warning alone where the call
        had none): the warning goes beside a call, never into its text."""
        return content + self.note if content else self.note.lstrip()

    def _stop(self, decision: Decision) -> str:
        self.stopped = decision
        self.decisions.append(decision)
        return ("\n\n" if self.sent else "") + decision.message
