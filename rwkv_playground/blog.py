"""Long-form writing (the "write a blog post about X" use case) on a recurrent state.

Memory stays constant however long the post: only the state (O(layers x width)) is carried.
"Continue" resumes from the saved state and logits, nothing is re-read (unless the server's
memory budget dropped that state from an idle session: then the post's tokens are read once).
Outline-first mode writes an outline, then each section from a *copy* of the outline's state.
Everything that runs the model goes through the engine's scheduler.
"""

from __future__ import annotations

import re
import uuid
from typing import Iterator

import torch

from .errors import GenerationError
from .generation import Generation
from .sampling import SamplingSettings
from .serving.sessions import Session, follow_generation
from .state import State
from .serving.store import Document, StoreError, tokens_digest

DEFAULT_TEMPLATE = (
    "Bob: Can you help to write a blog-post about {topic}?{details}\n\n"
    "Alice: Sure, here is a blog post about {topic}:\n\nTitle:"
)
OUTLINE_TEMPLATE = (
    "Bob: Can you help to write an outline for a blog-post about {topic}?{details}\n\n"
    "Alice: Sure, here is an outline of a blog post about {topic}:\n\n1."
)
MAX_SECTIONS = 8
MIN_HEADINGS = 3  # an outline shorter than this is led on, item by item (write_with_outline)


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


