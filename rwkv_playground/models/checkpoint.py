"""Safe reading of RWKV checkpoints (.pth and .safetensors); which architecture a file is
(`models.identify`, from the key names).

Checkpoints are untrusted files. `.pth` files are read with `torch.load(weights_only=True)`, which
only rebuilds tensors and plain containers: a pickle that carries code is refused, never run.
Tensors are memory-mapped where the format allows it, so callers can convert them one by one
without a full extra copy of the model in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import pickle
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoadError

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


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (file pages are dropped, contents kept)
_libc = None


def release_file_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel a memory-mapped tensor's pages are no longer needed, once it is converted.

    Page cache of an mmap'd checkpoint counts in the process's resident memory until the kernel
    reclaims it; converting a 28 GB bf16 file to int8 on a 24 GB machine must not keep it all.
    MADV_PAGEOUT never changes contents (anonymous pages would be swapped, not zeroed), so this is
    safe whatever the tensor's memory is. Best effort: a no-op where unsupported."""
    global _libc
    if not hasattr(os, "sysconf") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        page = mmap.PAGESIZE
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        first, last = (start + page - 1) // page * page, end // page * page  # whole pages only
        if last > first:
            _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)
    except (OSError, AttributeError):
        pass


@dataclass
class RawCheckpoint:
    """Tensors of a checkpoint as stored (dtype untouched), keyed by BlinkDL names."""

    tensors: dict[str, torch.Tensor]
    path: Path
    file_format: str  # "pth" or "safetensors"


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
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
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
    # The format is an 8-byte header length, a JSON header of {name: {dtype, shape, data_offsets}},
    # then the raw data: read here directly (no code runs from the file).
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
    if not isinstance(header, dict) or not all(isinstance(v, dict) for k, v in header.items() if k != "__metadata__"):
        raise LoadError(f"{path.name} is not a safetensors checkpoint (invalid header).")
    tensors = {}
    # Memory-map the file (MAP_PRIVATE, like torch.load(mmap=True)) and view each tensor in place:
    # a 28 GB checkpoint is never copied into anonymous memory before it is converted.
    data_start = 8 + header_len
    storage = None
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LoadError(f"{path.name}: tensor '{key}' has an unsupported dtype or an invalid header "
                            "entry.") from None
        count = 1
        for n in shape:
            count *= n
        if min(shape, default=0) < 0 or end - begin != count * dtype.itemsize or begin < 0:
            raise LoadError(f"{path.name}: tensor '{key}' has a size that does not match its shape.")
        if data_start + end > size:
            raise LoadError(f"{path.name} is truncated or corrupt (the file is shorter than its header says).")
        offset = data_start + begin
        if offset % dtype.itemsize:  # unaligned (the format does not promise alignment): a copy
            with open(path, "rb") as f:
                f.seek(offset)
                buffer = bytearray(f.read(end - begin))
            tensors[key] = torch.frombuffer(buffer, dtype=dtype, count=count).reshape(shape) if count else \
                torch.empty(shape, dtype=dtype)
            continue
        if storage is None:
            storage = _map_file(path, size)
        tensors[key] = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
    return tensors


def _map_file(path: Path, size: int) -> torch.UntypedStorage:
    """The whole file as bytes in memory without reading it: a private (copy-on-write) mapping, or
    where the system refuses to reserve memory for one (a file larger than RAM + swap: Raven 14B's
    28 GB on a 24 GB machine), a read-only mapping. Nothing writes to loaded weights in place;
    with the read-only mapping an attempt would fault instead of changing the file."""
    try:
        return torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    except RuntimeError as exc:
        if "Cannot allocate memory" not in str(exc):
            raise
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": intended
        return torch.frombuffer(view, dtype=torch.uint8).untyped_storage()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


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
    from . import identify

    identify(tensors, path.name)  # an unknown or unsupported architecture is refused here, by name
    return RawCheckpoint(tensors=tensors, path=path, file_format=fmt)
