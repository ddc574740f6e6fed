"""Tokenizers of RWKV-4 models behind one interface.

- `HFTokenizer`: Hugging Face `tokenizers` JSON (RWKV-4 Pile / Raven use GPT-NeoX's
  `20B_tokenizer.json`; the demo model's tokenizer has the same format).
- `WorldTokenizer`: RWKV World's `rwkv_vocab_v20230424.txt`, greedy longest match over bytes
  (encoded by the `pyrwkv-tokenizer` package).

Both decode to *bytes* (`decode_bytes`): one token may end inside a UTF-8 character, and the
streaming generator must hold such partial characters back rather than print U+FFFD.
"""

from __future__ import annotations

import ast
from abc import ABC, abstractmethod
import json
import os
from pathlib import Path

from .errors import LoadError

END_OF_TEXT = 0


class Tokenizer(ABC):
    name: str = ""
    vocab_size: int = 0
    eos_id: int = END_OF_TEXT

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text -> token ids."""

    @abstractmethod
    def decode_bytes(self, ids) -> bytes:
        """Token ids -> raw bytes (may end inside a UTF-8 character)."""

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """A printable form of one token (for axis labels): partial UTF-8 shown as <0xNN>."""
        raw = self.decode_bytes([token_id])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(chr(b) if b < 128 else f"<0x{b:02X}>" for b in raw)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class HFTokenizer(Tokenizer):
    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise LoadError(f"{path.name} is not a valid Hugging Face tokenizer file ({exc}).") from None
        self.name = path.name
        spec = json.loads(path.read_text(encoding="utf-8"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        decoder = (spec.get("decoder") or {}).get("type")
        added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        self._bytes: list[bytes] = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None:
                self._bytes.append(b"")
            elif i in added:
                self._bytes.append(added[i].encode("utf-8"))
            elif decoder == "ByteLevel":
                self._bytes.append(bytes(byte_decoder.get(ch, 0) for ch in piece))
            else:
                self._bytes.append(self._tok.decode([i]).encode("utf-8"))
        eot = self._tok.token_to_id("<|endoftext|>")
        self.eos_id = eot if eot is not None else END_OF_TEXT

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids) -> bytes:
        table = self._bytes
        return b"".join(table[i] for i in ids)


class WorldTokenizer(Tokenizer):
    """RWKV World tokenizer (greedy longest match over UTF-8 bytes). Encoding runs in the
    maintained `pyrwkv-tokenizer` (Rust); decoding to bytes uses the vocabulary table read here,
    so a token that ends inside a UTF-8 character comes out as the raw bytes it holds."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.name = path.name
        self._bytes: dict[int, bytes] = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LoadError(f"{path.name} is not a readable RWKV World vocabulary ({exc}).") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                idx_str, rest = line.split(" ", 1)
                repr_str, length_str = rest.rsplit(" ", 1)
                token = ast.literal_eval(repr_str)  # literals only: never eval
                token = token.encode("utf-8") if isinstance(token, str) else token
                if not isinstance(token, bytes) or len(token) != int(length_str):
                    raise ValueError("length mismatch")
            except (ValueError, SyntaxError):
                raise LoadError(f"{path.name} line {lineno} is not an RWKV World vocabulary entry.") from None
            self._bytes[int(idx_str)] = token
        if not self._bytes:
            raise LoadError(f"{path.name} is empty.")
        self.vocab_size = max(self._bytes) + 1
        try:
            import pyrwkv_tokenizer
        except ImportError:
            raise LoadError("The World tokenizer needs the pyrwkv-tokenizer package (pip install "
                            "pyrwkv-tokenizer).") from None
        self._encoder = pyrwkv_tokenizer.WorldTokenizer(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._encoder.encode(text))

    def decode_bytes(self, ids) -> bytes:
        table = self._bytes
        return b"".join(table.get(i, b"") for i in ids)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer by file type: `.json` (Hugging Face) or `.txt` (RWKV World vocabulary)."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"Tokenizer file not found: {path}")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".txt":
        return WorldTokenizer(path)
    raise LoadError(f"{path.name}: unknown tokenizer type (expected a .json or a World .txt vocabulary).")
