"""Safe reading of RWKV checkpoints (.pth and .safetensors) and RWKV version detection.

Checkpoints are untrusted files. `.pth` files are read with `torch.load(weights_only=True)`, which
only rebuilds tensors and plain containers: a pickle that carries code is refused, never run.
Tensors are memory-mapped where the format allows it, so callers can convert them one by one
without a full extra copy of the model in memory.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LoadError

ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (pre-1.6) format is a bare pickle stream: protocol 2+ starts with 0x80.
PICKLE_MAGIC = b"\x80"

# Hugging Face `RwkvForCausalLM` names -> BlinkDL names (applied in this order).
_HF_RENAMES = [
    (r"^rwkv\.", ""),
    (r"^embeddings\.", "emb."),
    (r"\.pre_ln\.", ".ln0."),
    (r"\.attention\.", ".att."),
    (r"\.feed_forward\.", ".ffn."),
    (r"\.time_mix_key$", ".time_mix_k"),
    (r"\.time_mix_value$", ".time_mix_v"),
    (r"\.time_mix_receptance$", ".time_mix_r"),
]


@dataclass
class RawCheckpoint:
    """Tensors of a checkpoint as stored (dtype untouched), keyed by BlinkDL names."""

    tensors: dict[str, torch.Tensor]
    path: Path
    file_format: str  # "pth" or "safetensors"


def detect_rwkv_version(keys) -> str:
    """Name the RWKV generation from the tensor names ("4", "5", "6", "7" or "unknown")."""
    keys = list(keys)
    joined = "\n".join(keys)
    if re.search(r"att\.(x_r|w0|a0)\b", joined):
        return "7"
    if re.search(r"att\.(time_maa_x|time_decay_w1)\b", joined):
        return "6"
    if re.search(r"att\.(time_faaaa|ln_x|gate)\b", joined):
        return "5"
    if "att.time_first" in joined and "att.time_mix_k" in joined:
        return "4"
    return "unknown"


def _rename_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not any(k.startswith("rwkv.") for k in tensors):
        return tensors
    renamed = {}
    for key, value in tensors.items():
        new_key = key
        for pattern, repl in _HF_RENAMES:
            new_key = re.sub(pattern, repl, new_key)
        renamed[new_key] = value
    return renamed


def _load_pth(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC)):
        raise LoadError(f"{path.name} is not a PyTorch or safetensors checkpoint (unrecognised file content).")
    try:
        # mmap keeps the file's pages out of anonymous memory: converting tensor by tensor then
        # never needs a second full copy of the weights.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(ZIP_MAGIC))
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported" in str(exc) or "global" in str(exc).lower():
            raise LoadError(
                f"{path.name} was refused: it contains pickled Python objects other than tensors, "
                "which could run code when loaded."
            ) from None
        raise LoadError(f"{path.name} is truncated or corrupt (its pickle data cannot be read).") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        msg = str(exc)
        if head.startswith(ZIP_MAGIC) or "zip" in msg.lower() or isinstance(exc, EOFError):
            raise LoadError(
                f"{path.name} is truncated or corrupt (the archive is incomplete; download it again)."
            ) from None
        raise LoadError(f"{path.name} could not be read as a PyTorch checkpoint: {msg.splitlines()[0]}") from None


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise LoadError(f"{path.name} is truncated or corrupt (too short to be a safetensors file).")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len <= 0 or header_len > min(size - 8, 100_000_000):
            raise LoadError(f"{path.name} is not a safetensors checkpoint (invalid header).")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoadError(f"{path.name} is not a safetensors checkpoint (invalid header).") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise LoadError(f"{path.name} is truncated or corrupt (the file is shorter than its header says).")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        return tensors
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise LoadError(f"{path.name} is truncated or corrupt: {exc}") from None


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read a checkpoint's tensors safely. Raises LoadError with one clear sentence on any problem."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"Checkpoint not found: {path}")
    if path.is_dir():
        raise LoadError(f"{path} is a folder, not a checkpoint file.")
    if path.stat().st_size == 0:
        raise LoadError(f"{path.name} is empty (0 bytes): the download or copy did not finish.")
    if path.suffix == ".safetensors":
        obj, fmt = _load_safetensors(path), "safetensors"
    else:
        obj, fmt = _load_pth(path), "pth"

    # Some training scripts wrap the weights: {"state_dict": {...}} or {"model": {...}}.
    if isinstance(obj, dict) and len(obj) <= 4:
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoadError(f"{path.name} is not a model checkpoint (it does not hold a dictionary of tensors).")
    tensors = _rename_hf({str(k): v for k, v in obj.items()})

    version = detect_rwkv_version(tensors)
    if version in ("5", "6", "7"):
        raise LoadError(f"RWKV-{version} checkpoints are not supported yet (this playground runs RWKV-4).")
    if version == "unknown":
        raise LoadError(
            f"{path.name} is not an RWKV-4 checkpoint (no 'blocks.N.att.time_first' / 'time_mix_k' keys)."
        )
    return RawCheckpoint(tensors=tensors, path=path, file_format=fmt)
