"""`Shields`: the guards around a model, as a server (or any application) switches them on.

check_input: Llama Guard on the conversation (the last user turn) and Prompt Guard on the user's text; an
unsafe request gets a refusal naming the categories. check_output: Llama Guard on the reply (the agent turn)
and Code Shield on its code; an unsafe reply is replaced, insecure code blocked or warned as configured.
scan_tool_result: Prompt Guard on what a tool returned, before the model reads it. Every decision is logged and
counted (`counts`, which a server exports as metrics).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from herd.safety.llama_guard import CANNED_REFUSAL, CATEGORIES

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


def refusal(categories: list[str]) -> str:
    named = ", ".join(f"{c} ({CATEGORIES[c]})" if c in CATEGORIES else c for c in categories)
    return CANNED_REFUSAL if not named else f"{CANNED_REFUSAL} (flagged: {named})"


class Shields:
    """guard: a LlamaGuard; prompt_guard: a PromptGuard; code_shield: a CodeShield; any may be None.
    code_action: "block" replaces a reply whose code Code Shield blocks, "warn" only attaches the warning."""

    def __init__(self, guard=None, prompt_guard=None, code_shield=None, *, code_action: str = "block",
                 threshold: float = 0.5, scan_user_input: bool = True):
        if code_action not in ("block", "warn"):
            raise ValueError(f"code_action must be 'block' or 'warn', not {code_action!r}")
        self.guard, self.prompt_guard, self.code_shield = guard, prompt_guard, code_shield
        self.code_action, self.threshold, self.scan_user_input = code_action, threshold, scan_user_input
        self.counts: Counter = Counter()  # (shield, outcome) -> count
        self._lock = threading.Lock()

    def _count(self, shield: str, outcome: str) -> None:
        with self._lock:
            self.counts[(shield, outcome)] += 1

    def _attack(self, text: str) -> tuple[str | None, dict]:
        scores = self.prompt_guard.score(text)
        attack = max(("injection", "jailbreak"), key=scores.get)
        return (attack if scores[attack] >= self.threshold else None), scores

    def check_input(self, messages: list[dict]) -> Decision:
        started = time.perf_counter()
        if self.prompt_guard is not None and self.scan_user_input and messages:
            last = messages[-1]
            if last.get("role") == "user" and isinstance(last.get("content"), str):
                attack, scores = self._attack(last["content"])
                if attack == "jailbreak":  # injections live in data, not in what the user types
                    self._count("prompt_guard", "blocked")
                    log.warning("prompt guard: jailbreak in the request (%.2f)", scores["jailbreak"])
                    return Decision(False, "prompt_guard", ["jailbreak"], refusal([]), scores=scores,
                                    seconds=time.perf_counter() - started)
        if self.guard is not None:
            verdict = self.guard.check(messages, agent_type="User")
            if not verdict["safe"]:
                self._count("llama_guard_input", "blocked")
                log.warning("llama guard: unsafe request %s", ",".join(verdict["categories"]) or "(no category)")
                return Decision(False, "llama_guard", verdict["categories"], refusal(verdict["categories"]),
                                seconds=time.perf_counter() - started)
            self._count("llama_guard_input", "passed")
        return Decision(True, seconds=time.perf_counter() - started)

    def check_output(self, messages: list[dict], reply: str) -> Decision:
        started = time.perf_counter()
        if self.guard is not None:
            verdict = self.guard.check([*messages, {"role": "assistant", "content": reply}], agent_type="Agent")
            if not verdict["safe"]:
                self._count("llama_guard_output", "replaced")
                log.warning("llama guard: unsafe reply %s replaced", ",".join(verdict["categories"]))
                return Decision(False, "llama_guard", verdict["categories"], refusal(verdict["categories"]),
                                seconds=time.perf_counter() - started)
            self._count("llama_guard_output", "passed")
        if self.code_shield is not None:
            from herd.safety.code_shield import StreamScanner

            scanner = StreamScanner(self.code_shield)
            scans = scanner.feed(reply) + scanner.finish()
            decision = self.code_decision(scans)
            decision.seconds = time.perf_counter() - started
            return decision
        return Decision(True, seconds=time.perf_counter() - started)

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
        """Prompt Guard on a tool's output: an injection (or jailbreak) there is flagged before the model reads it."""
        started = time.perf_counter()
        if self.prompt_guard is None:
            return Decision(True)
        attack, scores = self._attack(text)
        if attack is None:
            self._count("prompt_guard_tool", "passed")
            return Decision(True, scores=scores, seconds=time.perf_counter() - started)
        self._count("prompt_guard_tool", "flagged")
        log.warning("prompt guard: %s in a tool result (%.2f)", attack, scores[attack])
        return Decision(False, "prompt_guard", [attack], f"[tool output withheld: it looks like a prompt {attack}]",
                        scores=scores, seconds=time.perf_counter() - started)

    def guarded_chat(self, llm, messages: list[dict], **sampling) -> dict:
        """llm.chat with the shields around it: {"role": "assistant", "content", "shields": [decisions]}.
        Tool messages are scanned first and withheld when flagged."""
        decisions = []
        cleaned = []
        for m in messages:
            if m.get("role") in ("tool", "ipython") and isinstance(m.get("content"), str):
                d = self.scan_tool_result(m["content"])
                if not d.allowed:
                    decisions.append(d)
                    m = {**m, "content": d.message}
            cleaned.append(m)
        d = self.check_input(cleaned)
        if not d.allowed:
            return {"role": "assistant", "content": d.message, "shields": [x.as_dict() for x in [*decisions, d]]}
        reply = llm.chat(cleaned, **sampling)
        d = self.check_output(cleaned, reply["content"])
        decisions.append(d)
        content = reply["content"] if d.allowed or d.shield == "" else d.message
        if d.allowed and d.message:
            content = f"{content}\n\n{d.message}"
        return {**reply, "content": content, "shields": [x.as_dict() for x in decisions]}

    def metrics(self) -> str:
        """The counts in Prometheus' text format."""
        lines = ["# HELP herd_shield_decisions_total Decisions of herd's safety shields",
                 "# TYPE herd_shield_decisions_total counter"]
        for (shield, outcome), n in sorted(self.counts.items()):
            lines.append(f'herd_shield_decisions_total{{shield="{shield}",outcome="{outcome}"}} {n}')
        return "\n".join(lines) + "\n"
