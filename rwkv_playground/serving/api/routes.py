"""The /v1 routes on an APIRouter. Every request runs on the engine's scheduler, batched with the
browser visitors' generations; nothing model-related runs on the event loop (tokenizing runs in a
worker thread). The app's state holds what the routes share: the engine, the settings, the prefix
cache of kept conversation states."""

from __future__ import annotations

import asyncio
import json
import time
from functools import partial
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from ...errors import GenerationError
from ...sampling import SamplingSettings
from ..completions import CompletionOptions, CompletionPlan, CompletionRun, chat_plan, new_request_id, text_plan
from .auth import require_api_key
from .errors import ApiError, ClientGone
from .protocol import (ChatKind, ChatMessage, ChatRequest, CompletionRequest, SamplingRequest, TextKind,
                       check_unsupported, full_response, sse, usage, validation_error)

CHAT_DEFAULT_MAX_TOKENS = 1024  # a chat reply normally ends at the turn separator well before this
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
MAX_STOP_SEQUENCES = 16

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def model_id(loaded) -> str:
    return Path(loaded.name).stem


def model_card(loaded) -> dict:
    info = loaded.describe()
    return {"id": model_id(loaded), "object": "model", "created": 0, "owned_by": "rwkv-playground",
            "architecture": info.get("architecture"), "parameters": info.get("parameters"),
            "dtype": info.get("dtype"), "device": info.get("device")}


def require_model(engine, name: str | None = None):
    loaded = engine.current
    if loaded is None:
        raise ApiError(503, "No model is loaded yet: try again in a moment.", type="server_error",
                       code="model_not_loaded", headers={"Retry-After": "5"})
    if name is not None and name not in (loaded.name, Path(loaded.name).stem):
        raise ApiError(404, f"The model '{name}' does not exist: this server serves '{model_id(loaded)}' "
                            "(GET /v1/models).", param="model", code="model_not_found")
    return loaded


