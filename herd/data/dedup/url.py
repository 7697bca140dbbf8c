"""URL de-duplication: the first document of each normalised URL is kept."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from herd.data.dedup.base import FirstOccurrenceDedup, hash64
from herd.data.document import Document

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_url(url: str) -> str:
    """Scheme and host lower-cased; user info, default port, fragment, trailing slash and utm_* parameters dropped;
    the remaining query parameters sorted, since their order does not change the page."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    try:
        port = parts.port
    except ValueError:  # a malformed port is part of what makes this URL distinct
        port = None
    netloc = host if port is None or _DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
    query = urlencode(sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not k.lower().startswith("utm_")))
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), query, ""))


@dataclass
class URLDedup(FirstOccurrenceDedup):
    name: str = "url_dedup"
    reason: str = "url_duplicate_of"

    def signature(self, doc: Document) -> int | None:
        return hash64(normalize_url(doc.url)) if doc.url else None
