"""Long-form writing (the "write a blog post about X" use case) on a recurrent state.

Memory stays constant however long the post: only the state (O(layers x width)) is carried.
"Continue" resumes from the saved state and logits, nothing is re-read (unless the server's
memory budget dropped that state from an idle session: then the post's tokens are read once).
Outline-first mode writes an outline, then each section from a *copy* of the outline's state.
Everything that runs the model goes through the engine's scheduler.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

from .errors import GenerationError
from .generation import Generation
from .sampling import SamplingSettings
from .sessions import Session, follow_generation
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


class BlogSession(Session):
    """One browser session's document, the tokens it was read from, and the state after them."""

    kind = "blog"

    def __init__(self):
        super().__init__()
        self.text = ""
        self.tokens: list[int] = []  # everything the state has read: prompt, then the document
        self.state: State | None = None
        self.logits: torch.Tensor | None = None
        self.model_fingerprint = ""
        self.stats: dict = {}

    def _generate(self, engine, loaded, prompt, settings, max_tokens, stop=(), state=None, logits=None):
        """Stream one generation; yields (it, the text received so far) after each event, and
        leaves it finished."""
        gen = Generation(loaded.tokenizer, prompt, state=state, logits=logits, settings=settings,
                         max_tokens=max_tokens, stop=stop, chunk_len=loaded.runtime.chunk_len,
                         sampler_kernel=loaded.runtime.sampler_kernel)
        try:
            for text in follow_generation(self, engine, gen):
                yield gen, text
        finally:
            self.stats = gen.stats.as_dict()

    def write(self, engine, prompt: str, settings: SamplingSettings, max_tokens: int) -> Iterator[str]:
        """Start a new document from `prompt`; yields the growing document text."""
        loaded = engine.require()
        self.model_fingerprint = loaded.runtime.fingerprint
        prompt_tokens = loaded.tokenizer.encode(prompt)
        self.text = "Title:" if prompt.endswith("Title:") else ""
        self.tokens, self.state, self.logits = [], None, None
        start, gen = self.text, None
        try:
            for gen, text in self._generate(engine, loaded, prompt_tokens, settings, max_tokens):
                self.text = start + text
                yield self.text
        finally:
            self._commit(start, gen, prompt_tokens)

    def continue_(self, engine, settings: SamplingSettings, max_tokens: int) -> Iterator[str]:
        """Keep writing from the saved state (nothing is re-read while it is kept)."""
        loaded = engine.require()
        if not self.tokens:
            raise GenerationError("There is nothing to continue yet: write something first.")
        if self.model_fingerprint != loaded.runtime.fingerprint:
            raise GenerationError("The model changed since this text was written: start a new post.")
        if self.state is not None:
            prompt, state, logits = [], self.state, self.logits
        else:  # dropped to free memory: read the post again, once
            prompt, state, logits = list(self.tokens), None, None
        start, before, gen = self.text, list(self.tokens), None
        try:
            for gen, text in self._generate(engine, loaded, prompt, settings, max_tokens, state=state,
                                            logits=logits):
                self.text = start + text
                yield self.text
        finally:
            self._commit(start, gen, before if state is not None else [])

    def _commit(self, start: str, gen: Generation | None, read_before: list[int]) -> None:
        """Keep the document and the state after it (whatever ended the stream)."""
        if gen is not None and gen.prompt_state is not None:
            self.text = start + gen.text
            self.tokens = read_before + gen.prompt_tokens + gen.tokens
            self.state, self.logits = gen.state, gen.last_logits
        self.touch()

    def write_with_outline(self, engine, outline_prompt: str, settings: SamplingSettings,
                           section_tokens: int) -> Iterator[str]:
        """Outline first, then each section from a fork of the outline's state. Stopped at any
        point, the document keeps what was shown and Continue resumes the last stream's state."""
        loaded = engine.require()
        self.model_fingerprint = loaded.runtime.fingerprint
        self.text, self.tokens, self.state, self.logits = "", [], None, None
        outline_tokens = loaded.tokenizer.encode(outline_prompt)
        outline, gen = "1.", None
        try:
            for gen, text in self._generate(engine, loaded, outline_tokens, settings, 200, stop=["\n\n"]):
                outline = "1." + text
                self.text = "Outline:\n" + outline
                yield self.text
        finally:  # stopped during the outline: Continue resumes after it
            if gen is not None and gen.prompt_state is not None:
                self.state, self.logits, self.tokens = gen.state, gen.last_logits, outline_tokens + gen.tokens
        if gen is None or gen.prompt_state is None or gen.stats.stop_reason in ("cancelled", "closed"):
            return
        headings = parse_outline(outline)
        outline_state, outline_logits, outline_read = self.state, self.logits, list(self.tokens)
        body = "Outline:\n" + outline + "\n"
        for number, heading in enumerate(headings, 1):
            section_head = f"\n\n## {number}. {heading}\n\n"
            # A fork: the outline's state is copied (Generation clones it), never re-read.
            prefix = loaded.tokenizer.encode(f"\n\nSection {number}: {heading}\n\n")
            text, section = "", None
            try:
                for section, text in self._generate(engine, loaded, prefix, settings, section_tokens,
                                                    stop=["\n\nSection"], state=outline_state,
                                                    logits=outline_logits):
                    self.text = body + section_head + text
                    yield self.text
            finally:
                if section is not None and section.prompt_state is not None:
                    # Continue resumes after the last section: its state and the tokens it read
                    self.state, self.logits = section.state, section.last_logits
                    self.tokens = outline_read + section.prompt_tokens + section.tokens
            body = body + section_head + text
            if section is not None and section.stats.stop_reason in ("cancelled", "closed"):
                break
        self.text = body
        yield self.text

    # ---- memory accounting (sessions.Session) ----------------------------------------------------
    def memory_items(self) -> list[tuple[str, int]]:
        if self.state is None:
            return []
        return [("state", self.state.nbytes() + (self.logits.numel() * 4 if self.logits is not None else 0))]

    def drop(self, key: str) -> str:
        self.state = self.logits = None
        return "the saved state of your blog post; Continue re-reads the post once"
