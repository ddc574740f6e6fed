"""Long-form writing (the "write a blog post about X" use case) on a recurrent state.

Memory stays constant however long the post: only the state (O(layers x width)) is carried.
"Continue" resumes from the saved state and logits, nothing is re-read. Outline-first mode
writes an outline, then each section from a *copy* of the outline's state (State.clone()).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import GenerationError
from .generation import Generation
from .sampling import SamplingSettings
from .state import State

DEFAULT_TEMPLATE = (
    "Bob: Can you help to write a blog-post about {topic}?{details}\n\n"
    "Alice: Sure, here is a blog post about {topic}:\n\nTitle:"
)
OUTLINE_TEMPLATE = (
    "Bob: Can you help to write an outline for a blog-post about {topic}?{details}\n\n"
    "Alice: Sure, here is an outline of a blog post about {topic}:\n\n1."
)
MAX_SECTIONS = 8


def build_prompt(template: str, topic: str, audience: str = "", tone: str = "", key_points: str = "") -> str:
    topic = " ".join(topic.split())
    if not topic:
        raise GenerationError("Type a topic first.")
    details = []
    if audience.strip():
        details.append(f" The readers are {audience.strip()}.")
    if tone.strip():
        details.append(f" Please use a {tone.strip()} tone.")
    points = [p.strip(" -*\t") for p in key_points.replace(";", "\n").splitlines() if p.strip(" -*\t")]
    if points:
        details.append(" Cover these points: " + "; ".join(points) + ".")
    if "{topic}" not in template:
        raise GenerationError("The template must contain {topic}.")
    return template.replace("{topic}", topic).replace("{details}", "".join(details))


def parse_outline(text: str) -> list[str]:
    """Section headings from a numbered or bulleted outline."""
    headings = []
    for line in text.splitlines():
        m = re.match(r"^\s*(?:\d+[.)]|[-*•])\s*(.+?)\s*$", line)
        if m and len(m.group(1)) > 1:
            headings.append(m.group(1).rstrip(":"))
    return headings[:MAX_SECTIONS]


@dataclass
class BlogSession:
    """One browser session's document and the state/logits after its last token."""

    text: str = ""
    state: State | None = None
    logits: torch.Tensor | None = None
    model_fingerprint: str = ""
    stats: dict = field(default_factory=dict)
    # The latest Generation (set when a stream starts, so the UI can show live counts).
    last: Generation | None = field(default=None, repr=False)

    def _stream(self, loaded, prompt, settings, max_tokens, cancel, stop=(), state=None, logits=None):
        gen = Generation(loaded.model, loaded.tokenizer, prompt, state=state, logits=logits, settings=settings,
                         max_tokens=max_tokens, stop=stop, cancel=cancel)
        self.last = gen
        try:
            for piece in gen:
                yield piece, gen
        finally:
            gen.close()  # whatever ended the stream (Stop included): gen.state now matches gen.text
            self.stats = gen.stats.as_dict()

    def write(self, loaded, prompt: str, settings: SamplingSettings, max_tokens: int,
              cancel: threading.Event | None = None) -> Iterator[str]:
        """Start a new document from `prompt`; yields the growing document text."""
        self.model_fingerprint = loaded.model.fingerprint
        self.text, self.state, self.logits = "Title:" if prompt.endswith("Title:") else "", None, None
        start = self.text
        try:
            for _, gen in self._stream(loaded, prompt, settings, max_tokens, cancel):
                self.text = start + gen.text
                yield self.text
        finally:
            self._commit(start)

    def continue_(self, loaded, settings: SamplingSettings, max_tokens: int,
                  cancel: threading.Event | None = None) -> Iterator[str]:
        """Keep writing from the saved state (nothing is re-read)."""
        if self.state is None or self.logits is None:
            raise GenerationError("There is nothing to continue yet: write something first.")
        if self.model_fingerprint != loaded.model.fingerprint:
            raise GenerationError("The model changed since this text was written: start a new post.")
        start = self.text
        try:
            for _, gen in self._stream(loaded, [], settings, max_tokens, cancel, state=self.state, logits=self.logits):
                self.text = start + gen.text
                yield self.text
        finally:
            self._commit(start)

    def _commit(self, start: str) -> None:
        gen = self.last
        if gen is not None and gen.state is not None:
            self.text = start + gen.text
            self.state, self.logits = gen.state, gen.last_logits

    def write_with_outline(self, loaded, outline_prompt: str, settings: SamplingSettings,
                           section_tokens: int, cancel: threading.Event | None = None) -> Iterator[str]:
        """Outline first, then each section from a fork of the outline's state. Stopped at any
        point, the document keeps what was shown and Continue resumes the last stream's state."""
        self.model_fingerprint = loaded.model.fingerprint
        self.text, self.state, self.logits = "", None, None
        try:
            yield from self._outline_then_sections(loaded, outline_prompt, settings, section_tokens, cancel)
        finally:
            last = self.last
            if last is not None and last.state is not None:
                self.state, self.logits = last.state, last.last_logits

    def _outline_then_sections(self, loaded, outline_prompt, settings, section_tokens, cancel):
        outline = "1."
        for _, gen in self._stream(loaded, outline_prompt, settings, 200, cancel, stop=["\n\n"]):
            outline = "1." + gen.text
            self.text = "Outline:\n" + outline
            yield self.text
        outline_gen = self.last
        headings = parse_outline(outline)
        if not headings:
            return
        outline_state, outline_logits = outline_gen.state, outline_gen.last_logits
        body = "Outline:\n" + outline + "\n"
        for number, heading in enumerate(headings, 1):
            if cancel is not None and cancel.is_set():
                break
            section_head = f"\n\n## {number}. {heading}\n\n"
            # A fork: the outline's state is copied, never re-read.
            prefix = f"\n\nSection {number}: {heading}\n\n"
            text = ""
            for _, gen in self._stream(loaded, prefix, settings, section_tokens, cancel, stop=["\n\nSection"],
                                       state=outline_state.clone(), logits=outline_logits):
                text = gen.text
                self.text = body + section_head + text
                yield self.text
            body = body + section_head + text
        self.text = body
        yield self.text
