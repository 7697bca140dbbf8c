"""herd's HTML extractor: the main text of a page as Markdown-like text that keeps code and math.

Llama 3 wrote its own parser because general-purpose extractors flatten what matters most for code and
reasoning data. This one keeps:
- `<pre>` blocks verbatim, indentation and all, fenced as Markdown (```lang when a class names it);
  inline `<code>`/`<kbd>`/`<samp>`/`<tt>` in backticks;
- math as TeX: MathML (its TeX annotation, else its `alttext`, else its linearised text), KaTeX and
  MathJax (`<script type="math/tex">`, the TeX annotation behind the rendered spans), `\\(...\\)` already in
  the text, and the alt text of math images (`<img class="math" alt="\\alpha">`);
- headings as `#` lines without their `¶` anchor links, lists as `-`/`1.` items, tables as `|` rows.

Boilerplate goes by structure, never by site: elements that are navigation by tag or ARIA role
(`nav`, `aside`, page-level `header`/`footer`, `role=navigation`, ...), by a class/id word shared across
the web (sidebar, breadcrumb, cookie, ...), by being hidden, or by link density (a block whose text is
mostly links is a menu). A class/id is read token by token, each split at `-`/`_`: a component names the
block (`left-sidebar`, `site-footer`), but a token describing a state (`has-sidebar`, `no-sidebar`,
`menu-open`, `ad-free`, `share-buttons-enabled`) does not. Whatever its tag, names or link density, the
page itself (`<html>`, `<body>`) and every element holding its main content (a `<main>`, the longest
`<article>`, or more than half of the page's text) are never pruned, so a theme's wrapper class cannot take
the whole page with it; a `<main>` or `<article>` goes only when hidden. When the page marks its main content
(`<main>`, `role=main`, a single `<article>`) and that holds most of the text, only it is extracted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from lxml import etree

# Elements that are never content.
_DROP_TAGS = frozenset("""script style noscript template head nav form button select input textarea
    iframe object embed svg canvas dialog menu label option datalist audio video map""".split())
_DROP_ROLES = frozenset("navigation banner contentinfo complementary search menu menubar toolbar dialog "
                        "alertdialog tablist tooltip".split())
# class/id words that mark boilerplate all over the web, matched against the `-`/`_` parts of each class token
_BOILER_WORDS = frozenset("""nav navbar navigation menu menubar sidebar sidebars breadcrumb breadcrumbs footer
    masthead banner cookie cookies consent share sharing social advert advertisement ads ad sponsor promo subscribe
    newsletter related pager pagination skip skiplink toolbar popup modal comment comments disqus widget""".split())
_BOILER_TOKENS = frozenset("print-only screen-reader-text sr-only visually-hidden".split())  # whole tokens only
_BOILER_CONCAT = re.compile(r"sidebar|navbar|breadcrumb|footer|cookie")  # "sphinxsidebar", "sitefooter"
# Parts that make a token describe a state of the page or block, not the block itself: has-sidebar, no-sidebar,
# with-sidebar, enable-search-modal, menu-open, ad-free, share-buttons-enabled, footer-top-visible.
_STATE_FIRST = frozenset("has no not with without is enable disable show hide".split())
_STATE_LAST = frozenset("""enabled disabled free open opened closed active inactive visible expanded collapsed toggled
    on off""".split())
_STATE_GLUED = ("has", "no", "with")  # "nosidebar", "hasfooter"
_NAME_PARTS = re.compile(r"[-_]+")
# Elements whose text never shows, left out of the text that decides where the main content is.
_NO_TEXT = frozenset("script style noscript template head select datalist svg".split())
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.I)
_BLOCK = frozenset("""p div section article main header footer blockquote li ul ol dl dt dd h1 h2 h3 h4 h5 h6 pre
    table tr td th thead tbody tfoot caption figure figcaption address details summary center hr br body html
    fieldset legend""".split())
_INLINE_CODE = frozenset({"code", "kbd", "samp", "tt", "var"})
_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_ANCHOR_MARKS = frozenset({"¶", "§", "#", "🔗", "link", "permalink", "\u200b", ""})
_LANG_CLASS = re.compile(r"(?:^|\s)(?:language|lang|highlight|brush)[-:]?\s*([A-Za-z0-9_+#.-]+)", re.I)
_MATH_IMG = re.compile(r"math|latex|tex\b|equation|formula", re.I)
_MATH_WRAPPER = re.compile(r"katex|mathjax|(?:^|[\s_-])math(?:$|[\s_-])", re.I)
_TEX_HINT = re.compile(r"\\[A-Za-z]+|[\^_]\{|\$")
_SPACE = re.compile(r"[ \t\r\n\f\v\u00a0]+")
_LINE_NUMBERS = re.compile(r"^[\s\d]*$")
_LINKY_BLOCKS = frozenset({"div", "section", "ul", "ol", "dl", "table", "p", "header", "footer", "center"})
_CONTENT_TAGS = frozenset({"main", "article"})  # pruned only when hidden: their class/id or role names no block


def extract(html: str | bytes | etree._Element) -> str | None:
    """The page's main content as Markdown-like text, or None when there is none.

    A parsed tree is pruned in place: pass a copy to keep it.
    """
    root = html if isinstance(html, etree._Element) else parse(html)
    if root is None:
        return None
    _prune(root, keep=_content_holders(root))
    root = _main_content(root)
    out = _Writer()
    out.walk(root)
    text = out.text()
    return text or None


def parse(html: str | bytes) -> etree._Element | None:
    """A page's tree (plain lxml elements, the fastest kind); None when there is no document."""
    if isinstance(html, str):
        html = html.encode("utf-8")
    try:
        return etree.fromstring(html, _PARSER)
    except (etree.LxmlError, ValueError):
        return None


