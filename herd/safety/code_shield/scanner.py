"""`CodeShield`: insecure-code detection for generated code, with a verdict of allow, warn or block.

Regex rules run first and alone decide on secrets and shell lines; semgrep runs once per scan (or once per
batch, `scan_many`) over a temporary file with only the rules whose prescan matched, so clean code never pays for
it. The verdict is block if any finding is a block, warn if any is a warning, allow otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path


from herd.safety.code_shield.languages import EXTENSIONS, RULE_FILES, SEMGREP_NAMES, detect, normalize
from herd.safety.code_shield.rules import Rule, load_rules


class CodeShieldError(RuntimeError):
    """semgrep is missing or failed: the code could not be scanned."""


def verdict_of(findings: Sequence[dict]) -> str:
    decisions = {f["severity"] for f in findings}
    return "block" if "block" in decisions else "warn" if decisions else "allow"


_BLOCK_COMMENTS = ("c", "cpp", "javascript", "java")  # whose /* */ comments continue on lines led by "* "
_CONTINUED = re.compile(r"\*(\s|/|$)")  # "* text", "*/", a lone "*"; not "*p = gets(s)"


def _comment(line: str, language: str | None) -> bool:
    """Whether a line is a comment (or a C preprocessor line other than #define) of `language`, so that a pattern
    in it is no finding. A line led by "*" is one only inside another language's block comment: in shell it is a
    case branch ("*) curl ... | bash ;;") or a crontab line."""
    s = line.lstrip()
    if s.startswith(("//", "/*", "<!--")) or (s.startswith("#") and not s.startswith(("#define", "#!"))):
        return True
    return language in _BLOCK_COMMENTS and _CONTINUED.match(s) is not None


def _line_of(code: str, offset: int) -> int:
    return code.count("\n", 0, offset) + 1


def _finding(rule: Rule, line: int, analyzer: str) -> dict:
    return {"rule": rule.id, "cwe": rule.cwe, "line": line, "severity": rule.decision, "message": rule.message,
            "analyzer": analyzer}


def _semgrep_core() -> str | None:
    """semgrep's matching engine, as the `semgrep` package ships it. herd calls it directly: semgrep's Python
    front end costs seconds per run in start-up alone, the engine well under one."""
    spec = importlib.util.find_spec("semgrep")
    if spec and spec.submodule_search_locations:
        core = Path(list(spec.submodule_search_locations)[0]) / "bin" / "semgrep-core"
        if core.is_file():
            return str(core)
    return shutil.which("semgrep-core")


class CodeShield:
    """Scan code for insecure patterns (Python, C, C++, JavaScript, Java, shell).

    scan(code, language=None) -> {"verdict": "allow"|"warn"|"block", "language": ..., "findings": [{"rule",
    "cwe", "line", "severity": "block"|"warn", "message", "analyzer"}]}. language=None detects it.
    """

    def __init__(self, semgrep: str | None = None, timeout: float = 60.0):
        self.semgrep_path, self.timeout = semgrep, timeout
        self.semgrep_rules, self.regex_rules = load_rules()

    def scan(self, code: str, language: str | None = None) -> dict:
        return self.scan_many([(code, language)])[0]

    def scan_stream(self, pieces: Iterable[str], language: str | None = None):
        """(piece, scans of the code blocks it completed) for each streamed piece; see StreamScanner."""
        from herd.safety.code_shield.stream import scan_stream

        return scan_stream(self, pieces, language)

    def scan_many(self, items: Iterable[tuple[str, str | None] | str]) -> list[dict]:
        """Scan several snippets with one semgrep process: (code, language) pairs or bare code."""
        items = [(it, None) if isinstance(it, str) else it for it in items]
        results, jobs = [], []
        for index, (code, language) in enumerate(items):
            if not isinstance(code, str):
                raise TypeError(f"code to scan must be text, not {type(code).__name__}")
            given = normalize(language) if language else None
            if language and given is None:
                raise ValueError(f"unsupported language {language!r}: use python, c, cpp, javascript, java or shell")
            lang = given or detect(code)
            findings = self._regex_findings(code, lang)
            selected = [r for r in self.semgrep_rules.get(RULE_FILES.get(lang, ""), ()) if r.pattern.search(code)]
            if selected:
                jobs.append((index, code, lang, selected))
            results.append({"verdict": "allow", "language": lang, "findings": findings})
        if jobs:
            for index, found in self._semgrep(jobs).items():
                results[index]["findings"].extend(found)
        for result in results:
            result["findings"].sort(key=lambda f: (f["line"], f["rule"]))
            result["verdict"] = verdict_of(result["findings"])
        return results

    def _regex_findings(self, code: str, language: str | None) -> list[dict]:
        findings, seen = [], set()
        lines = code.split("\n")
        for rule in self.regex_rules:
            if "any" not in rule.languages and language not in rule.languages:
                continue
            for m in rule.pattern.finditer(code):
                line = _line_of(code, m.start())
                if (rule.id, line) not in seen and not _comment(lines[line - 1], language):
                    seen.add((rule.id, line))
                    findings.append(_finding(rule, line, "regex"))
        return findings

    def _semgrep(self, jobs: list[tuple[int, str, str, list[Rule]]]) -> dict[int, list[dict]]:
        binary = self.semgrep_path or _semgrep_core()
        if binary is None:
            raise CodeShieldError("semgrep is not installed: pip install 'herd[safety]' (scripts/setup.sh does)")
        rules = {r.id: r for _, _, _, selected in jobs for r in selected}
        with tempfile.TemporaryDirectory(prefix="herd-codeshield-") as tmp:
            tmp = Path(tmp)
            (tmp / "rules.json").write_text(json.dumps({"rules": [r.semgrep for r in rules.values()]}),
                                            encoding="utf-8")
            files, targets = {}, []
            for index, code, lang, selected in jobs:
                path = tmp / f"snippet{index}{EXTENSIONS[lang]}"
                path.write_text(code, encoding="utf-8")
                files[str(path)] = (index, {r.id for r in selected})
                targets.append(["CodeTarget", {"path": {"fpath": str(path), "ppath": f"/{path.name}"}, "analyzer": SEMGREP_NAMES[lang],
                                               "products": ["sast"]}])
            (tmp / "targets.json").write_text(json.dumps(["Targets", targets]), encoding="utf-8")
            command = [binary, "-rules", str(tmp / "rules.json"), "-targets", str(tmp / "targets.json"), "-json",
                       "-j", "1", "-timeout", "20", "-fast"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout)
            except OSError as error:
                raise CodeShieldError(f"semgrep could not run ({binary}): {error.strerror}") from None
            except subprocess.TimeoutExpired:
                raise CodeShieldError(f"semgrep took over {self.timeout:.0f}s on {len(jobs)} snippet(s)") from None
            try:
                # the engine may print more after its JSON report
                report = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("{"):])[0]
            except (ValueError, json.JSONDecodeError):
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise CodeShieldError(f"semgrep failed (exit {done.returncode}): {tail[0][:200]}") from None
        # a rule semgrep cannot read would otherwise be skipped in silence, finding nothing (code it can only
        # partly parse is normal: it reports that as ["PartialParsing", ...])
        kinds = [str(k[0] if isinstance(k, list) and k else k).lower()
                 for k in (e.get("error_type", "") for e in report.get("errors", []))]
        fatal = [e for e, kind in zip(report.get("errors", []), kinds)
                 if kind == "fatal error" or "rule" in kind or "pattern" in kind]
        if fatal:
            rule = f" on rule {fatal[0]['rule_id']}" if fatal[0].get("rule_id") else ""
            raise CodeShieldError(f"semgrep failed{rule}: {fatal[0].get('message', '')[:200]}")
        found: dict[int, list[dict]] = {}
        seen = set()
        for hit in report.get("results", []):
            rule_id = hit["check_id"].rsplit(".", 1)[-1]
            index, selected = files.get(hit["path"], (None, ()))
            line = hit["start"]["line"]
            if rule_id in selected and (index, rule_id, line) not in seen:
                seen.add((index, rule_id, line))
                found.setdefault(index, []).append(_finding(rules[rule_id], line, "semgrep"))
        return found
