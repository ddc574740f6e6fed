"""Random RWKV-5/6/7 weights in the ranges trained models have (tests, benchmarks, the self-test).

Decays span fast to slow channels (as trained models' do), lerp coefficients lie in [0, 1],
LayerNorm weights near 1, matrices scaled by 1/sqrt(fan-in), LoRAs small, so logits and states
look like a real model's rather than saturating."""

from __future__ import annotations

import math

import torch


def random_weights(shapes: dict[str, tuple], config, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return dict(iter_random_weights(shapes, config, seed, dtype))


def iter_random_weights(shapes: dict[str, tuple], config, seed: int = 0, dtype=torch.float32):
    """(key, tensor) in checkpoint order, one at a time (a 7B shape never sits in memory whole)."""
    g = torch.Generator().manual_seed(seed)
    L = config.n_layer

    def rand(*shape):
        return torch.rand(shape, generator=g)

    def randn(*shape):
        return torch.randn(shape, generator=g)

    for key, shape in shapes.items():
        layer = int(key.split(".")[1]) if key.startswith("blocks.") else 0
        depth = layer / max(1, L - 1)
        leaf = key.split(".")[-1] if not key.endswith((".weight", ".bias")) else ".".join(key.split(".")[-2:])
        count = math.prod(shape)
        if leaf in ("time_decay", "w0"):
            # fast channels first, slow ones last; deeper layers remember longer
            pos = torch.arange(count, dtype=torch.float32) / max(1, count - 1)
            if leaf == "w0":  # RWKV-7: decay exp(-0.6065 sigmoid(w0)), w0 from about -6 to 2
                t = -6 + 8 * pos ** (0.7 + 1.3 * depth)
            else:
                t = -6 + 5 * pos ** (0.7 + 1.3 * depth)
            t = (t + 0.3 * randn(count)).reshape(shape)
        elif leaf in ("time_faaaa",):
            t = 0.5 * randn(*shape)
        elif leaf == "time_first":
            t = math.log(0.3) + 0.5 * randn(*shape)
        elif leaf.startswith(("time_mix_", "time_maa_", "x_")) and not leaf.endswith(("_w1", "_w2")):
            t = rand(*shape)
        elif leaf in ("k_k",):
            t = 0.7 + 0.3 * rand(*shape)
        elif leaf in ("k_a", "a0", "v0"):
            t = rand(*shape) if leaf == "k_a" else 0.5 * randn(*shape)
        elif leaf == "r_k":
            t = 0.3 * randn(*shape)
        elif leaf.endswith(("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")):
            t = 0.1 * randn(*shape)
        elif ".ln" in key or key.startswith("ln_out"):
            base = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
            t = base + 0.05 * randn(*shape)
        elif key == "emb.weight":
            t = 0.1 * randn(*shape)
        else:
            t = randn(*shape) / math.sqrt(shape[1])
            if ".output." in key or ".ffn.value." in key:
                t = t * 0.5
        yield key, t.to(dtype).contiguous()
