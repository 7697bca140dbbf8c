"""The one HTTP call the API backends make, and the error every tool raises for the model to read."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


class ToolError(Exception):
    """A tool could not answer; the message goes back to the model as the tool's result."""


MAX_BODY_BYTES = 8 << 20  # an API's answer; a larger one is no answer a model could read


def get_json(url: str, params: dict, *, headers: dict[str, str], timeout: float, service: str) -> dict:
    """GET `url?params` and parse its JSON body; any failure is a one-line ToolError naming `service`. `timeout`
    bounds the whole call: the lookup, the headers and the body (a server sending a byte a second had kept a turn
    waiting for minutes); a call past it is left to end on its own thread."""
    outcome: list = []
    caller = threading.Thread(target=_get, args=(outcome, url, params, headers, timeout, service), daemon=True,
                              name=f"herd-http {service}")
    caller.start()
    caller.join(timeout)
    if not outcome:
        raise ToolError(f"{service} took longer than {timeout:g} s to answer")
    body = outcome[0]
    if isinstance(body, ToolError):
        raise body
    if not isinstance(body, dict):
        raise ToolError(f"{service} answered with unexpected JSON")
    return body


def _get(outcome: list, url: str, params: dict, headers: dict[str, str], timeout: float, service: str) -> None:
    """get_json's call, on its own thread: the parsed body, or the ToolError, appended to `outcome`."""
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
                if time.monotonic() > deadline:  # the caller has gone: the thread and its socket end too
                    raise ToolError(f"{service} took longer than {timeout:g} s to answer")
            outcome.append(json.loads(data))
    except ToolError as error:
        outcome.append(error)
    except urllib.error.HTTPError as error:
        hint = " (check the API key)" if error.code in (401, 403) else " (rate limited)" if error.code == 429 else ""
        outcome.append(ToolError(f"{service} answered HTTP {error.code} {error.reason}{hint}"))
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        outcome.append(ToolError(f"{service} could not be reached: {getattr(error, 'reason', error)}"))
    except ValueError:
        outcome.append(ToolError(f"{service} answered with something that is not JSON"))
