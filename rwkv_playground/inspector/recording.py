"""The shared chunked read of every recording and experiment: a text read chunk by chunk through the
engine with an observer, the surprisal of every token, progress as it goes (a scheduler task's
generator)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import GenerationError
from ..models import by_name
from ..state import State


class RecordedText:
    """What every recording answers about the text it read (RWKV-4's and the matrix one)."""

    tokens: list[int]
    architecture: str

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def arch(self):
        """The architecture (models.Architecture) whose model made the recording."""
        return by_name(self.architecture)


def check_index(what: str, value, count: int, plural: str | None = None) -> int:
    """`value` as an index of `count` things (layers, heads, tokens), or one sentence naming the
    range: recordings refuse a negative or past-the-end index instead of reading another layer
    (numpy's negative indices) or failing deep inside numpy."""
    plural = plural or what.lower() + "s"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise GenerationError(f"{what} must be a whole number (got {value!r}).")
    if not 0 <= int(value) < count:
        raise GenerationError(f"{what} {value} does not exist: this recording has {plural} 0 to {count - 1}.")
    return int(value)


def check_window(start, end, count: int) -> tuple[int, int]:
    """[start, end) as a window of `count` tokens (end None: to the last), or one sentence."""
    end = count if end is None else end
    for name, value in (("The window's start", start), ("The window's end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise GenerationError(f"{name} must be a whole number (got {value!r}).")
    if not 0 <= start < count:
        raise GenerationError(f"The window starts at token {start}, outside the recording (tokens 0 to {count - 1}).")
    if not start < end <= count:
        raise GenerationError(f"The window ends at token {end}: it must end after its start ({start}) and at most "
                              f"at {count}, the recording's length.")
    return int(start), int(end)


def read_observed(runtime, tokens: list[int], state: State | None, recorder, progress_share: float = 1.0,
                  progress_start: float = 0.0):
    """Read `tokens` chunk by chunk from `state` (default: empty) with `recorder` observing (its
    `offset` set to each chunk's start); yields (progress_start + fraction * progress_share,
    message). Returns the
    starting state as numpy copies, its token count, and the surprisal of every token [T]
    (NaN for the first). Shared by the RWKV-4 and the matrix-state recordings."""
    T = len(tokens)
    start_state = state.clone() if state is not None else runtime.new_state()
    # copies: the state is advanced in place below, and .numpy() would share its memory
    initial = {n: t.detach().float().cpu().numpy().copy() for n, t in start_state.tensors().items()}
    initial_count = start_state.token_count if isinstance(start_state.token_count, int) else 0
    surprisal = np.full(T, np.nan, dtype=np.float32)
    previous_logits = None
    current = start_state
    for start in range(0, T, runtime.chunk_len):
        chunk = tokens[start:start + runtime.chunk_len]
        recorder.offset = start
        logits, current = runtime.forward(chunk, current, full_output=True, inplace=True, observe=recorder)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        ids = torch.tensor(chunk)
        # -log p(token_t | before): row t-1 of this chunk's logits, or the previous chunk's last
        if previous_logits is not None:
            surprisal[start] = float(-torch.log_softmax(previous_logits, -1)[chunk[0]])
        if len(chunk) > 1:
            surprisal[start + 1:start + len(chunk)] = (-log_probs[:-1].gather(1, ids[1:, None])[:, 0]).numpy()
        previous_logits = logits[-1].float()
        yield progress_start + progress_share * (start + len(chunk)) / T, f"Recorded {start + len(chunk)} of {T} tokens"
    return initial, initial_count, surprisal
