"""Bearer API keys, compared in constant time so that response timing tells nothing about a key."""
from __future__ import annotations

import hmac

from herd.serve.protocol import APIError


def check_key(authorization: str | None, keys: tuple[str, ...]) -> None:
    """Raise a 401 unless `authorization` is "Bearer <one of keys>" (no keys: everything passes)."""
    if not keys:
        return
    scheme, _, given = (authorization or "").partition(" ")
    # Every key is compared, a match or not, so the time taken does not depend on which key matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.strip().encode(), key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")
