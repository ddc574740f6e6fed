"""Chat on a recurrent state: formats, ChatRWKV's newline bias, turn bookkeeping.

Each turn keeps the state after the user's message (Regenerate starts there) and after the
reply (the next turn starts there), so a turn reads only its own new tokens; "tokens saved" is
the length of the history the state already holds. Only the last `undo_depth` turns keep their
states, and the server's memory budget may drop them from an idle chat: then the next turn
re-reads the conversation's tokens once (and says so) instead of failing.

Everything that runs the model goes through the engine's scheduler; a session never touches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import GenerationError
from .generation import Generation
from .sampling import SamplingSettings
from .sessions import Session, follow_generation
from .state import State

REPLY_END = "\n\n"


def fold_message(message: str) -> str:
    """A message may not contain the turn separator: ChatRWKV folds "\n\n" into "\n"."""
    message = message.replace("\r\n", "\n").strip()
    while "\n\n" in message:
        message = message.replace("\n\n", "\n")
    return message


def model_chat_format(loaded) -> "ChatFormat":
    """The chat format the loaded model was released with (the Chat tab's default)."""
    return PRESETS[default_preset(loaded.runtime.architecture, loaded.runtime.config.vocab_size)]


@dataclass(frozen=True)
class ChatFormat:
    user: str = "Bob"
    bot: str = "Alice"
    scenario: str = ""  # optional text read before the first turn
    # what the reply starts with, read as part of the prompt: G1's thinking mode is "<think"
    # (its model cards' "Assistant: <think"); shown as the start of the reply
    reply_start: str = ""

    def turn_prompt(self, message: str, first: bool) -> str:
        message = fold_message(message)
        head = (self.scenario.strip() + REPLY_END) if (first and self.scenario.strip()) else ("" if first else REPLY_END)
        start = f" {self.reply_start.strip()}" if self.reply_start.strip() else ""
        return f"{head}{self.user}: {message}{REPLY_END}{self.bot}:{start}"

    def shown(self, text: str) -> str:
        """The reply as the visitor sees it: the reply start (if any) and what the model wrote."""
        return (self.reply_start.strip() + text).strip() if self.reply_start.strip() else text.strip()


PRESETS = {
    "Raven (Bob / Alice)": ChatFormat("Bob", "Alice"),
    # RWKV-5/6/7 World and the RWKV-7 G1 models (their model cards, ChatRWKV's v7 demo)
    "World / G1 (User / Assistant)": ChatFormat("User", "Assistant"),
    "G1 thinking (Assistant: <think)": ChatFormat("User", "Assistant", reply_start="<think"),
}


def default_preset(architecture, vocab_size: int) -> str:
    """The format a model was released with (`architecture`: models.Architecture): World / G1 for
    the World-vocabulary releases (every RWKV-5/6/7 one, RWKV-4 World), Raven's otherwise (the
    demo model, Pile / Raven)."""
    if architecture.world_releases_only or vocab_size == 65536:
        return "World / G1 (User / Assistant)"
    return "Raven (Bob / Alice)"


def newline_bias(position: int) -> float:
    """ChatRWKV's bias on the newline token by reply position: no empty reply, short replies
    discouraged, very long ones nudged to end."""
    if position <= 0:
        return float("-inf")
    if position <= 40:
        return (position - 40) / 10
    if position <= 150:
        return 0.0
    return min(3.0, (position - 150) * 0.25)


def reply_logits_hook(newline_id: int | None):
    """The hook a reply's Generation runs on its logits: newline_bias by reply position."""
    def bias(step: int, step_logits: torch.Tensor) -> None:
        if newline_id is not None:
            step_logits[newline_id] += newline_bias(step)
    return bias


def reply_stops(fmt: ChatFormat) -> list[str]:
    """A reply ends at the turn separator, or where the model starts writing the user's turn."""
    return [REPLY_END, f"\n{fmt.user}:"]


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

    def tokens(self) -> list[int]:
        return self.prompt_tokens + self.reply_tokens

    def kept_bytes(self) -> int:
        return sum(s.nbytes() for s in (self.state_prompt, self.state_after) if s is not None) + sum(
            t.numel() * t.element_size() for t in (self.logits_prompt, self.logits_after) if t is not None)

    def drop_states(self) -> None:
        self.state_prompt = self.logits_prompt = self.state_after = self.logits_after = None


class ChatSession(Session):
    """One browser session's conversation and recurrent states."""

    kind = "chat"

    def __init__(self, fmt: ChatFormat | None = None, undo_depth: int = 8):
        super().__init__()
        self.fmt = fmt or ChatFormat()
        self.turns: list[Turn] = []
        self.model_fingerprint = ""
        self.undo_depth = max(1, int(undo_depth))

    @property
    def state(self) -> State | None:
        return self.turns[-1].state_after if self.turns else None

    def clear(self) -> None:
        self._check_idle()
        self.turns.clear()

    def undo(self) -> str | None:
        """Drop the last turn; returns its message (for editing)."""
        self._check_idle()
        return self.turns.pop().user if self.turns else None

    def _check_idle(self) -> None:
        if self.busy:
            raise GenerationError("A reply is being written: wait for it, or press Stop first.")

    def history_tokens(self, upto: int | None = None) -> list[int]:
        """Every token the state after turn `upto - 1` has read."""
        ids: list[int] = []
        for turn in self.turns[:upto]:
            ids += turn.tokens()
        return ids

    def _check_model(self, loaded) -> None:
        if self.model_fingerprint and self.model_fingerprint != loaded.runtime.fingerprint:
            self.turns.clear()  # a state only means something to the model that made it
            self.notices.append("The model changed, so the conversation started over.")
        self.model_fingerprint = loaded.runtime.fingerprint

    def send(self, engine, message: str, settings: SamplingSettings, max_tokens: int) -> Iterator[str]:
        """Read the user's message into the state, then stream the reply (its text so far)."""
        if not message or not message.strip():
            raise GenerationError("Type a message first.")
        loaded = engine.require()
        self._check_model(loaded)
        previous = self.turns[-1] if self.turns else None
        turn = Turn(user=message.strip())
        turn.prompt_tokens = loaded.tokenizer.encode(self.fmt.turn_prompt(message, first=previous is None))
        if previous is None:
            prompt, state, logits = turn.prompt_tokens, None, None
            turn.stats = {"tokens_saved": 0}
        elif previous.state_after is not None:
            prompt, state, logits = turn.prompt_tokens, previous.state_after, previous.logits_after
            turn.stats = {"tokens_saved": state.token_count}
        else:  # the history's state was dropped: read it again, once
            history = self.history_tokens()
            prompt, state, logits = history + turn.prompt_tokens, None, None
            turn.stats = {"tokens_saved": 0, "history_reread": len(history)}
        self.turns.append(turn)
        yield from self._reply(engine, loaded, turn, prompt, state, logits, settings, max_tokens)

    def regenerate(self, engine, settings: SamplingSettings, max_tokens: int) -> Iterator[str]:
        """A new reply to the last message, from the state saved after reading it."""
        if not self.turns or not self.turns[-1].prompt_tokens:
            raise GenerationError("There is no reply to regenerate yet.")
        loaded = engine.require()
        self._check_model(loaded)
        if not self.turns:
            raise GenerationError("The model changed: the conversation was cleared.")
        turn = self.turns[-1]
        turn.reply, turn.reply_tokens, turn.complete = "", [], False
        if turn.state_prompt is not None:
            prompt, state, logits = [], turn.state_prompt, turn.logits_prompt
            turn.stats = {"tokens_saved": state.token_count}
        else:
            history = self.history_tokens(len(self.turns) - 1)
            prompt, state, logits = history + turn.prompt_tokens, None, None
            turn.stats = {"tokens_saved": 0, "history_reread": len(history)}
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
                turn.reply = self.fmt.shown(text)
                yield turn.reply
        finally:
            if gen.prompt_state is None:
                self.turns.remove(turn)  # stopped while reading the message: as if never sent
            else:
                turn.state_prompt, turn.logits_prompt = gen.prompt_state, gen.prompt_logits
                turn.reply = self.fmt.shown(gen.text)
                turn.reply_tokens = list(gen.tokens)
                turn.state_after, turn.logits_after = gen.state, gen.last_logits
                turn.stats.update(gen.stats.as_dict())
                turn.complete = True
                for old in self.turns[:-self.undo_depth]:  # the undo depth: older turns keep text only
                    old.drop_states()
            self.touch(engine)

    # ---- memory accounting (sessions.Session) ----------------------------------------------------
    def memory_items(self) -> list[tuple[str, int]]:
        return [(f"turn {i}", turn.kept_bytes()) for i, turn in enumerate(self.turns) if turn.kept_bytes()]

    def drop(self, key: str) -> str:
        self.turns[int(key.split()[1])].drop_states()
        return ("the saved state of this chat (to free memory for other visitors); your next message "
                "re-reads the conversation once")
