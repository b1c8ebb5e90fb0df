"""The API's front door: a request shows a token with the right scope before anything reads its body.

FastAPI reads and parses a request's body before it runs a route's dependencies, so while the token
was checked by a dependency a 200 MB POST without a token was read whole first (700 MB held), and a
300 MB chunked body got a 422. This plain ASGI layer sits in front of the whole application instead:
no token, a wrong one, a method the token has no right for, another school's path, or a declared
body over ``api.max_body_bytes`` are answered here, and the connection closed, without reading a byte
of the body. The routes check the same scopes again, and their queries only touch the token's
schools: the door is not the only lock.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from appliance.hub.api.auth import Caller, NoTokens, OutOfScope, Refused, TokenFile
from appliance.hub.api.models import UTF8JSON

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

CALLER = "edugate.caller"  # where the door leaves the checked caller in the request's scope
REALM = 'Bearer realm="edugate-hub"'
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_SCHOOL_PATH = re.compile(r"^/v1/schools/([^/]+)")


class Door:
    """ASGI middleware in front of the API; ``open_paths`` (the OpenAPI document) need no token."""

    def __init__(self, app: App, tokens: TokenFile, max_body_bytes: int, open_paths: frozenset[str]) -> None:
        self.app = app
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        try:
            scope[CALLER] = self.admit(scope)
        except DoorRefusal as refusal:
            await refusal.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def admit(self, scope: Scope) -> Caller:
        """The caller, or the refusal (503, 401, 403, 413) the request gets at the door."""
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        try:
            self.tokens.tokens()
        except NoTokens as exc:
            raise DoorRefusal(503, str(exc)) from None
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise DoorRefusal(401, "send 'Authorization: Bearer <token>'", {"WWW-Authenticate": REALM})
        try:
            caller = self.tokens.check(token.strip())
        except Refused as exc:
            raise DoorRefusal(401, str(exc), {"WWW-Authenticate": f'{REALM}, error="invalid_token"'}) from None
        try:
            caller.need("write" if scope["method"] in WRITE_METHODS else "read")
            school = _SCHOOL_PATH.match(scope["path"])
            if school:
                caller.school(school.group(1))
        except OutOfScope as exc:
            raise DoorRefusal(403, str(exc)) from None
        declared = headers.get(b"content-length", b"").strip()
        if declared and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            raise DoorRefusal(413, body_too_large(self.max_body_bytes))
        return caller


def body_too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (api.max_body_bytes); a leave request is far smaller"


class ApiError(Exception):
    """An answer other than 200: status, one line, and extra headers (WWW-Authenticate)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class DoorRefusal(ApiError):
    """An answer given at the door: JSON ``{"error": ...}``, and the connection closed (its body is never read)."""

    def response(self) -> UTF8JSON:
        return UTF8JSON(
            {"error": self.message}, status_code=self.status, headers={**self.headers, "Connection": "close"}
        )
