"""The small API the app calls: the loaded model behind its scheduler, switching models,
sessions and their memory budget. Knows nothing of Gradio.

    engine = Engine(models_dir="~/models")
    engine.load("assets/rwkv4-demo-shakespeare.pth")
    chat = engine.add_session(ChatSession())
    for reply in chat.send(engine, "Good morrow!", SamplingSettings(seed=1), max_tokens=50): ...

Every use of the model (prompts, generation steps, recordings, switching) goes through
`engine.scheduler`; sessions hold states and text, never the model.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..models.checkpoint import read_checkpoint
from ..errors import LoadError
from ..runtime import Runtime, check_tensors, infer_config, load_runtime
from .scheduler import Scheduler, SchedulerSettings
from .sessions import MemoryBudget, Session, forget_session
from ..tokenizer import Tokenizer, load_tokenizer

ASSETS = Path(__file__).resolve().parents[2] / "assets"
DEMO_CHECKPOINT = ASSETS / "rwkv4-demo-shakespeare.pth"  # the default model
# every model the project trained and ships (tools/demo_model/train.py): the model panel offers each
DEMO_CHECKPOINTS = (DEMO_CHECKPOINT, ASSETS / "rwkv7-demo-shakespeare.pth")
WORLD_VOCAB = ASSETS / "rwkv_vocab_v20230424.txt"
CHECKPOINT_SUFFIXES = (".pth", ".safetensors")

# Released BlinkDL RWKV-4 checkpoints the model panel offers to download (Hugging Face Hub).
KNOWN_CHECKPOINTS = {
    "RWKV-4 Pile 169M": ("BlinkDL/rwkv-4-pile-169m", "RWKV-4-Pile-169M-20220807-8023.pth"),
    "RWKV-4 Pile 430M": ("BlinkDL/rwkv-4-pile-430m", "RWKV-4-Pile-430M-20220808-8066.pth"),
    "RWKV-4 Raven 1B5 v12": ("BlinkDL/rwkv-4-raven", "RWKV-4-Raven-1B5-v12-Eng98%-Other2%-20230520-ctx4096.pth"),
    "RWKV-4 Raven 7B v12": ("BlinkDL/rwkv-4-raven", "RWKV-4-Raven-7B-v12-Eng98%-Other2%-20230521-ctx8192.pth"),
    "RWKV-4 World 0.1B": ("BlinkDL/rwkv-4-world", "RWKV-4-World-0.1B-v1-20230520-ctx4096.pth"),
}
# GPT-NeoX's tokenizer (vocab 50277) for Pile / Raven, in HF format, from the RWKV org's HF port.
NEOX_TOKENIZER = ("RWKV/rwkv-4-169m-pile", "tokenizer.json", "20B_tokenizer.json")


def default_memory_budget() -> int:
    """A tenth of the machine's memory (at least 256 MB) for what visitors' sessions keep."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return max(256 << 20, total // 10)


@dataclass
class ServingSettings:
    """How the app shares one model among its visitors (CLI flags of app.py)."""
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    memory_budget_bytes: int = field(default_factory=default_memory_budget)
    session_ttl_s: float = 2 * 3600  # an idle session (and what it keeps) is freed after this
    undo_depth: int = 8  # chat turns whose states are kept for Undo / Regenerate
    lock_models: bool = False  # no model switching or downloading from the browser


@dataclass
class LoadedModel:
    runtime: Runtime
    tokenizer: Tokenizer
    name: str
    newline_id: int | None

    def describe(self) -> dict:
        info = self.runtime.describe()
        info["name"] = self.name
        info["tokenizer"] = self.tokenizer.name
        return info


