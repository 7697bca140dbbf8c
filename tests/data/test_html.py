"""herd's HTML extractor on real documentation pages from Debian: code kept line for line, math kept as TeX,
the site template left out. python3-doc is what it was developed on; git-doc (AsciiDoc), bash-doc (Texinfo
and man2html) and python-sympy-doc (Sphinx with math images) are held out."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from herd.data.html import code_blocks, extract, parse
from herd.data.readers import read

PACKAGES = {
    "python3-doc": "/usr/share/doc/python3.11/html/library",
    "git-doc": "/usr/share/doc/git-doc",
    "bash-doc": "/usr/share/doc/bash-doc",
}
SYMPY = Path("/usr/share/doc/python-sympy-doc/html/modules")


def _pages(package: str, n: int, seed: int) -> list[Path]:
    pages = sorted(Path(PACKAGES[package]).glob("*.html"))
    if not pages:
        pytest.fail(f"{package} not installed: run scripts/test-fixtures.sh")
    return sorted(random.Random(seed).sample(pages, min(n, len(pages))))


@pytest.mark.parametrize("package, n", [("python3-doc", 15), ("git-doc", 50), ("bash-doc", 2)])
def test_every_code_block_comes_back_line_for_line(package, n):
    pages = _pages(package, n, seed=2026)
    outputs, blocks = [], 0
    for page in pages:
        html = page.read_bytes()
        expected = code_blocks(parse(html))
        text = extract(html)
        missing = [b for b in expected if f"\n{b}\n```" not in text]  # inside a fence, every line intact
        assert not missing, (page, missing[0][:200])
        blocks += len(expected)
        outputs.append(text)
        # headings are Markdown, without the pilcrow of their permalink
        assert not [s for s in text.split("\n") if s.startswith("#") and s.rstrip().endswith(("¶", "§"))]
    assert blocks >= 20
    # the site's template (menus, footers, "previous/next" bars) is what recurs on most pages: gone
    recurring = Counter(s for t in outputs for s in {s.strip() for s in t.split("\n") if len(s.strip()) >= 25})
    template = [s for s, c in recurring.items() if c > 0.5 * len(outputs)] if len(outputs) >= 10 else []
    assert not template, template[:5]


def test_math_image_alt_text_is_kept_as_tex():
    pages = sorted(SYMPY.rglob("*.html"))
    if not pages:
        pytest.fail("python-sympy-doc not installed: run scripts/test-fixtures.sh")
    with_math = [p for p in random.Random(7).sample(pages, 60) if b'class="math"' in p.read_bytes()][:12]
    assert len(with_math) >= 5
    for page in with_math:
        tree = parse(page.read_bytes())
        # inline, so with its whitespace runs collapsed, which TeX does not tell apart
        alts = [" ".join(a.split()) for a in tree.xpath("//img[contains(@class, 'math')]/@alt") if a.strip()]
        text = extract(page.read_bytes())
        assert all(f"${a}$" in text for a in alts), page


def test_math_markup_of_each_kind_becomes_tex():
    page = """<html><body><main>
    <p>MathML with TeX: <math><semantics><mrow><msup><mi>x</mi><mn>2</mn></msup></mrow>
       <annotation encoding="application/x-tex">x^{2}</annotation></semantics></math> done.</p>
    <p>MathML alttext: <math alttext="\\frac{a}{b}"><mfrac><mi>a</mi><mi>b</mi></mfrac></math>.</p>
    <p>Bare MathML: <math><mi>E</mi><mo>=</mo><mi>m</mi><msup><mi>c</mi><mn>2</mn></msup></math>.</p>
    <p>KaTeX: <span class="katex"><span class="katex-mathml"><math><semantics><mrow><mi>y</mi></mrow>
       <annotation encoding="application/x-tex">\\sqrt{y}</annotation></semantics></math></span>
       <span class="katex-html" aria-hidden="true"><span class="mord sqrt">√y rendered</span></span></span>.</p>
    <p>MathJax 2: <span class="MathJax_Preview">a+b</span><script type="math/tex">a+b=c</script> and
       <script type="math/tex; mode=display">\\int_0^1 f</script></p>
    <p>Delimited TeX stays: \\(\\alpha_i\\) and \\[\\sum_k k\\].</p>
    <p>Wikipedia: <span class="mwe-math-element"><span style="display: none;"><math alttext="{\\displaystyle \\pi r^{2}}">
       <semantics><mi>π</mi><annotation encoding="application/x-tex">{\\displaystyle \\pi r^{2}}</annotation>
       </semantics></math></span><img class="mwe-math-fallback-image-inline" alt="{\\displaystyle \\pi r^{2}}"
       src="x.svg"></span> area.</p>
    <p>Image: <img src="/img/eq1.png" alt="\\beta \\leq 1"> and a photo <img src="cat.jpg" alt="a cat"></p>
    </main></body></html>"""
    text = extract(page)
    for tex in ("$x^{2}$", "$\\frac{a}{b}$", "$E = m c 2$", "$\\sqrt{y}$", "$a+b=c$", "$$\\int_0^1 f$$",
                "\\(\\alpha_i\\)", "\\[\\sum_k k\\]", "${\\displaystyle \\pi r^{2}}$", "$\\beta \\leq 1$"):
        assert tex in text, tex
    assert text.count("\\pi r^{2}") == 1  # the rendering and its fallback are not doubled
    assert "rendered" not in text and "a cat" not in text


def test_structure_kept_and_boilerplate_removed_by_structure_alone():
    menu = "".join(f'<li><a href="/s{i}">Section {i}</a></li>' for i in range(8))
    page = f"""<html><head><title>T</title><style>p {{color: red}}</style></head><body>
    <header><a href="/">Site name</a><ul>{menu}</ul></header>
    <div class="cookie-banner">We use cookies to improve your experience.</div>
    <div id="left-sidebar"><p>Popular posts this week you might like</p></div>
    <div class="wrapper">
      <h1>Title of the piece<a class="anchor" href="#t">¶</a></h1>
      <p>A first paragraph with <code>inline_code()</code> and <a href="/x">a link</a> in running prose.</p>
      <h2>Steps</h2>
      <ol><li>First step</li><li>Second step<ul><li>a nested point</li></ul></li></ol>
      <pre class="language-rust"><code>fn main() {{
    println!("hi");
}}</code></pre>
      <table><tr><th>Name</th><th>Value</th></tr><tr><td>alpha</td><td>1</td></tr>
        <tr><td>beta</td><td>2</td></tr></table>
      <div hidden>hidden text never shown</div>
      <p>Tags: <a href="/t/1">one</a> <a href="/t/2">two</a> <a href="/t/3">three</a> <a href="/t/4">four</a></p>
    </div>
    <footer><p>Copyright 2024 Example. All rights reserved.</p></footer>
    <script>var tracking = 1;</script></body></html>"""
    text = extract(page)
    assert text.split("\n\n") == [
        "# Title of the piece",
        "A first paragraph with `inline_code()` and a link in running prose.",
        "## Steps",
        "1. First step",
        "2. Second step",
        "  - a nested point",
        '```rust\nfn main() {\n    println!("hi");\n}\n```',
        "| Name | Value |\n|---|---|\n| alpha | 1 |\n| beta | 2 |",
    ]


def test_reader_uses_herd_extractor_and_trafilatura_stays_an_option(tmp_path):
    page = Path(PACKAGES["python3-doc"]) / "itertools.html"
    ours = next(read(page))
    theirs = next(read(page, extractor="trafilatura"))
    code = "def accumulate(iterable, func=operator.add, *, initial=None):\n    'Return running totals'"
    assert code in ours.text and code not in theirs.text
    assert ours.url == theirs.url == f"file://{page}"
    with pytest.raises(ValueError, match="unknown HTML extractor"):
        next(read(page, extractor="nope"))
    # a page declaring another charset is still read as the UTF-8 it was decoded to
    latin = '<html><head><meta charset="iso-8859-1"></head><body><p>Café crème, déjà vu.</p></body></html>'
    (tmp_path / "latin.html").write_bytes(latin.encode())
    assert next(read(tmp_path / "latin.html")).text == "Café crème, déjà vu."


ARTICLE = ("This is the article a reader came for, several full sentences of it. It explains the topic in detail and "
           "goes on for a while, as articles do.")


@pytest.mark.parametrize("body", [
    "<body class='page-template has-sidebar'>{a}</body>",  # WordPress Twenty Seventeen, on every page
    "<body class='no-sidebar'><div class='site-content'>{a}</div></body>",
    "<body><div id='page' class='site with-sidebar'>{a}</div></body>",
    "<body><div class='container menu-open'>{a}</div></body>",
    "<body><div class='entry-content share-buttons-enabled'>{a}</div></body>",
    "<body><div class='post ad-free'>{a}</div></body>",
    "<body><article class='post has-comments'>{a}</article></body>",
    "<body><div id='main-nav-wrapper-page'><div>{a}</div></div></body>",  # a boilerplate word, but the whole page
    "<body><div class='sidebar-layout'><main>{a}</main><div class='widget'>Recent posts</div></div></body>",
    "<body><form id='aspnetForm'><div class='content'>{a}</div></form></body>",  # ASP.NET wraps every page
], ids=["has-sidebar", "no-sidebar", "with-sidebar", "menu-open", "enabled", "ad-free", "has-comments",
        "holds-the-text", "holds-main", "form"])
def test_a_wrapper_named_like_boilerplate_does_not_take_the_page_with_it(body):
    assert extract(f"<html>{body.format(a=f'<p>{ARTICLE}</p>')}</html>") == ARTICLE


def test_wordpress_page_keeps_its_article_and_loses_its_sidebar_comments_and_footer():
    links = "".join(f"<li><a href='/p{i}'>Post number {i}</a></li>" for i in range(5))
    page = f"""<html><body class="post-template-default single has-sidebar colors-light">
    <div id="page" class="site"><header id="masthead" class="site-header"><a href="/">Blog name</a></header>
    <div class="site-content-contain"><div id="content" class="site-content"><div class="wrap">
      <div id="primary" class="content-area"><main id="main" class="site-main">
        <article class="post type-post has-post-thumbnail"><h1 class="entry-title">A post</h1>
          <div class="entry-content"><p>{ARTICLE}</p></div>
          <div class="sharedaddy sd-sharing-enabled">
            <div class="sharing-buttons">Share this: Twitter Facebook</div></div>
        </article>
        <div id="comments" class="comments-area"><p>Alice says: what a read, thanks for writing it.</p></div>
      </main></div>
      <div id="secondary" class="widget-area-sidebar"><section class="widget"><ul>{links}</ul></section>
        <p>About me: I write about things here and there, mostly on weekends.</p></div>
    </div></div><footer class="site-footer">Proudly powered by WordPress</footer></div></div></body></html>"""
    assert extract(page) == f"# A post\n\n{ARTICLE}"


def test_each_br_ends_a_line():
    page = """<html><body><p>Roses are red,<br>violets are blue.</p><p>10 Downing Street<br/>London<br/><br/>
    SW1A 2AA</p><ul><li>one<br>two</li></ul><h2>Title<br>and subtitle</h2></body></html>"""
    assert extract(page) == ("Roses are red,\nviolets are blue.\n\n10 Downing Street\nLondon\nSW1A 2AA\n\n"
                             "- one\n  two\n\n## Title and subtitle")
