"""The one HTTP call the API backends make, and the error every tool raises for the model to read."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request


class ToolError(Exception):
    """A tool could not answer; the message goes back to the model as the tool's result."""


def get_json(url: str, params: dict, *, headers: dict[str, str], timeout: float, service: str) -> dict:
    """GET `url?params` and parse its JSON body; any failure is a one-line ToolError naming `service`."""
    request = urllib.request.Request(f"{url}?{urllib.parse.urlencode(params)}",
                                     headers={"Accept": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read())
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
