"""The shipping service, an HTTP dependency: ``GET {shipping_url}/quote?item=..&quantity=..&destination=..``
answering ``{"carrier": str, "price_cents": int, "days": int}``.

Called with the standard library (``urllib.request``), which under the worker's monkey-patching is
cooperative: a quote waiting on the network lets the worker serve other requests.

How it fails: any failure of the dependency (connection refused, an HTTP error status, a timeout,
a reply that is not the JSON object above) raises ``DependencyUnavailable`` (code 1014: the
handler ran, the dependency is down; the caller may retry after a backoff) with ``details``
naming the dependency and the reason. The timeout is the configured one, or less: what is left of
the request's deadline (its ``timeout_ms``) minus a margin to send the reply, so the caller gets
this error rather than a 504. The timeout applies to each socket operation (connect, each read),
as urllib's does; the request's deadline still bounds the whole call (a 504).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from geventtcp import DependencyUnavailable

__all__ = ["quote", "REPLY_MARGIN"]

#: Seconds kept from the request's deadline to send the error reply (and for the reply to reach a
#: caller whose own timeout started a little before the server read the request).
REPLY_MARGIN = 0.2


def _timeout(configured: float, deadline: float | None) -> float:
    if deadline is None:
        return configured
    left = deadline - time.monotonic() - REPLY_MARGIN
    if left <= 0:
        raise DependencyUnavailable("no time left to call the shipping service",
                                    details={"dependency": "shipping", "reason": "deadline"})
    return min(configured, left)


def quote(base_url: str, item: str, quantity: int, destination: str, *, timeout: float,
          deadline: float | None) -> dict[str, Any]:
    """The shipping service's quote, or ``DependencyUnavailable`` (see the module docstring)."""
    seconds = _timeout(timeout, deadline)
    query = urllib.parse.urlencode({"item": item, "quantity": quantity, "destination": destination})
    url = f"{base_url.rstrip('/')}/quote?{query}"

    def down(reason: str, **more: Any) -> DependencyUnavailable:
        return DependencyUnavailable(f"shipping service unavailable: {reason}",
                                     details={"dependency": "shipping", "reason": reason, **more})

    try:
        with urllib.request.urlopen(url, timeout=seconds) as reply:
            body = reply.read()
    except urllib.error.HTTPError as exc:
        raise down("http status", status=exc.code) from exc
    except (TimeoutError, urllib.error.URLError) as exc:
        timed_out = isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)
        raise down("timeout", timeout=round(seconds, 3)) if timed_out else down("unreachable", error=str(exc)) from exc
    except OSError as exc:  # reset mid-reply, ...
        raise down("unreachable", error=str(exc)) from exc
    try:
        data = json.loads(body)
        result = {"carrier": str(data["carrier"]), "price_cents": int(data["price_cents"]), "days": int(data["days"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise down("bad reply") from exc
    return result
