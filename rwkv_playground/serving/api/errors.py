"""Every failure of an API request as the OpenAI-shaped error object
(`{"error": {"message", "type", "param", "code"}}`) with its status: one mapper, registered on the app
for every exception."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ...errors import PlaygroundError
from ..completions import ServerBusy

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client closed the connection before its answer was ready (nobody reads the reply)."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status, headers=self.headers)

    def body(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


def error_response(exc: Exception) -> Response:
    """The response for an exception a route raised (never a traceback to the client)."""
    if isinstance(exc, ApiError):
        return exc.response()
    if isinstance(exc, ClientGone):
        return Response(status_code=499)  # (nginx's "client closed request"; nobody reads it)
    if isinstance(exc, ServerBusy):
        return ApiError(429, str(exc), type="rate_limit_error", code="server_busy",
                        headers={"Retry-After": "2"}).response()
    if isinstance(exc, PlaygroundError):
        return ApiError(400, str(exc)).response()
    log.error("API request failed", exc_info=exc)
    return ApiError(500, f"The server failed on this request ({type(exc).__name__}).", type="server_error").response()


def install_error_mapper(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    for kind in (ApiError, ClientGone, ServerBusy, PlaygroundError, Exception):
        app.add_exception_handler(kind, handle)
