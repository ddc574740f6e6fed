"""Chat on a recurrent state: formats, ChatRWKV's newline bias, turn bookkeeping.

Each turn keeps the state after the user's message (Regenerate starts there) and after the
reply (the next turn starts there), so a turn reads only its own new tokens; "tokens saved" is
the length of the history the state already holds. Only the last `undo_depth` turns keep their
states, and the server's memory budget may drop them from an idle chat: then the next turn
re-reads the conversation's tokens once (and says so) instead of failing.

Everything that runs the model goes through the engine's scheduler; a session never touches it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import GenerationError
from .generation import Generation
from .sampling import SamplingSettings
from .serving.sessions import Session, follow_generation
from .state import State
from .serving.store import Document, RunningDigest, StoreError, tokens_digest

from .chat_format import (PRESETS, REPLY_END, ChatFormat, default_preset, fold_message,  # noqa: F401  (re-exported)
                          model_chat_format, newline_bias, reply_logits_hook, reply_stops)


@dataclass
class Turn:
    user: str
    reply: str = ""
    prompt_tokens: list[int] = field(default_factory=list)  # the turn's prompt as read
    reply_tokens: list[int] = field(default_factory=list)  # as the state holds them
    stats: dict = field(default_factory=dict)
    # Kept states (None once dropped; rebuilt by re-reading the tokens when needed)
    state_prompt: State | None = None  # after the user's message: Regenerate starts here
    logits_prompt: torch.Tensor | None = None
    state_after: State | None = None  # after the reply: the next turn starts here
    logits_after: torch.Tensor | None = None
    complete: bool = False
    reply_raw: str = ""  # the reply as the model wrote it (`reply` is it as shown)
    interrupted: bool = False  # cut by a server crash: the text shown then, no state of its own
    restored: bool = False  # state_after was read back from the session store

    def as_dict(self) -> dict:
        return {"user": self.user, "reply": self.reply, "reply_raw": self.reply_raw,
                "prompt_tokens": list(self.prompt_tokens), "reply_tokens": list(self.reply_tokens),
                "stats": dict(self.stats), "complete": self.complete, "interrupted": self.interrupted}

    def tokens(self) -> list[int]:
        return self.prompt_tokens + self.reply_tokens

    def kept_bytes(self) -> int:
        return sum(s.nbytes() for s in (self.state_prompt, self.state_after) if s is not None) + sum(
            t.numel() * t.element_size() for t in (self.logits_prompt, self.logits_after) if t is not None)

    def drop_states(self) -> None:
        self.state_prompt = self.logits_prompt = self.state_after = self.logits_after = None
        self.restored = False


@dataclass(eq=False)
class QueuedMessage:
    """A message waiting for the reply before it (identity matters: two may hold the same text)."""

    text: str
    sending: bool = False  # its turn has started: shown as a turn, no longer as queued


class ChatSession(Session):
    """One browser session's conversation and recurrent states."""

    kind = "chat"

    def __init__(self, fmt: ChatFormat | None = None, undo_depth: int = 8):
        super().__init__()
        self.fmt = fmt or ChatFormat()
        self.turns: list[Turn] = []
        self.model_fingerprint = ""
        self.undo_depth = max(1, int(undo_depth))
        self.controls: dict = {}  # the sampling controls' values last used (kept with the conversation)
        # messages sent while a reply was being written, in order: each is sent when the one before
        # it has its reply (the Chat tab's queue; not saved: a reload or Stop hands them back)
        self.queued_messages: list[QueuedMessage] = []

    def configure(self, settings) -> None:
        self.undo_depth = max(1, int(settings.undo_depth))

    @property
    def state(self) -> State | None:
        return self.turns[-1].state_after if self.turns else None

    def clear(self) -> None:
        self._check_idle()
        self.turns.clear()
        self.persist()

    def undo(self) -> str | None:
        """Drop the last turn; returns its message (for editing)."""
        self._check_idle()
        message = self.turns.pop().user if self.turns else None
        self.persist()
        return message

    def _check_idle(self) -> None:
        if self.busy:
            raise GenerationError("A reply is being written: wait for it, or press Stop first.")

    def history_tokens(self, upto: int | None = None) -> list[int]:
        """Every token the state after turn `upto - 1` has read."""
        ids: list[int] = []
        for turn in self.turns[:upto]:
            ids += turn.tokens()
        return ids

    def _check_model(self, loaded) -> bool:
        """A state only means something to the model that made it: after a model change the
        conversation keeps its text, read again (in the new model's tokens) by the next message.
        True when the model changed under the conversation."""
        changed = bool(self.model_fingerprint and self.model_fingerprint != loaded.runtime.fingerprint and self.turns)
        if changed:
            encode = loaded.tokenizer.encode
            for i, turn in enumerate(self.turns):
                turn.drop_states()
                turn.prompt_tokens = encode(self.fmt.turn_prompt(turn.user, first=i == 0))
                turn.reply_tokens = encode(turn.reply_raw or turn.reply)
            self.notices.append("This conversation was written with another model: its states do not fit this "
                                "one, so your next message reads the conversation again.")
        self.model_fingerprint = loaded.runtime.fingerprint
        return changed

    @staticmethod
    def _why_reread(stats: dict, model_changed: bool) -> dict:
        if stats.get("history_reread"):
            stats["history_reread_why"] = "model changed" if model_changed else "state dropped"
        return stats

    # ---- where the next read starts ----------------------------------------------------------
    def _digest(self, upto: int) -> str:
        """What the state after turn upto-1 read."""
        return tokens_digest(self.model_fingerprint, self.history_tokens(upto))

    def _state_after(self, i: int) -> tuple[State | None, torch.Tensor | None, bool]:
        """Turn i's state after its reply: kept in memory, else read back from the store.
        Returns (state, logits, whether it came from the store)."""
        turn = self.turns[i]
        if turn.state_after is not None:
            return turn.state_after, turn.logits_after, turn.restored
        if turn.complete and not turn.interrupted:
            held = self.stored_state(f"{i}.after", self._digest(i + 1))
            if held is not None:
                (turn.state_after, turn.logits_after), turn.restored = held, True
                return turn.state_after, turn.logits_after, True
        return None, None, False

    def _resume(self, upto: int) -> tuple[list[int], State | None, torch.Tensor | None, dict]:
        """The tokens to read, and the state to read them from, to reach the state after turn
        upto-1: the latest kept state (memory, then the store), else everything from the start."""
        for i in range(upto - 1, -1, -1):
            state, logits, from_store = self._state_after(i)
            if state is not None:
                rest = [t for turn in self.turns[i + 1:upto] for t in turn.tokens()]
                stats = {"tokens_saved": state.token_count}
                if rest:
                    stats["history_reread"] = len(rest)
                if from_store:
                    stats["state_from_store"] = True
                return rest, state, logits, stats
        history = self.history_tokens(upto)
        return history, None, None, ({"tokens_saved": 0, "history_reread": len(history)} if history else
                                     {"tokens_saved": 0})

    def send(self, engine, message: str, settings: SamplingSettings, max_tokens: int) -> Iterator[str]:
        """Read the user's message into the state, then stream the reply (its text so far)."""
        if not message or not message.strip():
            raise GenerationError("Type a message first.")
        loaded = engine.require()
        model_changed = self._check_model(loaded)
        previous = self.turns[-1] if self.turns else None
        turn = Turn(user=message.strip())
        turn.prompt_tokens = loaded.tokenizer.encode(self.fmt.turn_prompt(message, first=previous is None))
        # from the last turn's state (kept, or read back from the store); if it was dropped, from
        # the latest one still kept, reading the turns after it once
        rest, state, logits, stats = self._resume(len(self.turns))
        turn.stats = self._why_reread(stats, model_changed)
        prompt = rest + turn.prompt_tokens
        self.turns.append(turn)
        yield from self._reply(engine, loaded, turn, prompt, state, logits, settings, max_tokens)

    def regenerate(self, engine, settings: SamplingSettings, max_tokens: int) -> Iterator[str]:
        """A new reply to the last message, from the state saved after reading it."""
        if not self.turns or not self.turns[-1].prompt_tokens:
            raise GenerationError("There is no reply to regenerate yet.")
        loaded = engine.require()
        model_changed = self._check_model(loaded)
        if not self.turns:
            raise GenerationError("The model changed: the conversation was cleared.")
        turn = self.turns[-1]
        last = len(self.turns) - 1
        turn.reply, turn.reply_raw, turn.reply_tokens, turn.complete, turn.interrupted = "", "", [], False, False
        if turn.state_prompt is not None:
            prompt, state, logits = [], turn.state_prompt, turn.logits_prompt
            turn.stats = {"tokens_saved": state.token_count}
        else:
            rest, state, logits, stats = self._resume(last)
            turn.stats = self._why_reread(stats, model_changed)
            prompt = rest + turn.prompt_tokens
        yield from self._reply(engine, loaded, turn, prompt, state, logits, settings, max_tokens)

    def _reply(self, engine, loaded, turn: Turn, prompt: list[int], state: State | None,
               logits: torch.Tensor | None, settings: SamplingSettings, max_tokens: int) -> Iterator[str]:
        gen = Generation(loaded.tokenizer, prompt, state=state, logits=logits,
                         settings=settings.banning([loaded.tokenizer.eos_id]),
                         max_tokens=max_tokens, stop=reply_stops(self.fmt),
                         logits_hook=reply_logits_hook(loaded.newline_id),
                         chunk_len=loaded.runtime.chunk_len, sampler_kernel=loaded.runtime.sampler_kernel)
        try:
            for text in follow_generation(self, engine, gen):
                turn.reply, turn.reply_raw = self.fmt.shown(text), text
                self.checkpoint()  # the text so far (a crash keeps what was shown)
                yield turn.reply
        finally:
            if gen.prompt_state is None:
                self.turns.remove(turn)  # stopped while reading the message: as if never sent
            else:
                turn.state_prompt, turn.logits_prompt = gen.prompt_state, gen.prompt_logits
                turn.reply, turn.reply_raw = self.fmt.shown(gen.text), gen.text
                turn.reply_tokens = list(gen.tokens)
                turn.state_after, turn.logits_after, turn.restored = gen.state, gen.last_logits, False
                turn.stats.update(gen.stats.as_dict())
                turn.complete = True
                for old in self.turns[:-self.undo_depth]:  # the undo depth: older turns keep text only
                    old.drop_states()
            self.persist()  # the finished turn and its states
            self.touch(engine)

    # ---- the session store (sessions.Session) -------------------------------------------------------
    def document(self, with_states: bool = True) -> Document | None:
        if not self.turns and not self.stored:
            return None
        slots, states = {}, {}
        if with_states:
            digest = RunningDigest(self.model_fingerprint)  # one pass over the history
            first_kept = len(self.turns) - self.undo_depth  # the states kept, as in memory
            # Only the state after each reply is kept, without its logits: the next turn always
            # reads its message from it first (new logits), and Regenerate reads the last message
            # again from the turn before. (On a 169M model that is 0.2 MB a turn instead of 0.9.)
            for i, turn in enumerate(self.turns):
                digest.update(turn.prompt_tokens).update(turn.reply_tokens)
                if i >= first_kept and turn.complete and not turn.interrupted:
                    slots[f"{i}.after"] = digest.hexdigest()
                    if turn.state_after is not None:
                        states[f"{i}.after"] = (turn.state_after, None)
        if not self.title and self.turns:
            self.title = " ".join(self.turns[0].user.split())[:60]
        fmt = {"user": self.fmt.user, "bot": self.fmt.bot, "scenario": self.fmt.scenario,
               "reply_start": self.fmt.reply_start}
        self.stored = True
        return Document("chat", {"version": 1, "title": self.title, "format": fmt, "controls": self.controls,
                                 "turns": [t.as_dict() for t in self.turns]},
                        self.title or "New conversation", self.doc_id, self.model_fingerprint, slots, states)

    def open_document(self, doc: Document, tokenizer=None) -> None:
        """Make this session hold a stored conversation (its states are read back when needed).
        A reply cut by a crash comes back as an interrupted reply: the text shown then, read
        again (in tokens) by the next message."""
        self._check_idle()
        try:
            body = doc.body
            fmt = ChatFormat(**{k: str(v) for k, v in body["format"].items()
                                if k in ("user", "bot", "scenario", "reply_start")})
            turns = []
            for t in body["turns"]:
                turn = Turn(user=str(t["user"]), reply=str(t.get("reply", "")), reply_raw=str(t.get("reply_raw", "")),
                            prompt_tokens=[int(x) for x in t.get("prompt_tokens", [])],
                            reply_tokens=[int(x) for x in t.get("reply_tokens", [])],
                            stats=dict(t.get("stats") or {}), complete=bool(t.get("complete")),
                            interrupted=bool(t.get("interrupted")))
                if not turn.complete:  # written while the server died
                    turn.complete, turn.interrupted = True, True
                    turn.stats = {**turn.stats, "interrupted": True}
                    turn.reply_tokens = tokenizer.encode(turn.reply_raw) if tokenizer is not None else []
                turns.append(turn)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(f"That conversation could not be read back ({type(exc).__name__}).") from None
        self.fmt, self.turns, self.doc_id, self.title = fmt, turns, doc.id, doc.title
        self.model_fingerprint, self.stored = doc.fingerprint, True
        self.controls = dict(body.get("controls") or {})

    def latest_state(self) -> tuple[State | None, int]:
        """The state after the latest turn that still has one (memory or store), and that turn's
        index (-1: none)."""
        for i in range(len(self.turns) - 1, -1, -1):
            state, _, _ = self._state_after(i)
            if state is not None:
                return state, i
        return None, -1

    def export_markdown(self) -> str:
        """The conversation as Markdown (what the visitor sees)."""
        lines = [f"# {self.title or 'Conversation'}", ""]
        if self.fmt.scenario.strip():
            lines += [f"*{self.fmt.scenario.strip()}*", ""]
        for turn in self.turns:
            reply = turn.reply + (" *(interrupted)*" if turn.interrupted else "")
            lines += [f"**{self.fmt.user}:** {turn.user}", "", f"**{self.fmt.bot}:** {reply}", ""]
        return "\n".join(lines)

    def export_json(self) -> dict:
        """The conversation as data: format, messages and each turn's statistics."""
        return {"title": self.title, "user": self.fmt.user, "bot": self.fmt.bot, "scenario": self.fmt.scenario,
                "reply_start": self.fmt.reply_start, "model_fingerprint": self.model_fingerprint,
                "turns": [{"user": t.user, "reply": t.reply, "interrupted": t.interrupted, "stats": t.stats}
                          for t in self.turns]}

    store_kind = "chat"

    def open_from(self, doc: Document, loaded) -> None:
        self.open_document(doc, loaded.tokenizer if loaded is not None else None)

    def new_document(self) -> None:
        """Start a new conversation (the one held so far stays in the store)."""
        self._check_idle()
        self.turns, self.title, self.stored, self.controls = [], "", False, {}
        self.doc_id = uuid.uuid4().hex

    # ---- memory accounting (sessions.Session) ----------------------------------------------------
    def memory_items(self) -> list[tuple[str, int]]:
        return [(f"turn {i}", turn.kept_bytes()) for i, turn in enumerate(self.turns) if turn.kept_bytes()]

    def drop(self, key: str) -> str:
        self.turns[int(key.split()[1])].drop_states()
        return ("the saved state of this chat (to free memory for other visitors); your next message "
                "re-reads the conversation once")
