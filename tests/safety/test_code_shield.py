"""Code Shield on insecure code and its fix in each language, language detection, the regex fast path, and
scanning a streamed reply block by block."""
from __future__ import annotations

import pytest

from herd.safety import CodeShield
from herd.safety.code_shield import CodeShieldError, StreamScanner, detect_language

from code_corpus import CASES, variants


@pytest.fixture(scope="module")
def shield():
    return CodeShield()


@pytest.fixture(scope="module")
def corpus_scans(shield):
    """Two seeded draws of every case, insecure and fixed, scanned in one batch (language given and detected)."""
    items = variants(seed=1, per_case=2)
    given = shield.scan_many([(c, case.language) for case, ins, fx in items for c in (ins, fx)])
    detected = shield.scan_many([c for _, ins, fx in items for c in (ins, fx)])
    return items, given, detected


def test_every_insecure_case_flagged_with_its_cwe_and_every_fix_allowed(corpus_scans):
    items, given, _ = corpus_scans
    for i, (case, insecure, fixed) in enumerate(items):
        bad, good = given[2 * i], given[2 * i + 1]
        assert case.cwe in {f["cwe"] for f in bad["findings"]}, (case.language, case.cwe, insecure)
        assert not case.rule or case.rule in {f["rule"] for f in bad["findings"]}, (case.rule, bad["findings"])
        assert bad["verdict"] in ("warn", "block")
        assert good["verdict"] == "allow", (case.language, case.cwe, good["findings"], fixed)
        for f in bad["findings"]:
            assert set(f) >= {"rule", "cwe", "line", "severity"} and f["severity"] in ("block", "warn")
            assert 1 <= f["line"] <= insecure.count("\n") + 1


def test_every_rule_fires_on_an_insecure_case(corpus_scans):
    """Each rule has an insecure snippet it flags (and, by the test above, a close fix it allows); a rule semgrep
    could not read would raise here instead of finding nothing."""
    from herd.safety.code_shield.rules import load_rules

    semgrep, regex = load_rules()
    rules = {r.id for rs in semgrep.values() for r in rs} | {r.id for r in regex}
    items, given, _ = corpus_scans
    fired = {f["rule"] for scan in given[::2] for f in scan["findings"]}
    assert rules - fired == set()


def test_constants_are_not_injections(shield):
    """A shell command, a query or a pickle that is a constant (or a variable holding one, or a macro) is no
    injection; the same call with data in it is."""
    safe = shield.scan_many([
        ('import subprocess\n\ndef f():\n    subprocess.run("ls -l", shell=True)\n', "python"),
        ('import os\n\ndef f():\n    cmd = "uptime"\n    os.system(cmd)\n', "python"),
        ('import pickle\n\nDEFAULT = pickle.loads(b"\\x80\\x04K\\x01.")\n', "python"),
        ('def f(cur):\n    q = "SELECT 1"\n    cur.execute(q)\n    cur.execute("SELECT " + "2")\n', "python"),
        ('#include <stdlib.h>\n#define CLEAR_SCREEN "clear"\nvoid f(void) { system(CLEAR_SCREEN); }\n', "c"),
        ('function f() { eval("1 + 1"); setTimeout("tick()", 10); new Function("a", "return a"); }\n', "javascript"),
    ])
    assert [s["findings"] for s in safe] == [[]] * len(safe)
    unsafe = shield.scan_many([
        ('import subprocess\n\ndef f(x):\n    subprocess.run("ls -l " + x, shell=True)\n', "python"),
        ('def f(cur, x):\n    q = "SELECT * FROM t WHERE a = \'%s\'" % x\n    y = 1\n    cur.execute(q)\n', "python"),
        ('#include <stdlib.h>\nvoid f(const char *cmd) { system(cmd); }\n', "c"),
    ])
    assert [s["verdict"] for s in unsafe] == ["block"] * 3


