"""Shared fixtures: random-weight RWKV-4 checkpoints in BlinkDL's format, built by the tests."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The rwkv pip package reads these at import time: plain PyTorch path, TorchScript on.
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ["RWKV_CUDA_ON"] = "0"

from rwkv_playground.model import RWKVConfig, init_random_weights  # noqa: E402

TINY = RWKVConfig(n_layer=3, n_embd=64, vocab_size=500, ffn_dim=256)
MID = RWKVConfig(n_layer=6, n_embd=512, vocab_size=50277, ffn_dim=2048)
WORLD_TINY = RWKVConfig(n_layer=2, n_embd=32, vocab_size=65536, ffn_dim=128)


def write_checkpoint(path: Path, config: RWKVConfig, seed: int = 0, dtype=torch.float32) -> Path:
    torch.save(init_random_weights(config, seed=seed, dtype=dtype), path)
    return path


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_fp32(ckpt_dir):
    return write_checkpoint(ckpt_dir / "tiny-fp32.pth", TINY, seed=1)


@pytest.fixture(scope="session")
def tiny_bf16(ckpt_dir):
    return write_checkpoint(ckpt_dir / "tiny-bf16.pth", TINY, seed=2, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def mid_fp32(ckpt_dir):
    return write_checkpoint(ckpt_dir / "mid-fp32.pth", MID, seed=3)


@pytest.fixture(scope="session")
def world_tiny(ckpt_dir):
    return write_checkpoint(ckpt_dir / "world-tiny.pth", WORLD_TINY, seed=4)


@pytest.fixture(scope="session")
def world_vocab_path():
    """The RWKV World vocabulary shipped in assets/ (identical to the rwkv package's copy)."""
    return ROOT / "assets" / "rwkv_vocab_v20230424.txt"


@pytest.fixture(scope="session")
def world_tokenizer(world_vocab_path):
    from rwkv_playground.tokenizer import load_tokenizer

    return load_tokenizer(world_vocab_path)