async def read_body(request: Request, model: type[BaseModel]):
    """The JSON body, size-limited while it arrives, checked for refused fields, then validated."""
    limit = request.app.state.api_settings.max_body_bytes
    too_large = ApiError(413, f"The request body is too large (at most {limit} bytes).", code="request_too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > limit:
            raise too_large
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "We could not parse the JSON body of your request: send valid JSON with "
                            "'Content-Type: application/json'.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    check_unsupported(body)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


@router.get("/models")
async def list_models(request: Request):
    loaded = request.app.state.engine.current
    return JSONResponse({"object": "list", "data": [model_card(loaded)] if loaded is not None else []})


@router.get("/models/{name}")
async def get_model(name: str, request: Request):
    return JSONResponse(model_card(require_model(request.app.state.engine, name)))


@router.post("/chat/completions")
async def chat_completions(request: Request):
    req = await read_body(request, ChatRequest)
    loaded = require_model(request.app.state.engine, req.model)
    options = sampling_options(req, loaded, request.app.state.api_settings, CHAT_DEFAULT_MAX_TOKENS,
                               req.max_completion_tokens or req.max_tokens)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs")
    options.logprobs = (req.top_logprobs or 0) if req.logprobs else None
    messages = [(m.role, message_text(m, i)) for i, m in enumerate(req.messages)]
    plan = await run_in_threadpool(partial(chat_plan, loaded, messages, options))
    kind = ChatKind(loaded.tokenizer, options.n, options.logprobs is not None)
    return await respond(request, req, plan, loaded, kind)


@router.post("/completions")
async def completions(request: Request):
    req = await read_body(request, CompletionRequest)
    loaded = require_model(request.app.state.engine, req.model)
    options = sampling_options(req, loaded, request.app.state.api_settings, COMPLETION_DEFAULT_MAX_TOKENS,
                               req.max_tokens)
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
    echo = loaded.tokenizer.decode(plan.prompt_tokens) if req.echo else ""
    kind = TextKind(loaded.tokenizer, options.n, options.logprobs is not None, echo)
    return await respond(request, req, plan, loaded, kind)


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
async def unknown_route(path: str, request: Request):
    raise ApiError(404, f"Unknown request URL: {request.method} {request.url.path}. This server serves "
                        "/v1/models, /v1/completions and /v1/chat/completions.", code="unknown_url")


async def respond(request: Request, req, plan: CompletionPlan, loaded, kind):
    """Start the run on the scheduler, then stream it as server-sent events or answer at its end."""
    state = request.app.state
    limit = state.api_settings.max_prompt_tokens
    if len(plan.prompt_tokens) > limit:
        raise ApiError(400, f"The prompt has {len(plan.prompt_tokens)} tokens; this server reads at most {limit} "
                            "per request.", param=kind.prompt_param, code="context_length_exceeded")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true.", param="stream_options")
    run = CompletionRun(state.engine, state.cache, plan)
    await run.start()
    meta = {"id": new_request_id(kind.id_prefix), "created": int(time.time()), "model": model_id(loaded),
            "system_fingerprint": f"fp_{loaded.runtime.fingerprint[:12]}"}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return RunStream(run, stream(run, meta, kind, include_usage), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await drain(run, request)
    return JSONResponse(full_response(run, meta, kind))


class RunStream(StreamingResponse):
    """A streaming answer that ends its run however the response ends: also when the client went
    away before the first byte (Starlette then never starts the body iterator)."""

    def __init__(self, run: CompletionRun, content, **options):
        super().__init__(content, **options)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (its body has been read: the next message the
    server gives is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def drain(run: CompletionRun, request: Request) -> None:
    """Run a non-streaming request to its end, raced against the client: a client that goes away
    ends its run within a tick."""
    async def consume():
        async for _ in run.events():
            pass

    work = asyncio.ensure_future(consume())
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ClientGone()
        try:
            work.result()
        except GenerationError as exc:  # it failed while running: the server's fault, not the input's
            raise ApiError(500, str(exc), type="server_error") from None
    finally:
        for task in (work, gone):
            if not task.done():
                task.cancel()
        run.cancel()


async def stream(run: CompletionRun, meta: dict, kind, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending in `data: [DONE]`."""
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, piece: str | None, entries, finish: str | None) -> str:
        return sse({**meta, "object": kind.stream_object, "choices": [kind.chunk_choice(index, piece, entries, finish)],
                    **extra})

    try:
        for c in run.choices:
            yield chunk(c.index, kind.first_piece(c.index), [], None)
        async for event in run.events():
            if event.kind == "text":
                piece = kind.piece(event.index, event.text)
                if piece is not None:
                    yield chunk(event.index, piece, event.logprobs, None)
            else:
                yield chunk(event.index, None, event.logprobs, event.finish_reason)
        if include_usage:
            yield sse({**meta, "object": kind.stream_object, "choices": [], "usage": usage(run)})
    except GenerationError as exc:
        yield sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
    yield "data: [DONE]\n\n"


def message_text(message: ChatMessage, index: int) -> str:
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


def sampling_options(req: SamplingRequest, loaded, settings, default_max: int,
                     max_tokens: int | None) -> CompletionOptions:
    max_tokens = default_max if max_tokens is None else max_tokens
    if max_tokens > settings.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server generates at most {settings.max_tokens} "
                            "tokens per choice.", param="max_tokens", code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise ApiError(400, f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings.", param="stop")
    vocab = loaded.runtime.config.vocab_size
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab:
            raise ApiError(400, f"logit_bias key '{key}' is not a token id of this model (0 to {vocab - 1}).",
                           param="logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias values must be between -100 and 100 (got {value}).", param="logit_bias")
        bias[int(key)] = float(value)
    seed = None if req.seed is None else req.seed % (1 << 64)
    sampling = SamplingSettings(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        presence_penalty=req.presence_penalty or 0.0,
        count_penalty=req.frequency_penalty or 0.0,
        penalty_decay=1.0 if req.penalty_decay is None else req.penalty_decay,
        seed=seed)
    scope = "\0".join(s or "" for s in (req.user, req.safety_identifier, req.prompt_cache_key))
    return CompletionOptions(max_tokens=max_tokens, settings=sampling, stop=tuple(stop), n=req.n or 1,
                             logit_bias=bias, scope=scope)