def find_tokenizer(checkpoint: Path, vocab_size: int, search_dirs: list[Path]) -> Path:
    """Pick the tokenizer for a checkpoint: World vocabulary for vocab 65536, otherwise a
    `*tokenizer*.json` beside the checkpoint (or in the models folder / assets) of matching size."""
    if vocab_size == 65536:
        return WORLD_VOCAB
    candidates = []
    for folder in [checkpoint.parent, *search_dirs]:
        if folder.is_dir():
            candidates += sorted(folder.glob(f"{checkpoint.stem}*.json")) + sorted(folder.glob("*tokenizer*.json"))
    for path in candidates:
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            size = len(spec["model"]["vocab"]) + sum(1 for t in spec.get("added_tokens", [])
                                                     if t["content"] not in spec["model"]["vocab"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if size == vocab_size:
            return path
    hint = " (RWKV-4 Pile/Raven use GPT-NeoX's 20B_tokenizer.json)" if vocab_size == 50277 else ""
    raise LoadError(f"No tokenizer with {vocab_size} tokens was found beside {checkpoint.name}{hint}: "
                    "pass one with --tokenizer.")


_last_trim = [0.0]


def return_freed_memory(min_interval_s: float = 10.0) -> None:
    """Give memory freed by departed visitors back to the system. glibc keeps freed blocks in its
    per-thread arenas for reuse (measured here: ~100 MB held after a few dozen sessions, returned
    by one malloc_trim); at most once every `min_interval_s`, and only where glibc is the allocator."""
    now = time.monotonic()
    if now - _last_trim[0] < min_interval_s:
        return
    _last_trim[0] = now
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached from here (offline mode, no name resolution, no
    connection), or None when a connection to it opens."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "offline mode is on (HF_HUB_OFFLINE)."
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc.strerror or exc})."
    return None


