"""The shared chunked read of every recording and experiment: a text read chunk by chunk through the
engine with an observer, the surprisal of every token, progress as it goes (a scheduler task's
generator)."""

from __future__ import annotations

import numpy as np
import torch

from ..state import State


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
