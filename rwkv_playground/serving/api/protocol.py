"""The OpenAI wire format: request bodies (pydantic, strict: "0.5" is not a number, an unknown field
is an error), the fields this server refuses, and the response objects and stream chunks of the
two completion kinds (`ChatKind`, `TextKind`)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ApiError

MAX_CHOICES = 16


class _Body(BaseModel):
    # strict: "0.5" is not a number, 1.0 is not an int; extra: an unknown field is an error
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None


class SamplingRequest(_Body):
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


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingRequest):
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


def check_unsupported(body: dict) -> None:
    """A field of the OpenAI API this server does not implement is refused with its name, never ignored."""
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


def validation_error(exc: ValidationError) -> ApiError:
    """The first problem pydantic found, as OpenAI words it."""
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


# ---- responses ----------------------------------------------------------------------------------------

def usage(run) -> dict:
    u = run.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    raw = tokenizer.decode_bytes([token])
    return raw.decode("utf-8", errors="replace"), list(raw)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class ChatKind:
    """/v1/chat/completions: message objects, deltas, logprobs per token with their bytes. A reply
    is sent without its leading space, as the Chat tab shows it."""

    id_prefix, object, stream_object, prompt_param = "chatcmpl", "chat.completion", "chat.completion.chunk", "messages"

    def __init__(self, tokenizer, n_choices: int, want_logprobs: bool, echo: str = ""):
        self.tokenizer, self.want_logprobs = tokenizer, want_logprobs
        self.started = [False] * n_choices
        self.received = [""] * n_choices

    def logprobs(self, entries) -> dict:
        content = []
        for token, logprob, top in entries:
            text, raw = token_text(self.tokenizer, token)
            content.append({"token": text, "logprob": max(logprob, -9999.0), "bytes": raw, "top_logprobs": [
                dict(zip(("token", "bytes"), token_text(self.tokenizer, t)), logprob=max(lp, -9999.0))
                for t, lp in top]})
        return {"content": content, "refusal": None}

    def choice(self, c) -> dict:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text.strip(), "refusal": None},
                "logprobs": self.logprobs(c.logprobs) if self.want_logprobs else None,
                "finish_reason": c.finish_reason}

    def first_piece(self, index: int) -> str:
        return ""

    def piece(self, index: int, text: str) -> str | None:
        """The part of newly released text to send (None: nothing yet; a reply's leading space is
        held back)."""
        before = self.received[index]
        self.received[index] += text
        piece = self.received[index].lstrip() if not before.strip() else text
        return piece or None

    def chunk_choice(self, index: int, piece: str | None, entries, finish: str | None) -> dict:
        delta = {} if piece is None else {"content": piece}
        if not self.started[index]:
            delta = {"role": "assistant", **delta}
            self.started[index] = True
        return {"index": index, "delta": delta,
                "logprobs": self.logprobs(entries) if self.want_logprobs and entries else None,
                "finish_reason": finish}


class TextKind:
    """/v1/completions: text choices, the prompt echoed on request, logprobs with text offsets."""

    id_prefix, object, stream_object, prompt_param = "cmpl", "text_completion", "text_completion", "prompt"

    def __init__(self, tokenizer, n_choices: int, want_logprobs: bool, echo: str = ""):
        self.tokenizer, self.want_logprobs, self.echo = tokenizer, want_logprobs, echo
        self.offsets = [len(echo)] * n_choices

    def logprobs(self, entries, offset: int) -> dict:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token, logprob, top in entries:
            text, _ = token_text(self.tokenizer, token)
            tokens.append(text)
            token_logprobs.append(max(logprob, -9999.0))
            top_logprobs.append({token_text(self.tokenizer, t)[0]: max(lp, -9999.0) for t, lp in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def choice(self, c) -> dict:
        return {"index": c.index, "text": self.echo + c.text, "finish_reason": c.finish_reason,
                "logprobs": self.logprobs(c.logprobs, len(self.echo)) if self.want_logprobs else None}

    def first_piece(self, index: int) -> str:
        return self.echo

    def piece(self, index: int, text: str) -> str:
        return text

    def chunk_choice(self, index: int, piece: str | None, entries, finish: str | None) -> dict:
        choice = {"index": index, "text": piece or "", "finish_reason": finish,
                  "logprobs": self.logprobs(entries, self.offsets[index]) if self.want_logprobs else None}
        self.offsets[index] += len(piece or "")
        return choice


def full_response(run, meta: dict, kind) -> dict:
    return {**meta, "object": kind.object, "choices": [kind.choice(c) for c in run.choices], "usage": usage(run)}
