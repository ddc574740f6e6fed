"""One visitor's State inspector session: the recording (RWKV-4's vector or RWKV-5/6/7's matrix) and
the last experiment's result, both in the memory budget; recordings run as scheduler tasks."""

from __future__ import annotations

import numpy as np

from ..serving.sessions import Session, run_task
from ..state import State
from .matrix import record_matrix_task
from .vector import Recording, record_task


def approximate_nbytes(value) -> int:
    """Memory an experiment's result holds: its arrays, and its lists of token texts (a sweep of
    32 knock-outs keeps 33 x 512 x 5 top-token strings, more than its arrays)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, str):
        return 49 + len(value)  # CPython's str header + one byte per ASCII character
    if isinstance(value, (list, tuple)):
        return 56 + 8 * len(value) + sum(approximate_nbytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(approximate_nbytes(v) for v in vars(value).values())
    return 32


class InspectorSession(Session):
    """One visitor's State inspector: the current recording and the last experiment's result (both
    accounted in the memory budget)."""

    kind = "inspector"

    def __init__(self):
        super().__init__()
        self.recording: Recording | None = None
        self.experiment = None  # the last result of experiments.py
        self.experiment_bytes = 0

    def record(self, engine, tokens: list[int], state: State | None = None):
        """Record `tokens` through the engine's scheduler; yields its events (progress, then done).
        The recording is kept in `self.recording`."""
        tokenizer = engine.require().tokenizer
        self.recording = None

        def task(runtime):
            if runtime.architecture.inspector_views == "matrix":  # RWKV-5/6/7: inspector/matrix.py
                return record_matrix_task(runtime, tokenizer, tokens, state)
            return record_task(runtime, tokenizer, tokens, state)

        for event in run_task(self, engine, task, label="recording"):
            if event.kind == "done":
                self.recording = event.value
                self.touch(engine)
            yield event

    def run_experiment(self, engine, task, label: str):
        """Run an experiment task (runtime -> generator, experiments.py) through the scheduler;
        yields its events. The result is kept in `self.experiment`."""
        self.experiment, self.experiment_bytes = None, 0
        for event in run_task(self, engine, task, label=label):
            if event.kind == "done":
                self.keep_experiment(engine, event.value)
            yield event

    def keep_experiment(self, engine, result) -> None:
        """Keep an experiment's result, accounted once (results do not change afterwards)."""
        self.experiment, self.experiment_bytes = result, approximate_nbytes(result)
        self.touch(engine)

    def memory_items(self) -> list[tuple[str, int]]:
        items = [("recording", self.recording.nbytes())] if self.recording is not None else []
        if self.experiment is not None:
            items.append(("experiment", self.experiment_bytes))
        return items

    def drop(self, key: str) -> str:
        if key == "experiment":
            self.experiment, self.experiment_bytes = None, 0
            return "your last State inspector experiment (run it again to see it)"
        self.recording = None
        return "your State inspector recording (press Record again to make a new one)"
