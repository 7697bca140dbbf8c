"""URL de-duplication: the first document of each normalised URL is kept."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from herd.data.dedup.base import FirstOccurrenceDedup, hash64
from herd.data.document import Document

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_url(url: str) -> str:
    """Scheme and host lower-cased; user info, default port, fragment, trailing slash and utm_* parameters dropped;
    the remaining query parameters sorted by key, since their order does not change the page. What does is kept:
    the values of a repeated key in their order (a=1&a=2 is a list), a `#!` fragment (AJAX pages are addressed by
    it), a malformed or out-of-range port as written, and an IPv6 host's brackets ([::1]:8080 is not [::1:8080])."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:  # unbalanced IPv6 brackets: no parts to normalise, but still a key of its own
        return url.strip()
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # a malformed port is part of what makes this URL distinct
        port = parts.netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]
    netloc = host if port is None or _DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
    params = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not k.lower().startswith("utm_")]
    query = urlencode(sorted(params, key=lambda kv: kv[0]))  # stable: a repeated key's values keep their order
    fragment = parts.fragment if parts.fragment.startswith("!") else ""
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), query, fragment))


@dataclass
class URLDedup(FirstOccurrenceDedup):
    name: str = "url_dedup"
    reason: str = "url_duplicate_of"

    def signature(self, doc: Document) -> int | None:
        return hash64(normalize_url(doc.url)) if doc.url else None