_CPP = "#include <cstring>\n#include <cstdio>\nvoid f(const char *s) {{\n    char buf[16];\n    {}\n}}\n"


_MISSED = [
    # C++ names the C library's functions std::strcpy and ::strcpy: the rules had matched only the bare names
    (_CPP.format("std::strcpy(buf, s);"), "cpp", "c-unbounded-copy"),
    (_CPP.format("::strcpy(buf, s);"), "cpp", "c-unbounded-copy"),
    (_CPP.format('std::sprintf(buf, "user=%s", s);'), "cpp", "c-unbounded-copy"),
    (_CPP.format("std::printf(s);"), "cpp", "c-format-string"),
    (_CPP.format("std::gets(buf);"), "cpp", "c-gets"),
    # a function making a secret returns it: the rule had looked only at assignments to a secret's name
    ('import random, string\n\ndef make_token():\n    return "".join(random.choice(string.ascii_letters) for _ in '
     'range(32))\n', "python", "python-insecure-random-secret"),
    ("import random\n\ndef otp():\n    return random.randint(100000, 999999)\n", "python",
     "python-insecure-random-secret"),
    ('import requests\n\ns = requests.Session()\ns.verify = False\ns.get("https://example.com")\n', "python",
     "python-tls-verification-disabled"),
]


def test_qualified_calls_returned_secrets_and_session_verify_are_flagged(shield):
    scans = shield.scan_many([(code, language) for code, language, _ in _MISSED])
    missed = [(code, rule) for (code, _, rule), scan in zip(_MISSED, scans)
              if rule not in {f["rule"] for f in scan["findings"]}]
    assert missed == []


def test_constants_placeholders_and_other_keys_are_not_flagged(shield):
    scans = shield.scan_many([
        # README: constants are not injections, a table name in a module constant or a local string included
        ('TABLE = "users"\n\ndef get(cur, uid):\n    cur.execute(f"SELECT * FROM {TABLE} WHERE id = %s", (uid,))\n',
         "python"),
        ('def get(cur, uid):\n    table = "users"\n    cur.execute(f"SELECT * FROM {table} WHERE id = %s", (uid,))\n',
         "python"),
        ('import random\n\nkey_press = random.choice(["w", "a", "s", "d"])\n', "python"),  # a key of the keyboard
        ('API_KEY = "YOUR_API_KEY_HERE"\npassword = "changeme"\n', "python"),
        (_CPP.format('std::strcpy(buf, "hello");'), "cpp"),
        # str.format putting in constants, or into a text with no field: nothing is inserted (had been blocked)
        ('def get(cur):\n    cur.execute("SELECT * FROM {}".format("users"))\n', "python"),
        ('def get(cur, name):\n    cur.execute("SELECT * FROM users WHERE name = ?".format(name), (name,))\n',
         "python"),
    ])
    assert [s["findings"] for s in scans] == [[]] * len(scans)
    # the same query with a value pasted in, or a table name that is not a constant, still is one; so are a key
    # drawn from random and a password that only begins like a placeholder
    unsafe = shield.scan_many([
        ('TABLE = "users"\n\ndef get(cur, uid):\n    cur.execute(f"SELECT * FROM {TABLE} WHERE id = {uid}")\n',
         "python"),
        ('def get(cur, table):\n    cur.execute(f"SELECT * FROM {table} WHERE id = 1")\n', "python"),
        ('def get(cur, table):\n    cur.execute("SELECT * FROM {} WHERE id = {}".format(table, 1))\n', "python"),
        ('import random\n\napi_key = random.getrandbits(128)\n', "python"),
        ('PASSWORD = "changeme123!"\n', "python"),  # a real password, if a weak one
    ])
    assert [[f["rule"] for f in s["findings"]] for s in unsafe] == [
        ["python-sql-injection"], ["python-sql-injection"], ["python-sql-injection"],
        ["python-insecure-random-secret"],
        ["secret-hardcoded-credential"]]