class Engine:
    """The loaded model behind its scheduler, the models folder, and the visitors' sessions."""

    def __init__(self, models_dir: str | os.PathLike | None = None, device: str = "cpu", dtype: str = "fp32",
                 backends: dict | None = None, settings: ServingSettings | None = None, store=None):
        self.models_dir = Path(models_dir).expanduser().resolve() if models_dir else None
        self.device = device
        self.dtype = dtype
        self.backends = dict(backends or {})  # wkv / step / sampler / gemm choices (backends.py)
        self.settings = settings or ServingSettings()
        self.scheduler = Scheduler(self.settings.scheduler)
        self.memory = MemoryBudget(self.settings.memory_budget_bytes)
        self._visits: dict[str, list[Session]] = {}  # open pages' sessions, by Gradio's session id
        self._visits_lock = threading.Lock()
        self.store = store  # store.SessionStore keeping visitors' work (None: in memory only, --no-store)

    @property
    def current(self) -> LoadedModel | None:
        return self.scheduler.loaded

    def require(self) -> LoadedModel:
        loaded = self.scheduler.loaded
        if loaded is None:
            raise LoadError("No model is loaded yet.")
        return loaded

    def event_concurrency(self) -> int:
        """How many of the browser's model requests the web server hands over at once: all that the
        scheduler runs or queues (it, not the web server, decides the order and says the place)."""
        return self.settings.scheduler.max_active + self.settings.scheduler.max_queue

    # ---- sessions ------------------------------------------------------------------------------
    def add_session(self, session: Session) -> Session:
        """A visitor's session, given the serving settings and accounted in the memory budget."""
        session.configure(self.settings)
        return self.memory.add(session)

    def forget(self, session: Session | None) -> None:
        """The visitor left: stop what runs for them and free what they kept."""
        forget_session(session)

    def join_visit(self, visitor: str | None, session: Session) -> None:
        """Remember a session under its visitor's id (a page, or an API client), so that the
        visitor leaving frees it at once."""
        if visitor:
            with self._visits_lock:
                sessions = self._visits.setdefault(visitor, [])
                if not any(s is session for s in sessions):
                    sessions.append(session)

    def close_visit(self, visitor: str) -> None:
        with self._visits_lock:
            sessions = self._visits.pop(visitor, [])
        for session in sessions:
            self.forget(session)
        return_freed_memory()

    def open_visitor(self, key: str | None):
        """The visitor a browser's key names in the session store: (key, store.Visitor, notice).
        No key, or one this store does not know (malformed, forged, expired), gets a new key and
        an empty workspace; the notice says so when a key was refused. (key, None, "") without a store."""
        if self.store is None:
            return key, None, ""
        from .store import StoreError

        if key:
            try:
                return key, self.store.visitor(key, create=False), ""
            except StoreError:
                notice = "Your browser's key to saved work is not known here, so a new, empty workspace was started."
        else:
            notice = ""
        key, visitor = self.store.new_visitor()
        return key, visitor, notice

    def known_visitor(self, key):
        """The store's visitor for a key it already knows (None: no store, no key, or unknown)."""
        if self.store is None or not key:
            return None
        from .store import StoreError

        try:
            return self.store.visitor(key, create=False)
        except StoreError:
            return None

    # ---- models folder ---------------------------------------------------------------------
    def list_models(self) -> list[str]:
        """Checkpoint names the browser may choose: files in the models folder, plus the demo models."""
        names = [path.name for path in DEMO_CHECKPOINTS if path.exists()]
        if self.models_dir and self.models_dir.is_dir():
            for p in sorted(self.models_dir.rglob("*")):
                if p.suffix in CHECKPOINT_SUFFIXES and p.is_file():
                    rel = p.relative_to(self.models_dir).as_posix()
                    if rel not in names:
                        names.append(rel)
        return names

    def resolve_choice(self, name: str) -> Path:
        """Map a name chosen in the browser to a file, refusing anything outside the models folder."""
        for demo in DEMO_CHECKPOINTS:
            if name == demo.name and demo.exists():
                return demo
        if not self.models_dir:
            raise LoadError("No models folder is configured (start the app with --models-dir DIR).")
        candidate = (self.models_dir / name).resolve()
        if not candidate.is_relative_to(self.models_dir) or candidate.suffix not in CHECKPOINT_SUFFIXES:
            raise LoadError("That file is not in the models folder.")
        if not candidate.is_file():
            raise LoadError(f"{name} is not in the models folder any more.")
        return candidate

    # ---- loading ---------------------------------------------------------------------------
    def load(self, path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
             progress: Callable[[str, float], None] | None = None) -> LoadedModel:
        """Load a checkpoint (a trusted path from the CLI, or one from resolve_choice). Through the
        scheduler: generations still running end with one sentence, and the old model is released
        before the new one is built (two models never share the memory)."""
        path = Path(path)

        def build(report: Callable[[str, float], None]) -> LoadedModel:
            runtime = load_runtime(path, device=self.device, dtype=self.dtype, progress=report, **self.backends)
            search = [d for d in (self.models_dir, ASSETS) if d]
            tok_path = Path(tokenizer) if tokenizer else find_tokenizer(path, runtime.config.vocab_size, search)
            tok = load_tokenizer(tok_path)
            if tok.vocab_size > runtime.config.vocab_size:
                raise LoadError(f"The tokenizer {tok_path.name} has {tok.vocab_size} tokens but the model only "
                                f"{runtime.config.vocab_size}: they do not belong together.")
            newline = tok.encode("\n")
            return LoadedModel(runtime, tok, path.name, newline[0] if len(newline) == 1 else None)

        def preflight() -> None:  # a bad file is refused while the current model keeps serving
            tensors = read_checkpoint(path).tensors
            arch, config = infer_config(tensors, path.name)
            check_tensors(arch, config, tensors)
            if not tokenizer:
                find_tokenizer(path, config.vocab_size, [d for d in (self.models_dir, ASSETS) if d])

        ticket = self.scheduler.switch_model(
            build, f"The model is being switched to {path.name}: this request was stopped.", preflight=preflight)
        for event in ticket:
            if event.kind == "progress" and progress is not None:
                fraction, message = event.value
                progress(message, fraction)
        if ticket.error is not None:
            raise LoadError(ticket.error)
        return ticket.result

    def download(self, label: str, progress: Callable[[str, float], None] | None = None) -> str:
        """Download a known BlinkDL checkpoint into the models folder (needs network access)."""
        if label not in KNOWN_CHECKPOINTS:
            raise LoadError(f"Unknown checkpoint '{label}'.")
        if not self.models_dir:
            raise LoadError("Downloads need a models folder: start the app with --models-dir DIR.")
        repo, filename = KNOWN_CHECKPOINTS[label]
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise LoadError("huggingface_hub is not installed (pip install huggingface_hub).") from None
        unreachable = hub_unreachable()
        if unreachable:  # at once, not after huggingface_hub's five retries (23 s offline)
            raise LoadError(f"Download failed (is this machine offline?): {unreachable}")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        if progress:
            progress(f"Downloading {filename} from {repo} ...", 0.0)
        try:
            local = hf_hub_download(repo, filename, local_dir=str(self.models_dir))
            if "World" not in filename:
                tok = hf_hub_download(NEOX_TOKENIZER[0], NEOX_TOKENIZER[1], local_dir=str(self.models_dir))
                os.replace(tok, self.models_dir / NEOX_TOKENIZER[2])
        except Exception as exc:  # network errors come in many types; all mean "not downloaded"
            text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise LoadError(f"Download failed (is this machine offline?): {text}") from None
        return Path(local).relative_to(self.models_dir).as_posix()
