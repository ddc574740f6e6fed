"""The RWKV architectures, one module each, behind one small protocol.

    rwkv4.py  RWKV-4            vector state (aa, bb, pp), WKV with a running maximum
    rwkv5.py  RWKV-5.0/5.1/5.2  "Eagle": matrix state per head, fixed decay, bonus u
    rwkv6.py  RWKV-6 (x060)     "Finch": data-dependent token shift and decay (LoRAs)
    rwkv7.py  RWKV-7 (x070)     "Goose" / G1: generalised delta rule, value residual

Everything outside this package (runtime, scheduler, sessions, state files, UI) talks to a model
through `Architecture` (what a checkpoint must hold and which model to build) and the built
module's forward:

    arch = identify(tensors)                      # from the key names (LoadError if unknown)
    config = arch.config_from(tensors)            # every dimension from the tensors' shapes
    arch.expected_shapes(config)                  # {key: shape}: the whole checkpoint
    model = arch.build(config)                    # an nn.Module, parameters named as the keys
    model.state_layout()                          # StateLayout: the state's named tensors
    logits, state = model(tokens [B, T], state, wkv=operator, last_only=..., observe=...)

`wkv` is the recurrence operator for `arch.recurrence` ("wkv4" or "matrix"), given by the runtime
from the chosen backend (`wkv.py`: a PyTorch reference and compiled kernels, same signature).
"""

from __future__ import annotations

import re

import torch

from ..errors import LoadError
from . import rwkv4, rwkv5, rwkv6, rwkv7
from .base import (Architecture, MatrixArchitecture, MatrixConfig, MissingKey, embedding_shape,  # noqa: F401
                   head_shape, n_layer_of, require)

# Variants whose keys we recognise but whose math we do not run: (key pattern, sentence).
_REFUSED = [
    (r"\.ffn\.s_emb(_x)?\.weight$|\.ffn\.s[012]$",
     'an RWKV-7a "DeepEmbed" checkpoint (key \'{key}\'); this playground runs RWKV-7 (x070) without DeepEmbed'),
    (r"\.att\.qq\.weight$|\.att\.x_q$|\.qq\.",
     'an RWKV-7b checkpoint with an attention path (key \'{key}\'); this playground runs plain RWKV-7 (x070)'),
    (r"\.att\.time_state$",
     "an RWKV-6 state-tuned checkpoint (key '{key}'); load the base model and its state separately"),
    (r"\.att\.(gate_w1|gate_w2|time_maa_rkvw_w1|time_maa_rkvw_w2)$",
     "an experimental RWKV-6 variant (x060a/b/c: key '{key}'); this playground runs RWKV-6 x060"),
]


def registry() -> list[Architecture]:
    """Every architecture, newest first (the order in which their keys are tried)."""
    return [rwkv7.ARCHITECTURE, rwkv6.ARCHITECTURE, rwkv5.ARCHITECTURE, rwkv4.ARCHITECTURE]


def by_name(name: str) -> Architecture:
    for arch in registry():
        if arch.name == name:
            return arch
    raise LoadError(f"Unknown architecture '{name}'.")


def identify(tensors: dict[str, torch.Tensor], filename: str = "the checkpoint") -> Architecture:
    """The architecture of a checkpoint, from its key names (LoadError naming what was found)."""
    keys = set(tensors)
    for pattern, sentence in _REFUSED:
        hit = sorted(k for k in keys if re.search(pattern, k))
        if hit:
            raise LoadError(f"{filename} is {sentence.format(key=hit[0])}.")
    for arch in registry():
        if arch.recognises(keys):
            return arch
    sample = ", ".join(sorted(k for k in keys if k.startswith("blocks.0."))[:3]) or ", ".join(sorted(keys)[:3])
    raise LoadError(f"{filename} is not an RWKV-4, 5, 6 or 7 checkpoint (keys such as {sample}).")
