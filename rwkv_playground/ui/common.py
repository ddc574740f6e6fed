"""What the tabs share: the sampling controls as one component (`SamplingControls` -> `Sampling`),
control groups handed to handlers as one object (`wire`), per-visitor session state, the one
streaming helper, readable errors and statistics lines."""

from __future__ import annotations

import inspect
import logging
import re
import time
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Callable, Iterator

import gradio as gr

from ..errors import GenerationError, PlaygroundError
from ..sampling import SamplingSettings
from ..serving.sessions import Session, forget_session

log = logging.getLogger("rwkv_playground.ui")
MAX_TOKENS_CAP = 8192  # per request from the browser; the engine's own limit is higher
UPDATES_PER_SECOND = 20  # the browser needs no more


def parse_id_list(spec: str, what: str, example: str = "0-3") -> list[int]:
    """'0-31', '3, 9, 12' or '5' -> the ids in the order written, each once (a range either way
    round); anything else is one sentence naming `what` (the caller keeps the ids it can use)."""
    out: list[int] = []
    for part in re.split(r"[,\s]+", (spec or "").strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise GenerationError(f"{what}: '{part}' is not a number or a range like {example}.")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        out.extend(range(min(a, b), max(a, b) + 1))
    return list(dict.fromkeys(out))


def session_state(engine) -> gr.State:
    """A visitor's session object: made when their page opens (or at their first API call),
    freed when the tab closes (unload), after the session lifetime of inactivity, and piecewise
    by the memory budget."""
    # delete_callback: a plain function (Gradio copies it into every page config, deeply)
    return gr.State(None, time_to_live=engine.settings.session_ttl_s, delete_callback=forget_session)


def ensure_session(engine, session: Session | None, factory: Callable[[], Session],
                   request: gr.Request | None = None, key=None) -> Session:
    """The visitor's session (made at their first call if their page did not make it), known
    under their id so that their leaving (tab closed, API client closed) frees it at once. With
    the visitor's `key` (the browser's storage): a process that never saw their page (another
    one served it and died) takes over their saved work, as it was after their last finished turn."""
    if session is None:
        session = engine.add_session(factory())
        visitor = engine.known_visitor(key)
        if visitor is not None:
            session.visitor = visitor
            if session.open_newest(engine.current):
                session.notices.append("This server process took over your session: your work is as it was after "
                                       "your last finished reply.")
    session.update_interval = 1.0 / UPDATES_PER_SECOND
    if request is not None:
        engine.join_visit(request.session_hash, session)
    return session


@dataclass(frozen=True)
class Sampling:
    """The sampling controls' values, as one object a handler receives (`SamplingControls`)."""
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = 0
    presence_penalty: float = 0.4
    count_penalty: float = 0.4
    penalty_decay: float = 0.996
    max_tokens: int = 300
    seed: int = -1

    def settings(self) -> tuple[SamplingSettings, int]:
        """(SamplingSettings, max_tokens capped for the browser); GenerationError if out of range."""
        settings = SamplingSettings(temperature=float(self.temperature), top_p=float(self.top_p),
                                    top_k=int(self.top_k), presence_penalty=float(self.presence_penalty),
                                    count_penalty=float(self.count_penalty), penalty_decay=float(self.penalty_decay),
                                    seed=None if self.seed is None or int(self.seed) < 0 else int(self.seed))
        settings.validate()
        max_tokens = max(1, min(int(self.max_tokens or 1), MAX_TOKENS_CAP))  # the browser's value is only a wish
        return settings, max_tokens

    def values(self) -> dict:
        """By name (kept with a document, shown again when it opens)."""
        return {name: getattr(self, name) for name in SAMPLING_NAMES}


SAMPLING_NAMES = tuple(f.name for f in fields(Sampling))


class ControlGroup:
    """Several components a handler receives as one object: `read(values)` builds it from the
    components' values in order (Gradio hands an event one value per component)."""

    def __init__(self, components: list, read: Callable):
        self.components, self.read = list(components), read
        # the names (and defaults) the API gives the components' values (gradio_client's parameters)
        if is_dataclass(read):
            own = [(f.name, inspect.Parameter.empty if f.default is MISSING else f.default) for f in fields(read)]
        else:
            own = [(p.name, p.default) for p in inspect.signature(read).parameters.values()]
        self.parameters = own[:len(self.components)]

    def __iter__(self):
        return iter(self.components)

    def __len__(self) -> int:
        return len(self.components)


class SamplingControls(ControlGroup):
    """A tab's sampling controls as one component: their Gradio components (in an accordion) and
    the `Sampling` their values make."""

    def __init__(self, prefix: str, temperature=1.0, top_p=0.7, presence=0.4, count=0.4, decay=0.996,
                 max_tokens=300, max_tokens_cap=MAX_TOKENS_CAP):
        with gr.Accordion("Sampling", open=False, elem_id=f"{prefix}-sampling"):
            with gr.Row():
                t = gr.Slider(0.0, 3.0, value=temperature, step=0.05, label="Temperature",
                              info="0 = always the most likely token", elem_id=f"{prefix}-temperature")
                p = gr.Slider(0.0, 1.0, value=top_p, step=0.01, label="Top-p", elem_id=f"{prefix}-top-p")
                k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)", elem_id=f"{prefix}-top-k")
            with gr.Row():
                pres = gr.Slider(0.0, 2.0, value=presence, step=0.05, label="Presence penalty",
                                 elem_id=f"{prefix}-presence")
                cnt = gr.Slider(0.0, 2.0, value=count, step=0.05, label="Count penalty", elem_id=f"{prefix}-count")
                dec = gr.Slider(0.9, 1.0, value=decay, step=0.001, label="Penalty decay", elem_id=f"{prefix}-decay")
            with gr.Row():
                mx = gr.Number(value=max_tokens, precision=0, minimum=1, maximum=max_tokens_cap, label="Max tokens",
                               elem_id=f"{prefix}-max-tokens")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id=f"{prefix}-seed")
        super().__init__([t, p, k, pres, cnt, dec, mx, seed], Sampling)

    @staticmethod
    def update(controls: dict) -> list:
        """Updates of the controls to a document's kept values (unchanged where it has none)."""
        return [controls[name] if name in controls else gr.skip() for name in SAMPLING_NAMES]


