"""Plain ASGI middleware of the server: access log and metrics, bearer token, upload size limit.

Each answers its own refusals as JSON ``{"error": ...}`` before the application runs.
"""
from __future__ import annotations

import hmac
import json
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional
from urllib.parse import parse_qs

from simret.utils.logs import get_logger

Scope = Dict[str, Any]
Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = get_logger("simret.serve.access")
TOKEN_COOKIE = "simret_token"
OPEN_PATHS = ("/health",)  # answered without a token


async def send_json(send: Send, status: int, body: Dict[str, Any], headers: Optional[List[tuple]] = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
                + list(headers or [])})
    await send({"type": "http.response.body", "body": payload})


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class AccessMiddleware:
    """Counts every request in ``metrics`` (by route template) and logs one line per request at DEBUG (``-v``):
    client, method, path (never the query string, which may hold a token), status, milliseconds."""

    def __init__(self, app: ASGIApp, metrics: Any, route_of: Callable[[Scope, Scope], str]) -> None:
        self.app = app
        self.metrics = metrics
        self.route_of = route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        original = dict(scope)  # routing adds "route" to scope; mounts rewrite its paths

        async def record(message: Dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.request(scope["method"], self.route_of(scope, original), status, seconds)
            client = scope.get("client") or ("-", 0)
            access_log.debug('%s "%s %s" %d %.1f ms', client[0], scope["method"], original["path"], status,
                             seconds * 1000)


class TokenMiddleware:
    """With a token, every path but ``/health`` needs ``Authorization: Bearer TOKEN``.

    A browser opens ``/?token=TOKEN`` once: it is answered with a redirect to ``/`` and an HttpOnly,
    SameSite=Strict cookie that stands for the header on later requests of the page.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _valid(self, candidate: Optional[str]) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        authorization = _header(scope, b"authorization") or ""
        if authorization[:7].lower() == "bearer " and self._valid(authorization[7:].strip()):
            await self.app(scope, receive, send)
            return
        if self._valid(_cookie(scope, TOKEN_COOKIE)):
            await self.app(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope["path"] == "/" and scope["method"] == "GET" and self._valid((query.get("token") or [None])[0]):
            cookie = f"{TOKEN_COOKIE}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict"
            await send({"type": "http.response.start", "status": 303,
                        "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode()), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        await send_json(send, 401, {"error": "this server needs a token: send 'Authorization: Bearer TOKEN' "
                                             "(a browser: open /?token=TOKEN once)"},
                        [(b"www-authenticate", b"Bearer")])


def _cookie(scope: Scope, name: str) -> Optional[str]:
    header = _header(scope, b"cookie")
    if not header:
        return None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


class BodyLimitMiddleware:
    """Request bodies over ``max_bytes`` are refused with 413 (by Content-Length before reading, else while
    reading); smaller ones are read here and handed on whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = {"error": f"upload over the server's limit of {self.max_bytes / 2 ** 20:g} MB "
                              f"(simret serve --max-upload-mb)"}
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await send_json(send, 413, too_large, [(b"connection", b"close")])
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await send_json(send, 413, too_large, [(b"connection", b"close")])
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