def test_language_detection_gives_the_same_verdicts(corpus_scans):
    items, given, detected = corpus_scans
    langs = {"c": {"c", "cpp"}, "cpp": {"cpp"}}
    for i, (case, _, _) in enumerate(items):
        for j in (2 * i, 2 * i + 1):
            assert detected[j]["language"] in langs.get(case.language, {case.language})
            assert detected[j]["verdict"] == given[j]["verdict"]


def test_finding_points_at_the_line():
    code = "import hashlib\n\n\ndef digest(data):\n    # hashlib.md5 would be broken here\n    return hashlib.md5(data).hexdigest()\n"
    result = CodeShield().scan(code, "python")
    assert [(f["rule"], f["line"], f["severity"]) for f in result["findings"]] == [("python-weak-hash", 6, "warn")]
    assert result["verdict"] == "warn"


def test_clean_code_and_regex_rules_never_start_semgrep():
    shield = CodeShield(semgrep="/nonexistent/semgrep-core")  # it would fail if it ran
    assert shield.scan("def add(a, b):\n    return a + b\n")["verdict"] == "allow"
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow...\n-----END RSA PRIVATE KEY-----"
    result = shield.scan(f'KEY = """{key}"""\n', "python")
    assert result["verdict"] == "block" and result["findings"][0]["cwe"] == "CWE-798"
    assert shield.scan("#!/bin/sh\n# curl -k https://x | sh  (never do this)\necho ok\n")["verdict"] == "allow"
    with pytest.raises(CodeShieldError, match="semgrep could not run"):
        shield.scan("import os\nos.system(cmd)\n")  # this one needs semgrep


@pytest.mark.parametrize("line", ["  *) curl -fsSL https://example.com/install.sh | bash ;;",
                                  "*/5 * * * * curl -s https://example.com/x.sh | sh"])
def test_a_shell_line_led_by_a_star_is_code(line):
    """A case branch or a crontab line starts with "*", which leads only C-like languages' comment lines (they had
    been skipped as comments in every language, and the pipe to a shell on them allowed)."""
    shield = CodeShield(semgrep="/nonexistent/semgrep-core")
    result = shield.scan(f'#!/bin/bash\ncase "$1" in\n{line}\nesac\n')
    assert result["verdict"] == "block" and [f["line"] for f in result["findings"]] == [3]
    key = 'const char *key = "AKIAIOSFODNN7EXAMPL3";\n'
    assert shield.scan(key, "c")["verdict"] == "block"
    assert shield.scan(f"/*\n * {key} */\nint main(void);\n", "c")["verdict"] == "allow"  # a comment's line


def test_a_rule_semgrep_cannot_read_is_an_error():
    from dataclasses import replace

    shield = CodeShield()
    rule = shield.semgrep_rules["python"][0]
    broken = replace(rule, semgrep={**rule.semgrep, "patterns": [{"pattern-not": "os.system($X)"}]})
    shield.semgrep_rules = {"python": (broken,)}
    with pytest.raises(CodeShieldError, match=rule.id):
        shield.scan("import os\nos.system(cmd)\n", "python")


def test_bad_input():
    with pytest.raises(ValueError, match="unsupported language"):
        CodeShield().scan("x = 1", "cobol")
    with pytest.raises(TypeError):
        CodeShield().scan(b"x = 1")


@pytest.mark.parametrize("language, code", [
    ("python", "import os\n\nfor name in os.listdir('.'):\n    if name.endswith('.py'):\n        print(name)\n"),
    ("java", "import java.util.List;\n\npublic class A {\n    public static void main(String[] args) {\n"
             "        System.out.println(List.of(1, 2));\n    }\n}\n"),
    ("javascript", "const fs = require('fs');\nconst names = fs.readdirSync('.').filter(n => n.endsWith('.js'));\n"
                   "console.log(names);\n"),
    ("cpp", "#include <iostream>\n#include <vector>\nint main() {\n  std::vector<int> v{1, 2};\n"
            "  std::cout << v.size() << std::endl;\n}\n"),
    ("c", "#include <stdio.h>\n\nint main(void) {\n    int n = 0;\n    printf(\"%d\\n\", n);\n    return 0;\n}\n"),
    ("shell", "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do\n  wc -l \"$f\"\ndone\n"),
])
def test_detect_language(language, code):
    assert detect_language(code) == language


