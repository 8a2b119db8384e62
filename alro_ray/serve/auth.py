"""An optional API key: set ALRO_SERVE_API_KEY where the app is built (`alro serve`, `serve run`)
and every route but the health checks wants `Authorization: Bearer <key>` (or `X-API-Key: <key>`).

The ingress keeps only the key's SHA-256 and compares digests in constant time (hmac.compare_digest).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from fastapi.responses import JSONResponse

API_KEY_ENV = "ALRO_SERVE_API_KEY"
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes carry no key
PUBLIC_WITHOUT_KEY = frozenset({"/stats"})  # answers without the key, minus the process details


def _digest(text: str | bytes) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text).digest()


class ApiKey:
    """The key's digest, or None: no key set, every route open."""

    def __init__(self, digest: bytes | None):
        self.digest = digest

    @classmethod
    def from_env(cls) -> "ApiKey":
        key = os.environ.get(API_KEY_ENV, "")
        return cls(_digest(key) if key else None)

    @property
    def required(self) -> bool:
        return self.digest is not None

    def allows(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether the ASGI `headers` carry the key (always, when none is set)."""
        if self.digest is None:
            return True
        given = b""
        for name, value in headers:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif name == b"x-api-key":
                given = value.strip()
        return hmac.compare_digest(_digest(given), self.digest)


class ApiKeyMiddleware:
    """401 with a JSON reason for a request without the key, before its body is read."""

    def __init__(self, app, key: ApiKey):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key.required:
            return await self.app(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # served under a route prefix (a second app)
            path = path[len(root):] or "/"
        authorized = self.key.allows(scope.get("headers", []))
        scope.setdefault("state", {})["authorized"] = authorized
        if authorized or path in OPEN_PATHS or path in PUBLIC_WITHOUT_KEY:
            return await self.app(scope, receive, send)
        await JSONResponse({"error": f"missing or wrong API key: send 'Authorization: Bearer <key>' (the key "
                                     f"set in {API_KEY_ENV} where the app was started)"},
                           status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
