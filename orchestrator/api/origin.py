"""Open mode (no API keys) is for one user on their own machine, and nothing else may drive it: not a web page the
user happens to visit. Such a page can send cross-origin form posts (no CORS preflight) and, by DNS rebinding, make
its own host name resolve to 127.0.0.1 (then the browser treats the API as the page's own origin).

So in open mode the API answers only requests whose ``Host`` is a loopback name (or one the operator allows:
``MGMFLOW_ALLOWED_HOSTS``), and refuses state-changing requests whose ``Origin`` is another site. Keyed mode needs
neither: a page cannot attach a bearer key it does not know."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from mgmflow.orchestrator.api.errors import error_response

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _hostname(value: str) -> str | None:
    """``host[:port]`` or ``[v6]:port`` → the host, lowercased; None when it does not parse."""
    try:
        return urlsplit(f"//{value}").hostname
    except ValueError:
        return None


class OpenModeGuard:
    """In an open (key-less) app: loopback ``Host`` only, and no state change from a foreign ``Origin``."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]):
        self.app = app
        self.allowed = {*LOOPBACK_HOSTS, *(host.lower() for host in allowed_hosts)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name: value.decode("latin-1") for name, value in scope.get("headers", ())
                   if name in (b"host", b"origin", b"sec-fetch-site")}
        refusal = None
        if _hostname(headers.get(b"host", "")) not in self.allowed:
            refusal = (421, "this open (key-less) server answers only to a loopback Host (set MGMFLOW_API_KEYS to "
                            "serve other names)", "host_not_allowed")
        elif scope["method"] not in SAFE_METHODS and self._foreign(headers):
            refusal = (403, "a state-changing request from another site's page is refused in open mode",
                       "cross_origin")
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message, code = refusal
        return await error_response(Request(scope), status, message, code)(scope, receive, send)

    def _foreign(self, headers: dict[bytes, str]) -> bool:
        origin = headers.get(b"origin")
        if origin is not None:  # "null" (a sandboxed page, a file) is foreign too
            return urlsplit(origin).hostname not in self.allowed if origin != "null" else True
        return headers.get(b"sec-fetch-site") == "cross-site"