def test_stream_scans_each_block_as_it_closes():
    shield = CodeShield(semgrep="/nonexistent/semgrep-core")  # shell blocks: regex rules only
    reply = ("Here is the install step:\n\n```bash\ncurl -fsSL https://get.example.com/install.sh | sudo bash\n```\n"
             "and then\n```sh\necho done\n```\nThat's all.")
    pieces = [reply[i:i + 7] for i in range(0, len(reply), 7)]
    scanner, closed_at = StreamScanner(shield), []
    for n, piece in enumerate(pieces):
        for scan in scanner.feed(piece):
            closed_at.append((n, scan))
    assert scanner.finish() == []
    (first_at, first), (_, second) = closed_at
    assert first["verdict"] == "block" and first["findings"][0]["cwe"] == "CWE-494"
    assert first["language"] == "shell" and first["line"] == 4 and first["block"] == 0
    # reported as soon as the closing fence has arrived, before the rest of the reply
    assert "".join(pieces[:first_at + 1]).count("```") == 2 and first_at < len(pieces) - 3
    assert second["verdict"] == "allow" and second["block"] == 1
    events = list(shield.scan_stream(iter(pieces)))
    assert "".join(p for p, _ in events) == reply and sum(len(s) for _, s in events) == 2


def test_stream_unclosed_block_and_bare_code():
    shield = CodeShield(semgrep="/nonexistent/semgrep-core")
    scanner = StreamScanner(shield)
    assert scanner.feed("```\nchmod -R 777 /srv/www\n") == []
    (scan,) = scanner.finish()
    assert scan["verdict"] == "warn" and scan["findings"][0]["cwe"] == "CWE-732"
    bare = StreamScanner(shield)
    bare.feed("#!/bin/sh\nwget --no-check-certificate https://x/y.tgz\n")
    (scan,) = bare.finish()
    assert scan["verdict"] == "block" and scan["language"] == "shell"
    prose = StreamScanner(shield)
    prose.feed("Paris is the capital of France.")
    assert prose.finish() == []


@pytest.mark.parametrize("language, code, rule", [
    ("python", "import subprocess\ndef run(arg):\n    subprocess.call('grep ' + arg, shell=True)\n    return [\n",
     "python-command-injection"),
    ("java", 'import java.security.MessageDigest;\npublic class H {\n  byte[] h(byte[] d) throws Exception {\n'
             '    MessageDigest md = MessageDigest.getInstance("MD5");\n    return md.dig', "java-weak-hash"),
    ("javascript", "const crypto = require('crypto');\nfunction h(s) {\n"
                   "  return crypto.createHash('md5').update(s).digest('hex') + fo", "js-weak-hash"),
    ("c", "#include <string.h>\nvoid f(char *s) {\n    char buf[16];\n    strcpy(buf, s);\n    if (buf[0] == ",
     "c-unbounded-copy"),
])
def test_a_block_cut_mid_statement_is_still_scanned(language, code, rule):
    """A reply out of tokens inside a code block leaves a statement open, and semgrep reads nothing of code it
    cannot parse: the cut block is read again ended where it parses (its insecure line had passed unflagged)."""
    scanner = StreamScanner(CodeShield())
    scanner.feed(f"Here it is:\n```{language}\n{code}")
    (scan,) = scanner.finish()
    assert [f["rule"] for f in scan["findings"]] == [rule] and scan["verdict"] != "allow"


def test_corpus_covers_every_language():
    assert {c.language for c in CASES} >= {"python", "c", "cpp", "javascript", "java", "shell"}
