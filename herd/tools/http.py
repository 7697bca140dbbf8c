"""The one HTTP call the API backends make, and the error every tool raises for the model to read."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request


class ToolError(Exception):
    """A tool could not answer; the message goes back to the model as the tool's result."""


MAX_BODY_BYTES = 8 << 20  # an API's answer; a larger one is no answer a model could read


def get_json(url: str, params: dict, *, headers: dict[str, str], timeout: float, service: str) -> dict:
    """GET `url?params` and parse its JSON body; any failure is a one-line ToolError naming `service`. `timeout`
    bounds the whole answer (a server sending a byte a second had kept a turn waiting for minutes), give or take one
    read's wait."""
    request = urllib.request.Request(f"{url}?{urllib.parse.urlencode(params)}",
                                     headers={"Accept": "application/json", **headers})
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = bytearray()
            while chunk := response.read1(1 << 16):
                data += chunk
                if len(data) > MAX_BODY_BYTES:
                    raise ToolError(f"{service} answered with more than {MAX_BODY_BYTES:,} bytes")
                if time.monotonic() > deadline:
                    raise ToolError(f"{service} took longer than {timeout:g} s to answer")
            body = json.loads(data)
    except urllib.error.HTTPError as error:
        hint = " (check the API key)" if error.code in (401, 403) else " (rate limited)" if error.code == 429 else ""
        raise ToolError(f"{service} answered HTTP {error.code} {error.reason}{hint}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise ToolError(f"{service} could not be reached: {getattr(error, 'reason', error)}") from None
    except ValueError:
        raise ToolError(f"{service} answered with something that is not JSON") from None
    if not isinstance(body, dict):
        raise ToolError(f"{service} answered with unexpected JSON")
    return body
