"""HTTP-level guards around Gradio's app, installed as ASGI middleware at launch.

- ``LoginGuard``: Gradio's ``POST /login`` goes through the login throttle first
  (``collector.users.LoginThrottle``): past the allowed attempts per user name and per client
  address it answers HTTP 429 with ``Retry-After`` before any password is hashed. The check itself
  (``Users.check``) hashes off the event loop, so a flood of attempts never delays the requests of
  people already logged in.
- ``SecurityHeaders``: a Content-Security-Policy that lets the page load images, media, fonts and
  frames only from the app itself (a second wall behind ``ui.render``'s sanitizer), plus
  ``nosniff`` and ``no-referrer``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from collector.users import LoginThrottle

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CSP = ("default-src 'self' 'unsafe-inline' 'unsafe-eval' data: blob:; img-src 'self' data: blob:; "
       "media-src 'self' data: blob:; font-src 'self' data:; frame-src 'none'; object-src 'none'; "
       "base-uri 'self'; form-action 'self'")
MAX_LOGIN_BODY = 64 * 1024
LOGIN_PATHS = ("/login", "/login/")


def client_address(scope: Scope, trust_forwarded: bool) -> str:
    """The client's address: the last X-Forwarded-For hop when behind a known proxy (a Space's
    proxy appends the address it saw; earlier hops are whatever the client sent), else the peer."""
    if trust_forwarded:
        for key, value in scope.get("headers") or []:
            if key == b"x-forwarded-for":
                hops = [h.strip() for h in value.decode("latin-1").split(",") if h.strip()]
                if hops:
                    return hops[-1]
    client = scope.get("client")
    return client[0] if client else "unknown"


async def _respond(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class LoginGuard:
    """Throttles ``POST /login`` by user name and by client address (see the module docstring)."""

    def __init__(self, app, throttle: LoginThrottle, trust_forwarded: bool = False):
        self.app = app
        self.throttle = throttle
        self.trust_forwarded = trust_forwarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in LOGIN_PATHS:
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_LOGIN_BODY:
                await _respond(send, 413, "login form too large")
                return
            if not message.get("more_body"):
                break
        name = await _form_username(scope, body)
        address = client_address(scope, self.trust_forwarded)
        wait = self.throttle.attempt(name, address)
        if wait > 0:
            logger.warning("login throttled: name=%r address=%s wait=%.0fs", name[:64], address, wait)
            await _respond(send, 429, f"too many login attempts; try again in {wait:.0f} s",
                           [(b"retry-after", str(int(wait) + 1).encode())])
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def observe(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                self.throttle.succeeded(name, address)
            await send(message)

        await self.app(scope, replay, observe)


async def _form_username(scope: Scope, body: bytes) -> str:
    """The ``username`` field of a login form (urlencoded or multipart), or "" when unreadable."""
    from starlette.requests import Request

    async def once() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, once).form()
        return str(form.get("username") or "").strip()
    except Exception:  # a malformed form: throttled by address only, and Gradio refuses it
        return ""


class SecurityHeaders:
    """Adds the Content-Security-Policy and two hardening headers to every HTTP response."""

    HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *[(k, v) for k, v in self.HEADERS if k not in names]]
            await send(message)

        await self.app(scope, receive, with_headers)
