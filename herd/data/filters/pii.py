"""PII masking: e-mail addresses, phone numbers, IP addresses. Never drops a document.

Patterns aim at what identifies a person or machine, and stay clear of what merely looks numeric:
version numbers (3.11.2, version 1.2.3.4), dates (2024-01-15, 15.01.2024), decimals and grouped numbers
(1,234,567), ratios (1:2:3:4:5:6:7:8).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from herd.data.document import Document
from herd.data.filters.base import DocStage, evolve

# An e-mail is found from its "@domain": a pattern that starts with the rare "@" lets the regex engine skip ahead
# to it, where one starting with the local part would be tried at every letter of the text. The local part is
# then the run of address characters just before the "@" (at most 64, as RFC 5321 allows), ending right at it:
# \Z, since "$" also matches before a newline, which had joined stacked decorators (@a.b\n@c.d) into one address.
_EMAIL_DOMAIN = re.compile(r"@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_LOCAL_PART = re.compile(r"[\w.+-]{1,64}\Z")

_DIGIT = re.compile(r"\d")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not inside a longer dotted run: 1.2.3.4.5 is not an address.
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
# A four-part version number looks like an address; the word before it tells them apart.
_VERSION_BEFORE = re.compile(r"\b(?:versions?|ver|v|release|build|rev|revision)[.:]?\s*$", re.I)
# Hex-and-colon runs (with an optional embedded IPv4 tail) are only candidates; ipaddress decides,
# which keeps clock times (12:30:45) and MAC-like tokens out.
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])[0-9A-Fa-f]*:[0-9A-Fa-f:]+(?:\.\d{1,3}){0,3}(?![\w:])")

PHONE = re.compile(
    r"(?<![\w+.\-/])(?:"
    # international: +CC and 8-15 digits in groups, optional (0) trunk: +44 20 7946 0958, +49 (0)30 1234567
    r"\+(?=(?:[ .\-()]*\d){8,15})\d{1,3}(?:[ .\-]?\(0?\d{0,4}\))?(?:[ .\-]?\d{1,5}){2,5}"
    # North American, with or without its country code 1: (202) 555-0143, 202-555-0143, 202.555.0143,
    # 1-800-555-0199 (not spaced: "100 200 3000" is a list)
    r"|(?:1[ .\-])?(?:\(\d{3}\)[ .\-]?\d{3}[ .\-]\d{4}|\d{3}(?P<s>[.\-])\d{3}(?P=s)\d{4})"
    # national European with a trunk 0: 06 12 34 56 78, 01.23.45.67.89, 030 1234567, 020 7946 0958
    r"|0\d(?P<t>[ .])\d{2}(?P=t)\d{2}(?P=t)\d{2}(?P=t)\d{2}"
    r"|0\d{2,4}[ /]\d{3,4} ?\d{3,4}"
    r")(?![\w\-]|[.,]\d)"
)


def _email_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _EMAIL_DOMAIN.finditer(text):
        local = _LOCAL_PART.search(text, max(0, m.start() - 65), m.start())
        # A run longer than 64 characters is no local part: it fills the window to its left edge.
        if local and not (local.start() > 0 and re.match(r"[\w.+-]", text[local.start() - 1])):
            if not spans or local.start() >= spans[-1][1]:
                spans.append((local.start(), m.end()))
    return spans


def _ipv6_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _IPV6_CANDIDATE.finditer(text):
        cand = m.group()
        # "::1" or "1::2" are slices and scope operators far more often than addresses
        groups = sum(1 for g in cand.split(":") if g)
        if groups < 3 and not (groups == 2 and "." in cand):
            continue
        # written out in full, a real address starts with four hex digits (2001:, fe80:); 1:2:3:4:5:6:7:8 is a ratio
        if "::" not in cand and len(cand.split(":", 1)[0]) != 4:
            continue
        try:
            ipaddress.IPv6Address(cand)
        except ValueError:
            continue
        spans.append(m.span())
    return spans


def _ipv4_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in IPV4.finditer(text)
            if not _VERSION_BEFORE.search(text[max(0, m.start() - 16):m.start()])]


@dataclass
class PIIMasker(DocStage):
    name: str = "pii"
    email_token: str = "<EMAIL>"
    phone_token: str = "<PHONE>"
    ip_token: str = "<IP>"

    def process(self, doc: Document) -> Document:
        text, counts = doc.text, {"email": 0, "ip": 0, "phone": 0}
        # Each pattern scans the whole text; the characters every match needs rule most texts out far sooner.
        if "@" not in text and not _DIGIT.search(text):
            return doc
        # e-mails first: their domains must not be read as anything else; IPv6 before IPv4 (embedded v4)
        if "@" in text:
            text, counts["email"] = _mask_spans(text, _email_spans(text), self.email_token)
        if ":" in text:
            text, counts["ip"] = _mask_spans(text, _ipv6_spans(text), self.ip_token)
        text, n4 = _mask_spans(text, _ipv4_spans(text), self.ip_token)
        counts["ip"] += n4
        text, counts["phone"] = PHONE.subn(self.phone_token, text)
        counts = {k: v for k, v in counts.items() if v}
        if not counts:
            return doc
        out = evolve(doc, text=text)
        out.meta["pii"] = counts
        return out


def _mask_spans(text: str, spans: list[tuple[int, int]], token: str) -> tuple[str, int]:
    for start, end in reversed(spans):
        text = text[:start] + token + text[end:]
    return text, len(spans)
