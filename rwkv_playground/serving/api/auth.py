"""The API key, as a FastAPI dependency of every /v1 route: `Authorization: Bearer <key>` when the
server has a key (--api-key or RWKV_PLAYGROUND_API_KEY), compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import ApiError


def require_api_key(request: Request) -> None:
    key = request.app.state.api_settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        raise ApiError(401, "You didn't provide an API key: send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")
    if not hmac.compare_digest(header[7:].strip().encode(), key.encode()):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
