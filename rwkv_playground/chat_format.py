"""Chat formats as RWKV models are trained on them: the speakers' names, the turn separator,
ChatRWKV's newline bias on a reply, the stop strings; each model's default format."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