_PARSER = etree.HTMLParser(encoding="utf-8", remove_comments=True, remove_pis=True)


# --- pruning ---------------------------------------------------------------------------------------


@dataclass
class _Stats:
    text: int = 0  # non-space characters
    linked: int = 0  # of which inside links
    links: int = 0
    has_pre: bool = False


def _content_holders(root: etree._Element) -> set[etree._Element]:
    """The elements pruning must keep whatever they are named: those holding a `<main>` (or `role=main`), the
    longest top-level `<article>`, or more than half of the page's visible text, and those elements themselves."""
    sizes: dict[etree._Element, int] = {}
    _visible_len(root, sizes)
    anchors = root.xpath("//main | //*[@role='main']")
    articles = root.xpath("//article[not(ancestor::article)]")
    if articles:
        anchors.append(max(articles, key=lambda a: sizes.get(a, 0)))
    keep = {el for anchor in anchors for el in (anchor, *anchor.iterancestors())}
    half = sizes[root] / 2
    el = root
    while el is not None:
        keep.add(el)
        el = next((c for c in el if sizes.get(c, 0) > half), None)
    return keep


def _visible_len(el: etree._Element, sizes: dict[etree._Element, int]) -> int:
    """Non-space characters of the text a reader would see under `el`, recorded in `sizes` for it and every
    element below it that shows text."""
    n = _chars(el.text)
    for child in el:
        if isinstance(child.tag, str) and child.tag not in _NO_TEXT:
            n += _visible_len(child, sizes)
        n += _chars(child.tail)
    sizes[el] = n
    return n


def _prune(el: etree._Element, keep: set[etree._Element], in_content: bool = False) -> _Stats:
    """Remove comments, hidden parts and boilerplate under `el` in one pass, bottom-up, so each block is
    judged by link density on what is left of it; `<pre>` subtrees and the elements in `keep` are never
    removed."""
    stats = _Stats(text=_chars(el.text))
    for child in list(el):
        tag = child.tag if isinstance(child.tag, str) else ""
        tail = _chars(child.tail)
        kept = child in keep or tag in ("html", "body")
        if not tag:  # a comment or processing instruction
            _remove(child)
        elif tag == "pre":
            stats.text += _chars("".join(child.itertext()))
            stats.has_pre = True
        elif not kept and _is_boilerplate(child, in_content):
            _remove(child)
        else:
            sub = _prune(child, keep, in_content or tag in ("article", "main") or child.get("role") == "main")
            if not kept and tag in _LINKY_BLOCKS and _is_link_list(sub):
                _remove(child)
            else:
                if tag == "a" and child.get("href") is not None:
                    sub.linked, sub.links = sub.text, sub.links + 1
                stats.text += sub.text
                stats.linked += sub.linked
                stats.links += sub.links
                stats.has_pre |= sub.has_pre
        stats.text += tail
    return stats


