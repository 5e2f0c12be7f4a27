"""Who may talk to lmforge's local web apps (`lmforge serve`, `lmforge studio`): an ASGI middleware that checks every
request before any route sees it.

  Host     must name this server: localhost, 127.0.0.1, [::1] or the address it is bound to (with its port when the
           port is known). A web page the user visits can point its own domain at 127.0.0.1 (DNS rebinding); its
           requests then reach the server with that domain in Host, and are refused. A wildcard bind (0.0.0.0, ::)
           cannot know the names it is reached by, so any Host passes there and the token below is what protects.
  Origin   when present, must be this server's own origin (the scheme and the Host it was asked under) or one the
           app allows (serve's --cors). Browsers send Origin on cross-site POSTs and fetches, so a form or a script
           on another site that targets the server is refused even when its request would be "simple" (no CORS
           preflight). "null" (sandboxed frames, file: pages) is refused too.
  Token    state-changing requests (any method but GET, HEAD, OPTIONS) need the session token in the
           `X-Lmforge-Token` header when the app has one; with `token_for_reads` every request but the page's own
           shell (`open_paths`) needs it, which is what a non-loopback bind uses. Browsers never add a custom header
           to a cross-site request without a preflight that the Origin check refuses.

A refusal is 403 with a JSON body in OpenAI's error shape, naming what was wrong, so curl users see why.
"""

from __future__ import annotations

import hmac
import json
import secrets

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_HEADER = "x-lmforge-token"


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]").lower()
    return host in LOOPBACK_NAMES or host.startswith("127.")


def new_token() -> str:
    """A fresh session token: 128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def split_host(value: str) -> tuple[str, int | None]:
    """'name:port' / '[v6]:port' / 'name' -> (lower-case name without brackets, port or None). A malformed value
    gives a port of -1, which no server has."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:  # a bare name, or a bare IPv6 address (no port)
        name, port = value, None
    if port is None:
        return name, None
    return name, int(port) if port.isdigit() else -1


class RequestGuard:
    """ASGI middleware: the Host, Origin and token checks of the module docstring, in that order.

    `host`, `port`: the address the server is bound to (`port` None: any port is accepted, for in-process test
    clients); `origins`: further origins allowed (scheme://name[:port]); `token`: the session token (None: no
    token checks); `token_for_reads`: every request needs the token except GET/HEAD of `open_paths`."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int | None = None, origins: list[str] | tuple = (),
                 token: str | None = None, token_for_reads: bool = False, open_paths: tuple[str, ...] = ("/",)):
        self.app, self.port, self.token, self.token_for_reads = app, port, token, token_for_reads
        bound = host.strip("[]").lower()
        self.any_host = bound in WILDCARD_ADDRESSES
        self.names = LOOPBACK_NAMES | {bound}
        self.origins = {o.rstrip("/").lower() for o in origins}
        self.open_paths = set(open_paths)

    def refusal(self, scope) -> tuple[str, str] | None:
        """(code, message) when the request is refused, else None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        name, port = split_host(host)
        if not host:
            return "missing_host", "the request has no Host header"
        wrong_port = self.port is not None and (port or 80) != self.port  # no port in Host: the scheme's, 80
        if not self.any_host and (name not in self.names or wrong_port):
            return "bad_host", (f"Host {host!r} is not this server (use http://127.0.0.1:{self.port or 'PORT'}/): "
                                f"requests for other names are refused against DNS rebinding")
        origin = headers.get("origin")
        if origin is not None:
            scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
            own = f"{scheme}://{host.strip().lower()}"
            if origin.rstrip("/").lower() not in self.origins | {own}:
                return "bad_origin", f"Origin {origin!r} may not use this server (cross-site requests are refused)"
        if self.token is not None:
            method = scope.get("method", "GET")
            needs = method not in SAFE_METHODS or (self.token_for_reads and not (
                scope.get("path", "/") in self.open_paths or scope.get("path", "").startswith("/static/")))
            if needs and not hmac.compare_digest(headers.get(TOKEN_HEADER, "").encode(), self.token.encode()):
                return "bad_token", ("missing or wrong session token (the X-Lmforge-Token header; the token is printed "
                                     "when the server starts)")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        if refused is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        code, message = refused
        body = json.dumps({"error": {"message": message, "type": "permission_error", "param": None,
                                     "code": code}}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