def summed_stats(parts: list[dict]) -> dict:
    """The statistics of a post written in several streams (an outline, then its sections): the
    tokens and seconds of all of them; the stop reason is the last stream's."""
    if not parts:
        return {}
    total = dict(parts[-1])
    for key in ("prompt_tokens", "prompt_seconds", "generated_tokens", "generation_seconds"):
        total[key] = sum(part.get(key, 0) for part in parts)
    total["prompt_tokens_per_second"] = round(total["prompt_tokens"] / total["prompt_seconds"], 2) \
        if total["prompt_seconds"] > 0 else 0.0
    total["tokens_per_second"] = round(total["generated_tokens"] / total["generation_seconds"], 2) \
        if total["generation_seconds"] > 0 else 0.0
    total["streams"] = len(parts)
    return total


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
        self.interrupted = False  # the text came back after a crash cut its stream
        self.controls: dict = {}  # the form's values it was written with (kept with the post)
        # while a stream runs: (the tokens read before its text, its text so far), so that a
        # crash keeps the document as shown and can rebuild the state from it
        self._pending: tuple[list[int], str] | None = None

    def _generate(self, engine, loaded, prompt, settings, max_tokens, stop=(), state=None, logits=None,
                  read_before=()):
        """Stream one generation; yields (it, the text received so far) after each event, and
        leaves it finished. `read_before`: the tokens `state` has read (for the store)."""
        gen = Generation(loaded.tokenizer, prompt, state=state, logits=logits, settings=settings,
                         max_tokens=max_tokens, stop=stop, chunk_len=loaded.runtime.chunk_len,
                         sampler_kernel=loaded.runtime.sampler_kernel)
        base = list(read_before) + list(prompt)
        self.interrupted = False
        try:
            for text in follow_generation(self, engine, gen):
                yield gen, text
                self._pending = (base, text)
                self.checkpoint()
        finally:
            self._pending = None
            self.stats = gen.stats.as_dict()

    def _new_document(self, title: str) -> None:
        self.doc_id, self.title, self.stored = uuid.uuid4().hex, " ".join(title.split())[:120], False

    def write(self, engine, prompt: str, settings: SamplingSettings, max_tokens: int, title: str = "") -> Iterator[str]:
        """Start a new document from `prompt` (the previous one stays in the store); yields the
        growing document text."""
        loaded = engine.require()
        self._new_document(title)
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
        if self.state is None:  # dropped from memory: the store may still hold it
            held = self.stored_state("post", tokens_digest(self.model_fingerprint, self.tokens))
            if held is not None:
                self.state, self.logits = held
        if self.state is not None:
            prompt, state, logits = [], self.state, self.logits
        else:  # dropped to free memory: read the post again, once
            prompt, state, logits = list(self.tokens), None, None
        start, before, gen = self.text, list(self.tokens), None
        try:
            for gen, text in self._generate(engine, loaded, prompt, settings, max_tokens, state=state,
                                            logits=logits, read_before=before if state is not None else ()):
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
        self.persist()
        self.touch()

    def write_with_outline(self, engine, outline_prompt: str, settings: SamplingSettings,
                           section_tokens: int, title: str = "") -> Iterator[str]:
        """Outline first, then each section from a fork of the outline's state. Stopped at any
        point, the document keeps what was shown and Continue resumes the last stream's state."""
        loaded = engine.require()
        self._new_document(title)
        self.model_fingerprint = loaded.runtime.fingerprint
        self.text, self.tokens, self.state, self.logits = "", [], None, None
        outline_tokens = loaded.tokenizer.encode(outline_prompt)
        outline, parts = "1.", []
        prompt, state, logits, read_before, stop = outline_tokens, None, None, [], ["\n\n"]
        # The model writes the outline until a blank line. A model that stops after fewer than
        # MIN_HEADINGS items (a small one often does) is led on: "\n2." is read, and the model
        # writes that item's line, until the outline has MIN_HEADINGS headings or goes nowhere.
        while True:
            gen, before, text = None, outline, ""
            try:
                for gen, text in self._generate(engine, loaded, prompt, settings, 200, stop=stop, state=state,
                                                logits=logits, read_before=read_before):
                    outline = before + text
                    self.text = "Outline:\n" + outline
                    yield self.text
            finally:  # stopped during the outline: Continue resumes after it
                if gen is not None and gen.prompt_state is not None:
                    self.state, self.logits = gen.state, gen.last_logits
                    self.tokens = list(read_before) + list(prompt) + gen.tokens
                self.persist()
            if gen is None or gen.prompt_state is None or gen.stats.stop_reason in ("cancelled", "closed"):
                return
            parts.append(gen.stats.as_dict())
            headings = parse_outline(outline)
            if len(headings) >= MIN_HEADINGS or len(parts) > MIN_HEADINGS or not text.strip():
                break
            lead = f"\n{len(headings) + 1}."
            outline += lead
            prompt, state, logits, read_before, stop = (loaded.tokenizer.encode(lead), self.state, self.logits,
                                                        list(self.tokens), ["\n"])
        self.stats = summed_stats(parts)
        if len(headings) < 2:  # nothing to write by sections: say so rather than end in silence
            found = f"only one heading ({headings[0]!r})" if headings else "no heading"
            self.notices.append(f"The model's outline has {found}, too few to write the post section by "
                                "section: untick “Outline first” to write it in one go, or try another seed.")
            return
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
                                                    logits=outline_logits, read_before=outline_read):
                    self.text = body + section_head + text
                    yield self.text
            finally:
                if section is not None and section.prompt_state is not None:
                    # Continue resumes after the last section: its state and the tokens it read
                    self.state, self.logits = section.state, section.last_logits
                    self.tokens = outline_read + section.prompt_tokens + section.tokens
                self.text = body + section_head + text
                if section is not None:
                    parts.append(section.stats.as_dict())
                self.stats = summed_stats(parts)  # the whole post's, not the last section's
                self.persist()  # each finished section
            body = body + section_head + text
            if section is not None and section.stats.stop_reason in ("cancelled", "closed"):
                break
        self.text = body
        yield self.text

    # ---- the session store (sessions.Session) ----------------------------------------------------
    def document(self, with_states: bool = True) -> Document | None:
        if not self.text and not self.stored:
            return None
        body = {"version": 1, "title": self.title, "text": self.text, "tokens": list(self.tokens),
                "stats": dict(self.stats), "interrupted": self.interrupted, "controls": self.controls}
        slots, states = {}, {}
        if self._pending is not None:  # mid-stream: the text so far, and what it was read after
            body["pending"] = {"base": list(self._pending[0]), "text": self._pending[1]}
        elif self.tokens and with_states:
            slots["post"] = tokens_digest(self.model_fingerprint, self.tokens)
            if self.state is not None:
                states["post"] = (self.state, self.logits)
        self.stored = True
        return Document("post", body, self.title or "Untitled post", self.doc_id, self.model_fingerprint,
                        slots, states)

    def open_document(self, doc: Document, tokenizer=None) -> None:
        """Hold a stored post (its state is read back from the store when Continue needs it). A
        post whose stream a crash cut comes back as shown, its tokens rebuilt from that text."""
        if self.busy:
            raise GenerationError("A post is being written: wait for it, or press Stop first.")
        try:
            body = doc.body
            text, tokens = str(body["text"]), [int(t) for t in body.get("tokens", [])]
            interrupted = bool(body.get("interrupted"))
            pending = body.get("pending")
            if pending:
                generated = str(pending["text"])
                tokens = [int(t) for t in pending["base"]] + (tokenizer.encode(generated) if tokenizer else [])
                interrupted = True
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(f"That post could not be read back ({type(exc).__name__}).") from None
        self.text, self.tokens, self.interrupted = text, tokens, interrupted
        self.stats = dict(body.get("stats") or {})
        self.controls = dict(body.get("controls") or {})
        self.state = self.logits = None
        self.doc_id, self.title, self.model_fingerprint, self.stored = doc.id, doc.title, doc.fingerprint, True

    store_kind = "post"

    def open_from(self, doc: Document, loaded) -> None:
        self.open_document(doc, loaded.tokenizer if loaded is not None else None)

    def new_document(self) -> None:
        if self.busy:
            raise GenerationError("A post is being written: wait for it, or press Stop first.")
        self.text, self.tokens, self.state, self.logits, self.stats, self.interrupted = "", [], None, None, {}, False
        self._new_document("")

    # ---- memory accounting (sessions.Session) ----------------------------------------------------
    def memory_items(self) -> list[tuple[str, int]]:
        if self.state is None:
            return []
        return [("state", self.state.nbytes() + (self.logits.numel() * 4 if self.logits is not None else 0))]

    def drop(self, key: str) -> str:
        self.state = self.logits = None
        return "the saved state of your blog post; Continue re-reads the post once"