def _chars(s: str | None) -> int:
    return len("".join(s.split())) if s else 0


def _is_link_list(s: _Stats) -> bool:
    """A block whose visible text is mostly links (three or more): a menu, a tag cloud, a footer.
    A menu is short per link; a paragraph citing many references still has prose between them."""
    return s.links >= 3 and not s.has_pre and (s.text == 0 or (s.linked / s.text > 0.6 and s.text / s.links < 60))


def _remove(el: etree._Element) -> None:
    """Drop an element but keep its tail text, which belongs to the parent."""
    parent = el.getparent()
    if parent is None:
        return
    if el.tail:
        prev = el.getprevious()
        if prev is not None:
            prev.tail = (prev.tail or "") + el.tail
        else:
            parent.text = (parent.text or "") + el.tail
    parent.remove(el)


def _is_math_script(el) -> bool:
    return el.tag == "script" and (el.get("type") or "").lower().startswith("math/")


def _is_boilerplate(el, in_content: bool) -> bool:
    tag = el.tag
    if tag in _DROP_TAGS:
        return not _is_math_script(el)
    if tag in ("header", "footer"):  # the page's, not an article's own title block
        return not in_content
    if tag == "aside":  # a side note or footnote of the text is content; a page's side column is not
        return not in_content and not el.xpath(".//pre")
    if tag not in _CONTENT_TAGS and (el.get("role") or "").lower() in _DROP_ROLES:
        return True
    hidden = el.get("hidden") is not None or (el.get("aria-hidden") or "").lower() == "true"
    if hidden or _HIDDEN_STYLE.search(el.get("style") or ""):
        return not _holds_math(el)
    if tag in _CONTENT_TAGS:
        return False
    names = f"{el.get('class') or ''} {el.get('id') or ''}"
    if tag not in ("code", "math") and _names_boilerplate(names):
        return not _holds_math(el) and not el.xpath(".//pre")
    return False


@lru_cache(maxsize=4096)  # a site repeats its class strings on every element of a kind
def _names_boilerplate(names: str) -> bool:
    """Whether a class/id string names a boilerplate block, token by token (see the module docstring)."""
    for token in names.lower().split():
        if token in _BOILER_TOKENS:
            return True
        parts = [p for p in _NAME_PARTS.split(token) if p]
        if not parts or parts[0] in _STATE_FIRST or parts[-1] in _STATE_LAST:
            continue
        if any(p in _BOILER_WORDS or (_BOILER_CONCAT.search(p) and not p.startswith(_STATE_GLUED)) for p in parts):
            return True
    return False


def _holds_math(el) -> bool:
    return el.tag == "math" or bool(el.xpath(".//*[local-name()='math' or local-name()='annotation']"))


def _text_len(el) -> int:
    return sum(_chars(t) for t in el.itertext())


def _main_content(root: etree._Element) -> etree._Element:
    """The element the page marks as its main content, if it holds most of the page's text."""
    body = root.find("body") if root.tag == "html" else root
    body = root if body is None else body
    candidates = body.xpath(".//main | .//*[@role='main']")
    if not candidates:
        articles = body.xpath(".//article[not(ancestor::article)]")
        candidates = articles if len(articles) == 1 else []
    if not candidates:
        return body
    best = max(candidates, key=_text_len)
    total = _text_len(body)
    return best if total == 0 or _text_len(best) >= 0.5 * total else body


# --- writing ---------------------------------------------------------------------------------------


