"""The OpenAI-compatible HTTP API, served beside the UI on the same port (ui.serve mounts the
Gradio app on this FastAPI app):

    GET  /health               503 until a model is loaded, then 200 with its name
    GET  /metrics              Prometheus text format (metrics.py)
    GET  /v1/models            the loaded model
    POST /v1/completions       text completion (streaming: server-sent events ending in [DONE])
    POST /v1/chat/completions  chat in the loaded model's chat format; a conversation that extends
                               an earlier one starts from the state kept after it (completions.py)

Every request runs on the engine's scheduler, batched with the browser visitors' generations;
nothing model-related runs on the event loop. Errors are OpenAI-shaped objects
(`{"error": {"message", "type", "param", "code"}}`) with the matching status. Sampling follows
the OpenAI parameters (plus `top_k` and RWKV's `penalty_decay`); a field this server does not
implement is refused with its name, never silently ignored (README, "OpenAI-compatible API").
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from ..completions import (CompletionOptions, CompletionPlan, CompletionRun, PrefixCache, ServerBusy, chat_plan,
                          new_request_id, text_plan)
from ...errors import GenerationError, PlaygroundError
from ..metrics import CONTENT_TYPE, Metrics
from ...sampling import SamplingSettings

log = logging.getLogger(__name__)

API_KEY_ENV = "RWKV_PLAYGROUND_API_KEY"
CHAT_DEFAULT_MAX_TOKENS = 1024  # a chat reply normally ends at the turn separator well before this
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
MAX_STOP_SEQUENCES = 16
MAX_CHOICES = 16


@dataclass
class ApiSettings:
    enabled: bool = True
    api_key: str | None = None  # every /v1 route requires "Authorization: Bearer <key>" when set
    max_tokens: int = 8192  # the most tokens one choice may ask for
    max_prompt_tokens: int = 65536
    max_body_bytes: int = 8 << 20
    cache_entries: int = 64  # kept conversation states (also bounded by the memory budget)
    off_reason: str = ""  # why the API is off, said by every /v1 route


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


# ---- request bodies -------------------------------------------------------------------------------

class _Body(BaseModel):
    # strict: "0.5" is not a number, 1.0 is not an int; extra: an unknown field is an error
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    penalty_decay: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # accepted; they change no token: user / safety_identifier / prompt_cache_key scope the state
    # cache (requests share kept states only within one scope), the others are bookkeeping
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # accepted; the speaker names are the chat format's
    refusal: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=1)


# fields of the OpenAI API this server does not implement: refused with the reason
UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "parallel_tool_calls": "tool calling",
    "functions": "function calling", "function_call": "function calling", "audio": "audio output",
    "modalities": "output modalities other than text", "prediction": "predicted outputs",
    "web_search_options": "web search", "reasoning_effort": "reasoning effort settings",
    "suffix": "insertion (suffix)", "verbosity": "verbosity settings",
}


def _check_unsupported(body: dict) -> None:
    for name, what in UNSUPPORTED.items():
        if body.get(name) is not None:
            raise ApiError(400, f"'{name}' is not supported by this server ({what} is not implemented).", param=name,
                           code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported by this server "
                            "(structured output is not implemented).", param="response_format",
                       code="unsupported_parameter")
    for i, message in enumerate(body.get("messages") or []):
        if isinstance(message, dict):
            if message.get("role") in ("tool", "function"):
                raise ApiError(400, f"messages[{i}] has role '{message['role']}': tool messages are not supported "
                                    "(this server has no tool calling).", param=f"messages[{i}].role",
                               code="unsupported_parameter")
            for name in ("tool_calls", "function_call", "audio"):
                if message.get(name) is not None:
                    raise ApiError(400, f"messages[{i}].{name} is not supported by this server.",
                                   param=f"messages[{i}].{name}", code="unsupported_parameter")


def _validation_error(exc: ValidationError) -> ApiError:
    error = exc.errors()[0]
    loc = [str(p) for p in error["loc"] if not str(p).startswith(("function-", "list[", "str", "int"))]
    param = ".".join(loc) or None
    kind = error["type"]
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    return ApiError(400, f"Invalid value for '{param}': {error['msg']}.", param=param, code="invalid_value")


# ---- the app ----------------------------------------------------------------------------------------

def settings_from_env(settings: ApiSettings) -> ApiSettings:
    """The key from RWKV_PLAYGROUND_API_KEY when none was given (app.py, and any embedder)."""
    if settings.api_key is None and os.environ.get(API_KEY_ENV):
        settings.api_key = os.environ[API_KEY_ENV]
    return settings


def create_api_app(engine, settings: ApiSettings | None = None) -> FastAPI:
    """The FastAPI app with the API routes (rwkv_playground.server mounts the UI beside it)."""
    settings = settings_from_env(settings or ApiSettings())
    app = FastAPI(title="RWKV Playground API", docs_url="/v1/docs", openapi_url="/v1/openapi.json",
                  redoc_url=None)
    metrics = Metrics(engine)
    cache = engine.add_session(PrefixCache(settings.cache_entries))
    app.state.metrics, app.state.cache, app.state.api_settings = metrics, cache, settings

    @app.get("/health")
    async def health():
        loaded = engine.current
        if loaded is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": model_id(loaded)}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    if not settings.enabled:
        @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
        async def api_off(path: str):
            return ApiError(404, f"The API is off on this server: {settings.off_reason or 'started with --no-api'}.",
                            code="api_disabled").response()
        return app

    def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise ApiError(401, "You didn't provide an API key: send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        if not hmac.compare_digest(header[7:].strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def require_model(name: str | None = None):
        loaded = engine.current
        if loaded is None:
            raise ApiError(503, "No model is loaded yet: try again in a moment.", type="server_error",
                           code="model_not_loaded", headers={"Retry-After": "5"})
        if name is not None and name not in (loaded.name, Path(loaded.name).stem):
            raise ApiError(404, f"The model '{name}' does not exist: this server serves '{model_id(loaded)}' "
                                "(GET /v1/models).", param="model", code="model_not_found")
        return loaded

    async def read_body(request: Request, model: type[BaseModel]):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            raise ApiError(413, f"The request body is too large (at most {settings.max_body_bytes} bytes).",
                           code="request_too_large")
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > settings.max_body_bytes:
                raise ApiError(413, f"The request body is too large (at most {settings.max_body_bytes} bytes).",
                               code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "We could not parse the JSON body of your request: send valid JSON with "
                                "'Content-Type: application/json'.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        _check_unsupported(body)
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def endpoint(route: str):
        """Runs a handler with auth, OpenAI-shaped errors and the request counter."""
        def wrap(handler):
            async def run(request: Request):
                status = 500
                try:
                    authorize(request)
                    response = await handler(request)
                    status = response.status_code
                    return response
                except ApiError as exc:
                    status = exc.status
                    return exc.response()
                except ClientGone:
                    status = 499  # (nginx's "client closed request"; never sent)
                    return Response(status_code=499)
                except ServerBusy as exc:
                    status = 429
                    return ApiError(429, str(exc), type="rate_limit_error", code="server_busy",
                                    headers={"Retry-After": "2"}).response()
                except PlaygroundError as exc:
                    status = 400
                    return ApiError(400, str(exc)).response()
                except Exception as exc:  # never a traceback to the client
                    log.exception("API request failed")
                    return ApiError(500, f"The server failed on this request ({type(exc).__name__}).",
                                    type="server_error").response()
                finally:
                    metrics.api_requests.labels(route, str(status)).inc()
            run.__name__ = handler.__name__
            return run
        return wrap

    @app.get("/v1/models")
    @endpoint("models")
    async def list_models(request: Request):
        loaded = engine.current
        return JSONResponse({"object": "list", "data": [model_card(loaded)] if loaded is not None else []})

    @app.get("/v1/models/{name}")
    @endpoint("models")
    async def get_model(request: Request):
        return JSONResponse(model_card(require_model(request.path_params["name"])))

    @app.post("/v1/chat/completions")
    @endpoint("chat")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatRequest)
        loaded = require_model(req.model)
        options = _options(req, loaded, settings, CHAT_DEFAULT_MAX_TOKENS, req.max_completion_tokens or req.max_tokens)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs")
        options.logprobs = (req.top_logprobs or 0) if req.logprobs else None
        messages = [(m.role, _message_text(m, i)) for i, m in enumerate(req.messages)]
        plan = await run_in_threadpool(partial(chat_plan, loaded, messages, options))
        return await _respond(request, req, plan, loaded, chat=True)

    @app.post("/v1/completions")
    @endpoint("completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest)
        loaded = require_model(req.model)
        options = _options(req, loaded, settings, COMPLETION_DEFAULT_MAX_TOKENS, req.max_tokens)
        options.logprobs = req.logprobs
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"Send one prompt per request (got {len(prompt)}): the server batches "
                                    "concurrent requests itself.", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "The prompt is empty: there is nothing to continue.", param="prompt")
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo together with logprobs (the prompt's log-probabilities) is not supported.",
                           param="echo", code="unsupported_parameter")
        plan = await run_in_threadpool(partial(text_plan, loaded, prompt, options))
        return await _respond(request, req, plan, loaded, chat=False)

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    @endpoint("unknown")
    async def unknown_route(request: Request):
        raise ApiError(404, f"Unknown request URL: {request.method} {request.url.path}. This server serves "
                            "/v1/models, /v1/completions and /v1/chat/completions.", code="unknown_url")

    async def _respond(request: Request, req, plan: CompletionPlan, loaded, chat: bool):
        if len(plan.prompt_tokens) > settings.max_prompt_tokens:
            raise ApiError(400, f"The prompt has {len(plan.prompt_tokens)} tokens; this server reads at most "
                                f"{settings.max_prompt_tokens} per request.", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true.", param="stream_options")
        run = CompletionRun(engine, cache, plan)
        await run.start()
        meta = {"id": new_request_id("chatcmpl" if chat else "cmpl"), "created": int(time.time()),
                "model": model_id(loaded), "system_fingerprint": f"fp_{loaded.runtime.fingerprint[:12]}"}
        echo = (loaded.tokenizer.decode(plan.prompt_tokens) if (not chat and req.echo) else "")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _RunStream(run, _stream(run, meta, chat, include_usage, echo, loaded.tokenizer),
                              media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await _drain(run, request)
        return JSONResponse(_full_response(run, meta, chat, echo, loaded.tokenizer))

    return app


class _RunStream(StreamingResponse):
    """A streaming answer that ends its run however the response ends: also when the client
    went away before the first byte (Starlette then never starts the body iterator)."""

    def __init__(self, run: CompletionRun, content, **options):
        super().__init__(content, **options)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()


def model_id(loaded) -> str:
    return Path(loaded.name).stem


def model_card(loaded) -> dict:
    info = loaded.describe()
    return {"id": model_id(loaded), "object": "model", "created": 0, "owned_by": "rwkv-playground",
            "architecture": info.get("architecture"), "parameters": info.get("parameters"),
            "dtype": info.get("dtype"), "device": info.get("device")}


def _message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{index}].content: only text parts are supported (got a "
                                f"'{part.get('type')}' part).", param=f"messages[{index}].content",
                           code="unsupported_content")
        texts.append(part["text"])
    return "\n".join(texts)


def _options(req: _Sampling, loaded, settings: ApiSettings, default_max: int, max_tokens: int | None) -> CompletionOptions:
    max_tokens = default_max if max_tokens is None else max_tokens
    if max_tokens > settings.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server generates at most {settings.max_tokens} "
                            "tokens per choice.", param="max_tokens", code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise ApiError(400, f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings.", param="stop")
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= loaded.runtime.config.vocab_size:
            raise ApiError(400, f"logit_bias key '{key}' is not a token id of this model "
                                f"(0 to {loaded.runtime.config.vocab_size - 1}).", param="logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias values must be between -100 and 100 (got {value}).", param="logit_bias")
        bias[int(key)] = float(value)
    seed = None if req.seed is None else req.seed % (1 << 64)
    settings_ = SamplingSettings(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        presence_penalty=req.presence_penalty or 0.0,
        count_penalty=req.frequency_penalty or 0.0,
        penalty_decay=1.0 if req.penalty_decay is None else req.penalty_decay,
        seed=seed)
    scope = "\0".join(s or "" for s in (req.user, req.safety_identifier, req.prompt_cache_key))
    return CompletionOptions(max_tokens=max_tokens, settings=settings_, stop=tuple(stop), n=req.n or 1,
                             logit_bias=bias, scope=scope)


async def _drain(run: CompletionRun, request: Request) -> None:
    """Run a non-streaming request to its end; a client that goes away ends it within a tick."""
    async def consume():
        async for _ in run.events():
            pass

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                try:
                    task.result()
                except GenerationError as exc:  # it failed while running: the server's fault, not the input's
                    raise ApiError(500, str(exc), type="server_error") from None
                return
            if await request.is_disconnected():
                task.cancel()
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
        run.cancel()


def _usage(run: CompletionRun) -> dict:
    u = run.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    raw = tokenizer.decode_bytes([token])
    return raw.decode("utf-8", errors="replace"), list(raw)


def _chat_logprobs(entries, tokenizer) -> dict:
    content = []
    for token, logprob, top in entries:
        text, raw = _token_text(tokenizer, token)
        content.append({"token": text, "logprob": max(logprob, -9999.0), "bytes": raw, "top_logprobs": [
            dict(zip(("token", "bytes"), _token_text(tokenizer, t)), logprob=max(lp, -9999.0)) for t, lp in top]})
    return {"content": content, "refusal": None}


def _text_logprobs(entries, tokenizer, offset: int) -> dict:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token, logprob, top in entries:
        text, _ = _token_text(tokenizer, token)
        tokens.append(text)
        token_logprobs.append(max(logprob, -9999.0))
        top_logprobs.append({_token_text(tokenizer, t)[0]: max(lp, -9999.0) for t, lp in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _full_response(run: CompletionRun, meta: dict, chat: bool, echo: str, tokenizer) -> dict:
    want_logprobs = run.plan.options.logprobs is not None
    choices = []
    for c in run.choices:
        if chat:
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text.strip(),
                                                          "refusal": None},
                            "logprobs": _chat_logprobs(c.logprobs, tokenizer) if want_logprobs else None,
                            "finish_reason": c.finish_reason})
        else:
            choices.append({"index": c.index, "text": echo + c.text, "finish_reason": c.finish_reason,
                            "logprobs": _text_logprobs(c.logprobs, tokenizer, len(echo)) if want_logprobs else None})
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": _usage(run)}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(run: CompletionRun, meta: dict, chat: bool, include_usage: bool, echo: str, tokenizer):
    """Server-sent events in OpenAI's chunk format, ending in `data: [DONE]`."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    want_logprobs = run.plan.options.logprobs is not None
    usage = {"usage": None} if include_usage else {}
    offsets = [len(echo)] * len(run.choices)
    # a chat reply is shown without its leading space (as the Chat tab shows it)
    started = [False] * len(run.choices)

    def chunk(index: int, piece: str | None, entries, finish: str | None) -> str:
        if chat:
            delta = {} if piece is None else {"content": piece}
            if not started[index]:
                delta = {"role": "assistant", **delta}
                started[index] = True
            choice = {"index": index, "delta": delta,
                      "logprobs": _chat_logprobs(entries, tokenizer) if want_logprobs and entries else None,
                      "finish_reason": finish}
        else:
            choice = {"index": index, "text": piece or "", "finish_reason": finish,
                      "logprobs": _text_logprobs(entries, tokenizer, offsets[index]) if want_logprobs else None}
            offsets[index] += len(piece or "")
        return _sse({**meta, "object": obj, "choices": [choice], **usage})

    try:
        for c in run.choices:
            yield chunk(c.index, "" if chat else echo, [], None)
        received = [""] * len(run.choices)
        async for event in run.events():
            if event[0] == "text":
                _, index, piece, entries = event
                if chat:
                    before = received[index]
                    received[index] += piece
                    piece = received[index].lstrip() if not before.strip() else piece
                    if not piece:
                        continue
                yield chunk(index, piece, entries, None)
            else:
                _, index, finish, entries = event
                yield chunk(index, None, entries, finish)
        if include_usage:
            yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(run)})
    except GenerationError as exc:
        yield _sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
    yield "data: [DONE]\n\n"
