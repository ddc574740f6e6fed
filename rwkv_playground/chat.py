"""Chat on a recurrent state: formats, ChatRWKV's newline bias, and turn bookkeeping.

Each turn keeps two states: before the user's message (for Undo / Edit) and after it, before the
reply (for Regenerate). So a turn only ever reads its own new tokens; the history is never
re-read, and "tokens saved" is the length of the history the state already holds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import GenerationError
from .generation import Generation
from .sampling import SamplingSettings
from .state import State

REPLY_END = "\n\n"


@dataclass(frozen=True)
class ChatFormat:
    user: str = "Bob"
    bot: str = "Alice"
    scenario: str = ""  # optional text read before the first turn

    def turn_prompt(self, message: str, first: bool) -> str:
        # A message may not contain the turn separator: ChatRWKV folds "\n\n" into "\n".
        message = message.replace("\r\n", "\n").strip()
        while "\n\n" in message:
            message = message.replace("\n\n", "\n")
        head = (self.scenario.strip() + REPLY_END) if (first and self.scenario.strip()) else ("" if first else REPLY_END)
        return f"{head}{self.user}: {message}{REPLY_END}{self.bot}:"


PRESETS = {
    "Raven (Bob / Alice)": ChatFormat("Bob", "Alice"),
    "World (User / Assistant)": ChatFormat("User", "Assistant"),
}


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


@dataclass
class Turn:
    user: str
    reply: str = ""
    prompt_tokens: list[int] = field(default_factory=list)  # the turn's prompt as read
    reply_tokens: list[int] = field(default_factory=list)  # as the state holds them
    stats: dict = field(default_factory=dict)
    state_before: State | None = None
    logits_before: torch.Tensor | None = None
    state_prompt: State | None = None
    logits_prompt: torch.Tensor | None = None
    state_after: State | None = None
    logits_after: torch.Tensor | None = None
    complete: bool = False


@dataclass
class ChatSession:
    """One browser session's conversation and recurrent state."""

    fmt: ChatFormat = field(default_factory=ChatFormat)
    turns: list[Turn] = field(default_factory=list)
    model_fingerprint: str = ""

    # The Generation streaming right now (for live counts in the UI); None between turns.
    live: Generation | None = field(default=None, repr=False)

    @property
    def state(self) -> State | None:
        return self.turns[-1].state_after if self.turns else None

    def clear(self) -> None:
        self.turns.clear()

    def undo(self) -> str | None:
        """Drop the last turn; returns its message (for editing)."""
        return self.turns.pop().user if self.turns else None

    def _check_model(self, loaded) -> None:
        if self.model_fingerprint and self.model_fingerprint != loaded.model.fingerprint:
            self.turns.clear()  # a state only means something to the model that made it
        self.model_fingerprint = loaded.model.fingerprint

    def send(self, loaded, message: str, settings: SamplingSettings, max_tokens: int,
             cancel: threading.Event | None = None) -> Iterator[str]:
        """Read the user's message into the state, then stream the reply (cumulative text)."""
        if not message or not message.strip():
            raise GenerationError("Type a message first.")
        self._check_model(loaded)
        previous = self.turns[-1] if self.turns else None
        turn = Turn(user=message.strip(),
                    state_before=previous.state_after if previous else None,
                    logits_before=previous.logits_after if previous else None)
        turn.prompt_tokens = loaded.tokenizer.encode(self.fmt.turn_prompt(message, first=previous is None))
        turn.stats = {"tokens_saved": turn.state_before.token_count if turn.state_before else 0}
        self.turns.append(turn)
        yield from self._reply(loaded, turn, turn.prompt_tokens, turn.state_before, turn.logits_before,
                               settings, max_tokens, cancel)

    def regenerate(self, loaded, settings: SamplingSettings, max_tokens: int,
                   cancel: threading.Event | None = None) -> Iterator[str]:
        """A new reply to the last message, from the state saved before the reply."""
        if not self.turns or self.turns[-1].state_prompt is None:
            raise GenerationError("There is no reply to regenerate yet.")
        self._check_model(loaded)
        if not self.turns:
            raise GenerationError("The model changed: the conversation was cleared.")
        turn = self.turns[-1]
        turn.reply, turn.complete = "", False
        turn.stats = {"tokens_saved": turn.state_prompt.token_count}
        yield from self._reply(loaded, turn, [], turn.state_prompt, turn.logits_prompt, settings, max_tokens, cancel)

    def _reply(self, loaded, turn: Turn, prompt_tokens: list[int], state: State | None,
               logits: torch.Tensor | None, settings: SamplingSettings, max_tokens: int,
               cancel: threading.Event | None) -> Iterator[str]:
        """Read prompt_tokens (if any) from `state`, then stream the reply; yields its text so far."""
        newline_id = loaded.newline_id

        def bias(step: int, step_logits: torch.Tensor) -> None:
            if newline_id is not None:
                step_logits[newline_id] += newline_bias(step)

        chat_settings = SamplingSettings(**{**settings.__dict__,
                                            "banned_tokens": tuple(settings.banned_tokens) + (loaded.tokenizer.eos_id,)})
        gen = Generation(loaded.model, loaded.tokenizer, prompt_tokens, state=state, logits=logits,
                         settings=chat_settings, max_tokens=max_tokens,
                         stop=[REPLY_END, f"\n{self.fmt.user}:"], cancel=cancel, logits_hook=bias)
        self.live = gen
        try:
            for _ in gen:
                turn.reply = gen.text.strip()
                yield turn.reply
        finally:
            gen.close()  # whatever ended the stream (Stop included): gen.state now matches gen.text
            self.live = None
            if gen.prompt_state is None:
                self.turns.remove(turn)  # stopped while reading the message: as if never sent
            else:
                turn.state_prompt, turn.logits_prompt = gen.prompt_state, gen.prompt_logits
                turn.reply = gen.text.strip()
                turn.reply_tokens = list(gen.tokens)
                turn.state_after, turn.logits_after = gen.state, gen.last_logits
                turn.stats.update(gen.stats.as_dict())
                turn.complete = True