@dataclass
class _Writer:
    """Walks the pruned tree, collecting blocks (paragraphs, fences, rows) of Markdown-like text."""

    blocks: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # lines of the block being written that a `<br>` ended
    line: list[str] = field(default_factory=list)  # inline pieces of its current line
    prefix: str = ""  # list-item marker for the next block's first line
    depth: int = 0  # list nesting

    def text(self) -> str:
        self.flush()
        return "\n\n".join(self.blocks).strip()

    def flush(self) -> None:
        s = self._take("\n")
        if s:
            self.block(s)

    def _take(self, sep: str) -> str:
        """The block being written, its lines joined by `sep`; the next block starts empty."""
        self._hard_break()
        s = sep.join(self.lines)
        self.lines.clear()
        return s

    def block(self, s: str) -> None:
        if self.prefix:  # a list item's further lines line up under its first
            s = self.prefix + s.replace("\n", "\n" + " " * len(self.prefix))
            self.prefix = ""
        self.blocks.append(s)

    def inline(self, s: str) -> None:
        self.line.append(s)

    def walk(self, el: etree._Element) -> None:
        tag = el.tag.lower() if isinstance(el.tag, str) else ""
        if not tag:  # a comment or an entity the pruning missed
            return
        if tag == "br":
            self._hard_break()
        elif tag == "math" or tag.endswith("}math") or _is_math_script(el):
            self.inline(_math_text(el))
        elif tag == "script":
            pass
        elif _is_math_wrapper(el):
            self.inline(_math_text(_first_math(el)))
        elif tag == "img":
            self._image(el)
        elif tag == "pre":
            self._pre(el)
        elif tag in _INLINE_CODE:
            code = _SPACE.sub(" ", _text_with_breaks(el)).strip()
            if code:
                tick = "``" if "`" in code else "`"
                self.inline(f"{tick}{code}{tick}")
        elif tag == "a" and _is_anchor_mark(el):
            pass
        elif tag in _HEADINGS:
            self.flush()
            self._children(el)
            s = self._take(" ").rstrip("¶§🔗 ").strip()  # a heading is one line, whatever breaks it had
            if s:
                self.block("#" * _HEADINGS[tag] + " " + s)
        elif tag in ("ul", "ol", "menu"):
            self._list(el, ordered=tag == "ol")
        elif tag == "table":
            self._table(el)
        elif tag == "hr":
            self.flush()
        elif tag in _BLOCK:
            self.flush()
            self._children(el)
            self.flush()
        else:
            self._children(el)
        if el.tail:
            self.inline(el.tail)

    def _children(self, el) -> None:
        if el.text:
            self.inline(el.text)
        for child in el:
            self.walk(child)

    def _hard_break(self) -> None:
        """End the current line (a `<br>`); blank lines are left out, since a blank line is what ends a block."""
        s = _SPACE.sub(" ", "".join(self.line)).strip()
        self.line.clear()
        if s:
            self.lines.append(s)

    def _image(self, el) -> None:
        alt = (el.get("alt") or "").strip()
        hints = f"{el.get('class') or ''} {el.get('src') or ''}"
        if alt and (_MATH_IMG.search(hints) or _TEX_HINT.search(alt)):
            self.inline(f"${alt}$")

    def _pre(self, el) -> None:
        code = _text_with_breaks(el).strip("\n")
        if not code.strip() or _LINE_NUMBERS.match(code):  # empty, or a gutter of line numbers
            return
        self.flush()
        if self.prefix:  # a list item that opens with code: the marker on its own line, the fence intact
            self.blocks.append(self.prefix.rstrip())
            self.prefix = ""
        fence = "```"
        while fence in code:
            fence += "`"
        self.block(f"{fence}{_language(el)}\n{code}\n{fence}")

    def _list(self, el, ordered: bool) -> None:
        self.flush()
        n = 0
        self.depth += 1
        for child in el:
            if not isinstance(child.tag, str):
                continue
            if child.tag != "li":
                self.walk(child)
                continue
            n += 1
            marker = f"{n}. " if ordered else "- "
            start = len(self.blocks)
            self.prefix = "  " * (self.depth - 1) + marker
            self.walk_li(child)
            if len(self.blocks) == start:  # an empty item
                self.prefix = ""
        self.depth -= 1
        self.flush()

    def walk_li(self, li) -> None:
        self.flush()
        self._children(li)
        self.flush()

    def _table(self, el) -> None:
        self.flush()
        if el.xpath(".//pre | .//table"):  # a layout table: its cells are blocks, not a grid
            self._children(el)
            self.flush()
            return
        rows = []
        header_done = False
        for tr in el.iter("tr"):
            cells = [c for c in tr if isinstance(c.tag, str) and c.tag in ("td", "th")]
            if not cells:
                continue
            texts = []
            for c in cells:
                sub = _Writer()
                sub._children(c)
                texts.append(_SPACE.sub(" ", sub.text()).replace("|", "\\|").strip())
            if not any(texts):
                continue
            rows.append("| " + " | ".join(texts) + " |")
            if not header_done:
                header_done = True
                if all(c.tag == "th" for c in cells):
                    rows.append("|" + "---|" * len(cells))
        caption = el.find("caption")
        if caption is not None:
            self._children(caption)
            self.flush()
        if rows:
            self.block("\n".join(rows))