def wire(handler: Callable, *inputs) -> tuple[Callable, list]:
    """(fn, components) for a Gradio event: `inputs` are components (one value each) or
    ControlGroups, each handed to `handler` as one object; a `request: gr.Request` parameter of the
    handler is given as Gradio gives it. Usage: `button.click(*wire(tab.on_send, message, sampling), outputs)`."""
    handler_params = [p for name, p in inspect.signature(handler).parameters.items() if name != "request"]
    components, spans, params = [], [], []
    for item, own in zip(inputs, handler_params):
        if isinstance(item, ControlGroup):
            spans.append((len(components), len(item), item.read))
            components.extend(item.components)
            params += item.parameters
        else:
            spans.append((len(components), 1, None))
            components.append(item)
            params.append((own.name, own.default))
    wants_request = "request" in inspect.signature(handler).parameters

    def pack(args, kwargs):
        """The handler's arguments from the flat values (defaults where a caller gave none)."""
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = list(bound.arguments.values())
        packed = [read(*values[i:i + n]) if read else values[i] for i, n, read in spans]
        return packed, ({"request": bound.arguments["request"]} if wants_request else {})

    if inspect.isgeneratorfunction(handler):
        def fn(*args, **kwargs):
            packed, extra = pack(args, kwargs)
            yield from handler(*packed, **extra)
    else:
        def fn(*args, **kwargs):
            packed, extra = pack(args, kwargs)
            return handler(*packed, **extra)
    # Gradio reads the signature: one positional parameter per component (its name and default are
    # the API's), then the request
    last_required = max((i for i, (_, d) in enumerate(params) if d is inspect.Parameter.empty), default=-1)
    params = [(n, inspect.Parameter.empty if i < last_required else d) for i, (n, d) in enumerate(params)]
    parameters, seen = [], set()
    for name, default in params:
        name = name if name not in seen else f"{name}_{len(seen)}"
        seen.add(name)
        parameters.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    parameters.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                        annotation=gr.Request))
    signature = inspect.Signature(parameters)
    fn.__signature__ = signature
    fn.__annotations__ = {"request": gr.Request}
    fn.__name__ = getattr(handler, "__name__", "handler")
    return fn, components