def _text_with_breaks(el) -> str:
    """An element's text with `<br>` as a newline (lxml's text_content ignores it)."""
    parts = []
    if el.text:
        parts.append(el.text)
    for child in el:
        if isinstance(child.tag, str):
            parts.append("\n" if child.tag == "br" else _text_with_breaks(child))
        if child.tail:
            parts.append(child.tail)
    return "".join(parts)


def _language(pre) -> str:
    for el in (pre, *list(pre.iterancestors())[:3], *pre.iterchildren("code")):
        m = _LANG_CLASS.search(el.get("class") or "")
        if m and m.group(1).lower() not in ("default", "none", "text", "plain", "notranslate", "source"):
            return m.group(1).lower()
    return ""


def _is_anchor_mark(a) -> bool:
    """The `¶`/`#` permalink beside a heading or definition: navigation, not text."""
    href = a.get("href") or ""
    text = "".join(a.itertext()).strip().lower()
    return href.startswith("#") and (text in _ANCHOR_MARKS or "headerlink" in (a.get("class") or ""))


def _is_math_wrapper(el) -> bool:
    """A KaTeX/MathJax/MediaWiki span that shows rendered math beside its source: the source is the text."""
    return bool(_MATH_WRAPPER.search(el.get("class") or "")) and _first_math(el) is not None


def _first_math(el):
    for sub in el.iter():
        if not isinstance(sub.tag, str):
            continue
        if sub.tag == "math" or sub.tag.endswith("}math") or _is_math_script(sub):
            return sub
    return None


def _math_text(el) -> str:
    """TeX for a `<math>` (or math script): its TeX annotation, its alttext, else its text run together."""
    if el.tag == "script":  # MathJax 2: type="math/tex" or "math/tex; mode=display"
        delim = "$$" if "mode=display" in (el.get("type") or "").replace(" ", "") else "$"
        return f"{delim}{(el.text or '').strip()}{delim}"
    delim = "$$" if (el.get("display") or "").lower() == "block" else "$"
    for ann in el.iter():
        if isinstance(ann.tag, str) and ann.tag.split("}")[-1] == "annotation" and "tex" in (
                ann.get("encoding") or "").lower():
            return f"{delim}{(ann.text or '').strip()}{delim}"
    alt = (el.get("alttext") or "").strip()
    if alt:
        return f"{delim}{alt}{delim}"
    return delim + _SPACE.sub(" ", " ".join(t.strip() for t in el.itertext() if t.strip())) + delim


def code_blocks(root: etree._Element) -> list[str]:
    """The page's `<pre>` blocks as lxml reads them (`<br>` as a newline), without gutters of line numbers:
    what an extraction that keeps code must reproduce line for line."""
    blocks = [_text_with_breaks(pre).strip("\n") for pre in root.iter("pre")]
    return [b for b in blocks if b.strip() and not _LINE_NUMBERS.match(b)]