def friendly_error(exc: BaseException) -> str:
    """One readable line for the UI; the traceback goes to the server log only."""
    if isinstance(exc, PlaygroundError):
        return f"⚠ {exc}"
    log.exception("Unexpected error in a UI handler", exc_info=exc)
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"⚠ Something went wrong ({type(exc).__name__}{': ' + first if first else ''}). Details are in the server log."


def stats_notes(stats: dict) -> list[str]:
    """What was unusual about a run: where its state came from, a cut, history read again (and why)."""
    notes = []
    if stats.get("state_from_store"):
        notes.append("the state read back from your saved work")
    if stats.get("interrupted"):
        notes.append("interrupted (the server stopped)")
    if stats.get("history_reread"):
        why = ("the conversation was written with another model" if stats.get("history_reread_why") == "model changed"
               else "the saved state had been dropped")
        notes.append(f"{stats['history_reread']} history tokens re-read ({why})")
    return notes


def stats_line(stats: dict) -> str:
    if not stats:
        return ""
    parts = []
    if "prompt_tokens" in stats:
        read = f"{stats['prompt_tokens']} prompt tokens read"
        if stats["prompt_tokens"] > 1 and stats.get("prompt_tokens_per_second"):
            read += f" ({stats['prompt_tokens_per_second']:.0f} tok/s)"
        parts.append(read)
    if "generated_tokens" in stats:
        parts.append(f"{stats['generated_tokens']} generated")
    if stats.get("streams", 1) > 1:  # a post written by outline: the sums of all its streams
        parts.append(f"the outline and {stats['streams'] - 1} section{'s' if stats['streams'] > 2 else ''}")
    if stats.get("tokens_per_second"):
        parts.append(f"{stats['tokens_per_second']:.1f} tok/s")
    if stats.get("tokens_saved"):
        parts.append(f"{stats['tokens_saved']} history tokens reused from the state (not re-read)")
    parts += stats_notes(stats)
    if stats.get("stop_reason") in ("cancelled", "closed"):
        parts.append("stopped")
    return " · ".join(parts)


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def live_status(session: Session) -> str:
    """What a running request of this session is doing, in a few words."""
    if session.waiting:
        return f"Waiting for the model: {ordinal(session.waiting)} in the queue…"
    live = session.live
    if live is None:
        return "Working…"
    if live.prompt_state is None:
        return f"Reading the prompt… {live.prompt_read} of {len(live.prompt_tokens)} tokens"
    return f"Generating… {live.stats.generated_tokens} tokens · {live.stats.tokens_per_second:.1f} tok/s"


def with_notices(session: Session, status: str) -> str:
    """The status line, after anything the visitor must be told (e.g. what the server dropped)."""
    notices = session.take_notices()
    return " ".join(f"ℹ {n}" for n in notices) + (" · " if notices and status else "") + status


def stream(session: Session, make_stream: Callable[[], Iterator], render: Callable[[str, bool], tuple],
           final_status: Callable[[], str]) -> Iterator[tuple]:
    """Drive a session's stream for the browser (the one streaming helper of the tabs): yields
    render(status, False) at most UPDATES_PER_SECOND times a second while it runs, then
    render(final_status(), True); any error becomes one status line, never a traceback."""
    last = 0.0
    try:
        for _ in make_stream():
            now = time.perf_counter()
            if now - last >= 1.0 / UPDATES_PER_SECOND:
                last = now
                yield render(live_status(session), False)
        yield render(with_notices(session, final_status()), True)
    except Exception as exc:
        yield render(with_notices(session, friendly_error(exc)), True)
